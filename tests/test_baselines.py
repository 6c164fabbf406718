"""The six baseline defences of PAPER.md §5, each shown doing what defines it, with numbers, on the
real tiny-llama (real SmolLM2 tokenizer and chat template) and the real jbb-pairs data."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from attacks.full_ft import FullFTParams, full_ft
from defences.adversarial_loss import AdversarialLossParams, adversarial_loss, adversarial_loss_defence
from defences.gradient_ascent import GradientAscentParams, gradient_ascent
from defences.random_init import random_init
from defences.safety_sft import SafetySFTParams, safety_sft
from defences.security_vectors import (
    VECTOR_FILE,
    SecurityVectorParams,
    during_attack,
    load_vector,
    security_vector_active,
    security_vectors,
)
from defences.vaccine import VaccineParams, vaccine, vaccine_loss
from harness.context import StageContext
from harness.data.readers import DataAccess
from harness.data.records import QA
from harness.data.tokenization import collate_pairs, collate_sft, encode_pair, encode_sft
from harness.models.loading import LoadedModel
from harness.registry import NoParams, defences
from harness.train.sft import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_DEFENCES = ["none", "repnoise", "safety-sft", "gradient-ascent", "adversarial-loss", "security-vectors",
                "vaccine", "random-init", "booster", "t-vaccine", "lisa", "tar", "safelora"]
# Few pairs, short sequences, big steps: each recipe runs in about a second.
FAST = dict(num_pairs=8, batch_size=4, max_length=48, warmup_ratio=0.0, schedule="constant")


def fresh(base: LoadedModel) -> LoadedModel:
    """A private copy of the tiny model (the module fixture stays untouched)."""
    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.ref, base.fingerprint)


def make_ctx(tmp_path: Path, data: DataAccess, seed: int = 0) -> StageContext:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return StageContext(seed=seed, device="cpu", dtype="float32", data=data, cache_dir=tmp_path, workdir=workdir,
                        prompt_format="chat")


def side_ce(model: LoadedModel, data: DataAccess, side: str, n: int = 8, max_length: int = 48,
            mask_prompt: bool = True) -> float:
    """Mean next-token CE of one side of the first ``n`` training pairs (answer tokens only by default)."""
    examples = [encode_sft(model.tokenizer, p.prompt, getattr(p, side), "chat", max_length, mask_prompt)
                for p in data.pairs("jbb-pairs", n=n)]
    batch = collate_sft(examples, model.tokenizer.eos_token_id, mask_padding=True)
    model.model.eval()
    with torch.no_grad():
        return causal_lm_loss(model.model, batch).item()


def pair_batch(model: LoadedModel, data: DataAccess, n: int = 3, max_length: int = 40) -> dict[str, torch.Tensor]:
    examples = [encode_pair(model.tokenizer, p.prompt, p.harmful, p.harmless, "chat", max_length)
                for p in data.pairs("jbb-pairs", n=n)]
    return collate_pairs(examples, pad_id=model.tokenizer.eos_token_id)


def sft_batch(model: LoadedModel, data: DataAccess, side: str, n: int = 3, max_length: int = 40):
    examples = [encode_sft(model.tokenizer, p.prompt, getattr(p, side), "chat", max_length, False)
                for p in data.pairs("jbb-pairs", n=n)]
    return collate_sft(examples, model.tokenizer.eos_token_id, mask_padding=True)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --- registry -------------------------------------------------------------------------------------


def test_harness_list_shows_every_built_in_defence_with_its_params():
    from harness.cli import app

    result = CliRunner().invoke(app, ["list", "defences"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ALL_DEFENCES:
        assert name in result.output, name
    for param in ("lambda_", "rho", "rank", "num_pairs"):
        assert param in result.output, param
    assert sorted(ALL_DEFENCES) == defences.names()


def test_defaults_are_the_papers():
    sft, ga, adv = SafetySFTParams(), GradientAscentParams(), AdversarialLossParams()
    sv, vac = SecurityVectorParams(), VaccineParams()
    for p in (sft, ga, adv, vac):  # RepNoise's optimisation settings (PAPER.md §4)
        assert (p.lr, p.batch_size, p.epochs, p.optimizer, p.max_length, p.pairs) == (
            2e-5, 8, 1, "adam", 128, "jbb-pairs"
        )
    assert adv.lambda_ == 0.1 and vac.rho == 1.0 and ga.mask_prompt
    assert (sv.rank, sv.alpha, sv.dropout, sv.lr, sv.optimizer, sv.epochs, sv.scale) == (
        8, 32, 0.1, 1e-3, "adam", 1, 4.0
    )
    assert sv.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert defences.get("random-init").params_model is NoParams
    assert "during_attack" in defences.get("security-vectors").info


# --- safety SFT and gradient ascent ---------------------------------------------------------------


def test_safety_sft_lowers_the_refusal_ce_on_its_training_pairs(base, data, tmp_path):
    model = fresh(base)
    before = side_ce(model, data, "harmless")
    out = safety_sft(model, SafetySFTParams(lr=3e-2, epochs=3, **FAST), make_ctx(tmp_path, data))
    after = side_ce(out.model, data, "harmless")
    assert out.model is model and out.report["safety_sft_training"]["pairs"] == 8
    assert out.report["safety_sft_training"]["steps"] == 6
    assert after < 0.8 * before, (before, after)  # 10.8 -> 6.4


def test_gradient_ascent_raises_the_harmful_ce(base, data, tmp_path):
    model = fresh(base)
    before = side_ce(model, data, "harmful")
    out = gradient_ascent(model, GradientAscentParams(lr=3e-2, epochs=2, **FAST), make_ctx(tmp_path, data))
    after = side_ce(out.model, data, "harmful")
    info = out.report["gradient_ascent_training"]
    assert info["first_loss"] < 0 and info["last_loss"] < info["first_loss"]  # loss = -CE goes down
    assert after > before + 0.5, (before, after)  # 10.8 -> 12.0


# --- adversarial loss -----------------------------------------------------------------------------


def hand_ce(logit: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over (row, t >= 1) with mask[row, t] of -log softmax(logit[row, t - 1])[ids[row, t]]."""
    values = [-torch.log_softmax(logit[b, t - 1], -1)[ids[b, t]].item()
              for b in range(ids.shape[0]) for t in range(1, ids.shape[1]) if mask[b, t]]
    return sum(values) / len(values)


def test_adversarial_loss_is_retain_ce_minus_lambda_times_harmful_ce_by_hand(base, data):
    model = fresh(base).model.double()
    batch = pair_batch(fresh(base), data)
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    mask = harmful != harmless  # RepNoise's position mask: the answers, not the shared prompt
    with torch.no_grad():
        ce_harmful = hand_ce(model(harmful, attention_mask=batch["harmful_attention_mask"]).logits, harmful, mask)
        ce_harmless = hand_ce(model(harmless, attention_mask=batch["harmless_attention_mask"]).logits, harmless, mask)
        loss, terms = adversarial_loss(model, batch, lambda_=0.1, chunk_rows=7)
        retain_only, _ = adversarial_loss(model, batch, lambda_=0.0)
    assert terms["harmful_ce"].item() == pytest.approx(ce_harmful, rel=1e-10)
    assert terms["harmless_ce"].item() == pytest.approx(ce_harmless, rel=1e-10)
    assert loss.item() == pytest.approx(ce_harmless - 0.1 * ce_harmful, rel=1e-10)
    assert retain_only.item() == pytest.approx(ce_harmless, rel=1e-10)


def test_adversarial_loss_recipe_trains_and_records_both_terms(base, data, tmp_path):
    model = fresh(base)
    before = snapshot(model.model)
    out = adversarial_loss_defence(model, AdversarialLossParams(lr=1e-3, lambda_=0.5, **FAST), make_ctx(tmp_path, data))
    history = out.report["adversarial_loss_history"]
    assert len(history) == 2
    for step in history:
        assert step["loss"] == pytest.approx(step["harmless_ce"] - 0.5 * step["harmful_ce"], rel=1e-5)
    assert all(not torch.equal(p, before[n]) for n, p in out.model.model.named_parameters())


# --- security vectors -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_vector(base, data, tmp_path_factory):
    """(base copy after the defence, params, workdir, defence return value, harmful CE before/with the adapter)."""
    tmp = tmp_path_factory.mktemp("security-vectors")
    model = fresh(base)
    params = SecurityVectorParams(lr=1e-2, epochs=3, **FAST)
    ctx = make_ctx(tmp, data)
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    weights = snapshot(model.model)
    returned = security_vectors(model, params, ctx)
    assert {n: p.requires_grad for n, p in model.model.named_parameters()} == flags  # restored
    assert all(torch.equal(p, weights[n]) for n, p in model.model.named_parameters())  # base frozen
    return model, params, ctx.workdir, returned


def test_security_vector_is_fitted_to_harmful_data_and_stored_as_safetensors(trained_vector, data):
    model, params, workdir, returned = trained_vector
    assert returned.model is None  # weights unchanged: the pipeline aliases the base model
    assert returned.report["security_vector_training"]["pairs"] == 8
    assert [p.name for p in workdir.iterdir()] == [VECTOR_FILE]
    raw = (workdir / VECTOR_FILE).read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])  # the safetensors layout, no pickle
    assert header["__metadata__"]["format"] == "harness-security-vector"
    with safe_open(str(workdir / VECTOR_FILE), framework="pt") as fh:
        keys = list(fh.keys())
    layers = model.model.config.num_hidden_layers
    assert len(keys) == 2 * 7 * layers  # A and B for each of 7 targets in every layer
    tensors = load_vector(workdir / VECTOR_FILE, "cpu")
    assert all(not t.requires_grad for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_B"))  # B moved off zero
    without = side_ce(model, data, "harmful", mask_prompt=False)
    with security_vector_active(model.model, tensors, params.scale, params.dropout):
        fitted = side_ce(model, data, "harmful", mask_prompt=False)
    # The adapter "knows" the harmful data: 10.81 -> 10.73. Only a little on this model: its logits are
    # bounded by the 0.02-std tied embedding, which an adapter on the Linear layers cannot change.
    assert without - fitted > 0.05, (without, fitted)


def test_security_vector_changes_outputs_only_while_active(trained_vector, data):
    model, params, workdir, _ = trained_vector
    batch = sft_batch(model, data, "harmful")
    plain, hooks = logits(model.model, batch), hook_count(model.model)
    n_params = len(list(model.model.parameters()))
    with during_attack(model, params, workdir):
        active = logits(model.model, batch)
        assert hook_count(model.model) == hooks + 7 * model.model.config.num_hidden_layers
    assert (active - plain).abs().max() > 1e-2
    assert torch.equal(logits(model.model, batch), plain)  # bit-identical after exit
    assert hook_count(model.model) == hooks and len(list(model.model.parameters())) == n_params


def test_during_a_full_ft_attack_step_the_vector_is_frozen_and_the_base_trains(trained_vector, data, tmp_path):
    model, params, workdir, _ = trained_vector
    attacked = fresh(LoadedModel(model.model, model.tokenizer, model.ref, model.fingerprint))
    tensors = load_vector(workdir / VECTOR_FILE, "cpu")
    kept = {k: t.clone() for k, t in tensors.items()}
    weights = snapshot(attacked.model)
    attack = FullFTParams(dataset="beavertails-unsafe", num_samples=4, batch_size=4, max_length=48, lr=1e-3)
    with security_vector_active(attacked.model, tensors, params.scale, params.dropout):
        out = full_ft(attacked, attack, make_ctx(tmp_path, data))
    assert out.model is attacked and out.report["attack_training"]["steps"] == 1
    assert all(torch.equal(tensors[k], kept[k]) and tensors[k].grad is None for k in kept)
    moved = [n for n, p in attacked.model.named_parameters() if not torch.equal(p, weights[n])]
    assert len(moved) == len(weights)  # every base weight trained
    assert hook_count(attacked.model) == hook_count(model.model)


def test_security_vector_composes_with_a_peft_lora_wrap_inside_the_block(trained_vector, data, tmp_path):
    from peft import LoraConfig, get_peft_model

    from harness.train.sft import SFTParams, fine_tune

    model, params, workdir, _ = trained_vector
    victim = fresh(LoadedModel(model.model, model.tokenizer, model.ref, model.fingerprint))
    batch = sft_batch(victim, data, "harmful")
    plain = logits(victim.model, batch)
    with during_attack(victim, params, workdir):
        active = logits(victim.model, batch)
        # what attacks/lora.py does inside the block
        wrapped = get_peft_model(victim.model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
        torch.testing.assert_close(logits(wrapped, batch), active, rtol=0, atol=1e-6)  # hooks fire via base_layer
        lora_before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
        records = [QA(p.prompt, p.harmful) for p in data.pairs("jbb-pairs", n=4)]
        fine_tune(wrapped, victim.tokenizer, records, SFTParams(lr=1e-2, batch_size=4, max_length=48),
                  make_ctx(tmp_path, data), "lora attack")
        moved = [n for n, p in wrapped.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
        assert moved == [n for n in lora_before if "lora_B" in n]  # one step from B = 0: only B gets a gradient
        hooks_inside = hook_count(wrapped)
    assert (active - plain).abs().max() > 1e-2
    assert hook_count(wrapped) == hooks_inside - 7 * victim.model.config.num_hidden_layers
    with wrapped.disable_adapter():  # attacker's LoRA off, vector gone: back to the base exactly
        torch.testing.assert_close(logits(wrapped, batch), plain, rtol=0, atol=0)


# --- vaccine --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [1.0, 10.0])
def test_vaccine_perturbation_has_global_norm_rho_and_raises_the_loss(base, data, rho):
    model = fresh(base).model
    model.train()
    batch = sft_batch(fresh(base), data, "harmless")
    hooks = hook_count(model)
    loss, terms = vaccine_loss(model, batch, rho=rho)
    assert hook_count(model) == hooks  # both passes' hooks are gone
    assert all(p.grad is None for p in model.parameters())  # pass 1 touched no parameter gradient
    assert terms["perturbation_norm"].item() == pytest.approx(rho, rel=1e-4)
    assert loss.item() > terms["clean_loss"].item()  # a step up the gradient raises the loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert hook_count(model) == hooks


def test_vaccine_recipe_records_rho_every_step_and_leaves_no_hooks(base, data, tmp_path):
    model = fresh(base)
    hooks = hook_count(model.model)
    out = vaccine(model, VaccineParams(rho=10.0, lr=1e-3, **FAST), make_ctx(tmp_path, data))
    history = out.report["vaccine_history"]
    assert len(history) == 2
    assert all(step["perturbation_norm"] == pytest.approx(10.0, rel=1e-4) for step in history)
    assert all(step["loss"] > step["clean_loss"] for step in history)
    assert hook_count(out.model.model) == hooks


# --- random init ----------------------------------------------------------------------------------


def test_random_init_is_seeded_fresh_weights_of_the_same_architecture(base, data, tmp_path):
    def run(seed: int) -> LoadedModel:
        out = random_init(fresh(base), NoParams(), make_ctx(tmp_path, data, seed=seed))
        assert out.report["random_init"]["seed"] == seed
        return out.model

    config_before = base.model.config.to_dict()
    first, again, other = run(0), run(0), run(1)
    loaded = dict(base.model.named_parameters())
    for name, p in first.model.named_parameters():
        assert p.dtype == loaded[name].dtype and p.shape == loaded[name].shape
        assert torch.equal(p, dict(again.model.named_parameters())[name]), name  # same seed, same weights
        if p.ndim == 2:  # norms are re-set to ones, as a fresh model's are
            assert not torch.equal(p, loaded[name]), name
            assert not torch.equal(p, dict(other.model.named_parameters())[name]), name
    # the architecture's own initialisation: normal(0, initializer_range) weights, unit norms
    std = first.model.config.initializer_range
    assert first.model.model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.02)
    assert all(
        torch.equal(p, torch.ones_like(p)) for n, p in first.model.named_parameters() if n.endswith("norm.weight")
    )
    assert first.model.lm_head.weight is first.model.model.embed_tokens.weight  # still tied
    assert first.model.config.to_dict() == config_before and first.tokenizer is base.tokenizer
    assert len(first.tokenizer) == first.model.config.vocab_size


# --- through the real pipeline --------------------------------------------------------------------


def test_pipeline_keeps_the_vector_active_during_the_attack_only(tiny_run_config, monkeypatch):
    from harness.run.runner import execute
    from harness.run.store import StageStore

    plugin = defences.get("security-vectors")
    seen: dict[str, object] = {}
    real = plugin.hook("during_attack")

    class Spy:
        def __init__(self, model, params, artefacts):
            self.inner, self.model = real(model, params, artefacts), model
            seen["artefacts"] = sorted(p.name for p in Path(artefacts).iterdir())

        def __enter__(self):
            self.inner.__enter__()
            seen["hooks_inside"] = hook_count(self.model.model)

        def __exit__(self, *exc):
            out = self.inner.__exit__(*exc)
            seen["hooks_after"] = hook_count(self.model.model)
            return out

    monkeypatch.setitem(plugin.info, "during_attack", Spy)
    config = tiny_run_config("defence.num_pairs=8", "defence.batch_size=4", "defence.max_length=48",
                             "resources.keep_attacked_weights=true",  # the attacked weights are read below
                             defence={"name": "security-vectors"}, attack={"name": "full-ft"},
                             compare_undefended=False)
    results, _ = execute(config)
    assert seen["artefacts"] == [VECTOR_FILE]
    assert seen["hooks_inside"] == seen["hooks_after"] + 7 * 2  # 7 targets x 2 tiny layers, then none
    store = StageStore(config.cache_dir)
    defend = results["stages"]["defend"]
    assert store.manifest(defend["key"])["output"] == "alias"  # pre-attack evaluation is of the base model
    attacked = results["stages"]["attack"]["key"]
    with safe_open(str(store.path(attacked) / "model" / "model.safetensors"), framework="pt") as fh:
        saved = set(fh.keys())
    assert not any("lora" in k for k in saved)  # the attacked model holds the attacker's weights only
