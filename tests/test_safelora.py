"""SafeLoRA on a tiny aligned/unaligned pair built for the purpose: the projection against the paper's
formula with a dense C, the threshold rule, merged adapters, and the refusals (no pair, full fine-tuning)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from defences.safelora import (
    SUBSPACE_FILE,
    SafeLoRAParams,
    alignment_matrices,
    during_attack,
    lora_layers,
    project_lora,
    safelora,
)
from harness.context import StageContext
from harness.errors import ConfigError, HarnessError
from harness.models.loading import LoadedModel, load_model
from harness.registry import defences

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "v_proj"]
R = 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(aligned tiny Llama, unaligned copy, its directory): the unaligned copy differs from the aligned one
    by a rank-1 V = u w^T in layer 0's q_proj and v_proj and by dense noise everywhere else."""
    aligned = load_model("tiny-llama", device="cpu", dtype="float32")
    unaligned = copy.deepcopy(aligned.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unaligned.named_parameters():
            p.sub_(0.05 * torch.randn(p.shape, generator=g))
        for target in TARGETS:
            weight = unaligned.get_submodule(f"model.layers.0.self_attn.{target}").weight
            w_aligned = aligned.model.get_submodule(f"model.layers.0.self_attn.{target}").weight
            u, w = torch.randn(weight.shape[0], generator=g), torch.randn(weight.shape[1], generator=g)
            weight.copy_(w_aligned - torch.outer(u, w))
    directory = tmp_path_factory.mktemp("unaligned")
    unaligned.save_pretrained(directory, safe_serialization=True)
    aligned.tokenizer.save_pretrained(directory)
    return aligned, unaligned, directory


def params(directory, **extra) -> SafeLoRAParams:
    return SafeLoRAParams(unaligned_model=str(directory), targets=TARGETS, **extra)


def lora_model(aligned: LoadedModel, subspace: dict[str, torch.Tensor], base: torch.nn.Module | None = None):
    """A peft LoRA wrap of ``base`` (default: a copy of the aligned model) with set A and B: layer 0's q_proj
    update lies along V's column u (cosine 1), layer 0's v_proj update is mostly orthogonal to it (cosine ~0)."""
    model = get_peft_model(base if base is not None else copy.deepcopy(aligned.model),
                           LoraConfig(r=R, lora_alpha=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g))
            b = torch.randn(layer.lora_B["default"].weight.shape, generator=g)
            u = subspace[name][:, 0]  # V = u w^T: every column is along u
            u = u / u.norm()
            if name.endswith("layers.0.self_attn.q_proj"):
                b = torch.stack([u, 0.5 * u], dim=1)
            elif name.endswith("layers.0.self_attn.v_proj"):
                b = b - torch.outer(u, u @ b) + 0.01 * u[:, None]
            layer.lora_B["default"].weight.copy_(b)
    return model


def dense_rule(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor, tau: float) -> tuple[torch.Tensor, float]:
    """The paper with a dense C = V V^T / ||V||_F: (new B, cosine)."""
    c = v @ v.t() / torch.sqrt((v * v).sum())
    delta = b @ a
    cos = float(F.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0))
    return (c @ b if cos <= tau else b), cos


def test_alignment_matrix_is_aligned_minus_unaligned(pair):
    aligned, unaligned, _ = pair
    subspace = alignment_matrices(aligned.model, unaligned, TARGETS)
    assert sorted(subspace) == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS)
    for name, v in subspace.items():
        expected = aligned.model.get_submodule(name).weight - unaligned.get_submodule(name).weight
        torch.testing.assert_close(v, expected.detach())
    assert torch.linalg.matrix_rank(subspace["model.layers.0.self_attn.q_proj"]) == 1


def test_projection_equals_the_dense_formula_and_layers_above_tau_are_unchanged(pair):
    aligned, unaligned, directory = pair
    subspace = alignment_matrices(aligned.model, unaligned, TARGETS)
    model = lora_model(aligned, subspace)
    layers = lora_layers(model)
    before = {n: (lay.lora_A["default"].weight.detach().clone(), lay.lora_B["default"].weight.detach().clone())
              for n, lay in layers.items()}
    report = project_lora(layers, subspace, params(directory))
    projected = unchanged = 0
    for name, (a, b) in before.items():
        expected_b, cos = dense_rule(subspace[name], b, a, 0.5)
        assert report["cosines"][f"{name}[default]"] == pytest.approx(cos, abs=1e-5)
        torch.testing.assert_close(layers[name].lora_B["default"].weight, expected_b, rtol=1e-5, atol=1e-6)
        assert torch.equal(layers[name].lora_A["default"].weight, a)  # A is never touched
        if cos <= 0.5:
            projected += 1
        else:
            unchanged += 1
            assert torch.equal(layers[name].lora_B["default"].weight, b)  # bit for bit
    assert report["cosines"]["model.layers.0.self_attn.q_proj[default]"] == pytest.approx(1.0, abs=1e-5)
    assert report["cosines"]["model.layers.0.self_attn.v_proj[default]"] < 0.2
    assert projected >= 1 and unchanged >= 1 and report["projected"] == projected


def test_number_mode_projects_the_lowest_cosines(pair):
    aligned, unaligned, directory = pair
    subspace = alignment_matrices(aligned.model, unaligned, TARGETS)
    model = lora_model(aligned, subspace)
    layers = lora_layers(model)
    before = {n: lay.lora_B["default"].weight.detach().clone() for n, lay in layers.items()}
    report = project_lora(layers, subspace, params(directory, select="number", num_layers=2))
    lowest = sorted(report["cosines"], key=report["cosines"].get)[:2]
    assert report["projected"] == 2
    for name, layer in layers.items():
        moved = not torch.equal(layer.lora_B["default"].weight, before[name])
        assert moved == (f"{name}[default]" in lowest), name


def test_a_merged_adapter_gets_the_same_change_in_its_weights(pair):
    aligned, unaligned, directory = pair
    subspace = alignment_matrices(aligned.model, unaligned, TARGETS)
    unmerged = lora_model(aligned, subspace)
    merged_wrap = lora_model(aligned, subspace)
    layers = lora_layers(merged_wrap)  # captured before merging, as the attack-time hook does
    merged = merged_wrap.merge_and_unload()
    project_lora(lora_layers(unmerged), subspace, params(directory))
    project_lora(layers, subspace, params(directory))
    reference = unmerged.merge_and_unload()
    for name in subspace:
        torch.testing.assert_close(merged.get_submodule(name).weight, reference.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)


def test_defend_stores_the_subspace_and_changes_no_weight(pair, tmp_path):
    aligned, unaligned, directory = pair
    model = LoadedModel(copy.deepcopy(aligned.model), aligned.tokenizer, aligned.ref, aligned.fingerprint)
    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path / "w")
    out = safelora(model, params(directory), ctx)
    assert out.model is None and out.report["safelora_subspace"]["modules"] == 4
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "w" / SUBSPACE_FILE)
    for name, v in alignment_matrices(aligned.model, unaligned, TARGETS).items():
        assert torch.equal(stored[name], v)
    for (n, p), q in zip(model.model.named_parameters(), aligned.model.parameters()):
        assert torch.equal(p, q), n


def test_during_attack_projects_a_lora_fine_tune_on_exit_and_leaves_no_hook(pair, tmp_path):
    aligned, unaligned, directory = pair
    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path / "w")
    model = LoadedModel(copy.deepcopy(aligned.model), aligned.tokenizer, aligned.ref, aligned.fingerprint)
    safelora(model, params(directory), ctx)
    subspace = alignment_matrices(aligned.model, unaligned, TARGETS)
    hooks = sum(len(m._forward_pre_hooks) for m in model.model.modules())
    with during_attack(model, params(directory), ctx.workdir):
        model.model = lora_model(aligned, subspace, base=model.model)  # as the lora attack: wrap, then train
        model.model(input_ids=torch.tensor([[1, 2, 3]]))
        trained = {n: (lay.lora_A["default"].weight.detach().clone(), lay.lora_B["default"].weight.detach().clone())
                   for n, lay in lora_layers(model.model).items()}
    assert sum(len(m._forward_pre_hooks) for m in unwrap_all(model.model)) == hooks
    for name, layer in lora_layers(model.model).items():
        a, b = trained[name]
        expected, _ = dense_rule(subspace[name], b, a, 0.5)
        torch.testing.assert_close(layer.lora_B["default"].weight, expected, rtol=1e-5, atol=1e-6)


def unwrap_all(model):
    return model.get_base_model().modules() if hasattr(model, "get_base_model") else model.modules()


def test_a_full_parameter_attack_is_refused_at_its_first_forward(pair, tmp_path):
    aligned, _, directory = pair
    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path / "w")
    model = LoadedModel(copy.deepcopy(aligned.model), aligned.tokenizer, aligned.ref, aligned.fingerprint)
    safelora(model, params(directory), ctx)
    with pytest.raises(HarnessError, match="full-parameter attack"):
        with during_attack(model, params(directory), ctx.workdir):
            model.model(input_ids=torch.tensor([[1, 2, 3]]))  # the first forward of a full fine-tune
    assert sum(len(m._forward_pre_hooks) for m in model.model.modules()) == 0


def test_missing_or_bad_models_are_refused_when_params_are_read(pair, tmp_path):
    plugin = defences.get("safelora")
    with pytest.raises(ConfigError, match="unaligned_model: Field required"):
        plugin.parse_params({}, "defence.params")
    with pytest.raises(ConfigError, match="not a model directory"):
        plugin.parse_params({"unaligned_model": str(tmp_path / "nowhere")}, "defence.params")
    with pytest.raises(ConfigError, match="aligned_model.*not a model directory"):
        plugin.parse_params({"unaligned_model": str(pair[2]), "aligned_model": "./missing"}, "defence.params")


def test_an_identical_pair_has_no_alignment_direction(pair):
    aligned = pair[0]
    with pytest.raises(HarnessError, match="identical"):
        alignment_matrices(aligned.model, copy.deepcopy(aligned.model), TARGETS)


def test_lora_layers_without_an_alignment_matrix_are_refused_at_the_first_forward(pair, tmp_path):
    aligned, _, directory = pair
    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path / "w")
    model = LoadedModel(copy.deepcopy(aligned.model), aligned.tokenizer, aligned.ref, aligned.fingerprint)
    safelora(model, params(directory), ctx)  # q_proj and v_proj only
    with pytest.raises(HarnessError, match="no alignment matrix .*k_proj"):
        with during_attack(model, params(directory), ctx.workdir):
            model.model = get_peft_model(model.model, LoraConfig(r=R, target_modules=["k_proj", "q_proj"],
                                                                 task_type="CAUSAL_LM"))
            model.model(input_ids=torch.tensor([[1, 2, 3]]))  # through the peft wrapper


def test_pipeline_lora_attack_comes_out_projected_and_a_full_fine_tune_is_refused(pair, tiny_run_config):
    """Through the pipeline: every saved LoRA layer is either projected (B in the column space of V) or
    kept because its cosine is above tau; with full-ft the attack stops with SafeLoRA's message."""
    from safetensors.torch import load_file

    from harness.run.runner import execute
    from harness.run.store import StageStore

    _, unaligned, directory = pair
    config = tiny_run_config(f"defence.unaligned_model={directory}", "resources.keep_attacked_weights=true",
                             defence={"name": "safelora"}, attack={"name": "lora"}, compare_undefended=False)
    results, _ = execute(config)
    store = StageStore(config.cache_dir)
    defend, attack = results["stages"]["defend"], results["stages"]["attack"]
    assert store.manifest(defend["key"])["output"] == "alias"
    subspace = load_file(store.path(defend["key"]) / "work" / SUBSPACE_FILE)
    saved = load_file(store.path(attack["key"]) / "model" / "adapter_model.safetensors")
    projected = kept = 0
    for name, v in subspace.items():
        a = saved[f"base_model.model.{name}.lora_A.weight"].double()
        b = saved[f"base_model.model.{name}.lora_B.weight"].double()
        v = v.double()
        _, cos = dense_rule(v, b, a, 0.5)
        residual = b - v @ torch.linalg.lstsq(v, b).solution  # part of B outside the column space of V
        if residual.norm() <= 1e-4 * b.norm():
            projected += 1
        else:
            assert cos > 0.5, name
            kept += 1
    assert projected + kept == len(subspace) == 14 and projected >= 1

    refused = tiny_run_config(f"defence.unaligned_model={directory}", defence={"name": "safelora"},
                              attack={"name": "full-ft"}, compare_undefended=False)
    with pytest.raises(HarnessError, match="full-parameter attack"):
        execute(refused)
