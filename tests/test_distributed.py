"""Sharded (FSDP2) training on 2 gloo processes against the single-process run: per-step losses of the real
recipes (full-ft SFT, RepNoise, LoRA) within 1e-5 and the trained weights alike; gradient checkpointing and
float32 master weights; clear errors before any work. The tiny random Llama keeps it to seconds of compute
(most of the time is two processes importing torch)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from rich.console import Console

from harness.context import StageContext
from harness.errors import ConfigError, HarnessError
from harness.files.paths import resolve_data_dir
from harness.models.loading import LoadedModel, make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 3
RECIPES = ("full-ft", "repnoise", "repnoise-released", "repnoise-checkpointed", "lora", "full-ft-bf16")
PLUGIN = {"repnoise-released": "repnoise", "repnoise-checkpointed": "repnoise", "full-ft-bf16": "full-ft"}
# 10 examples in batches of 4: the last micro-batch has 2 rows; clipping runs on sharded (DTensor) gradients
# in full-ft. RepNoise takes 11 pairs, so its last micro-batch (3 rows) splits unevenly, 2 + 1: its gathered
# MMD rows are ragged. The released-code flags make whole-batch target counts differ from scored ones.
SETTINGS = {
    "full-ft": {"num_samples": 10, "max_length": 40, "batch_size": 4, "lr": 1e-3, "max_grad_norm": 0.5},
    "repnoise": {"num_pairs": 11, "max_length": 128, "batch_size": 4, "lr": 1e-3},
    "repnoise-released": {"num_pairs": 11, "max_length": 128, "batch_size": 4, "lr": 1e-3,
                          "drop_target_id_0": True, "mask_offset": True, "double_final_norm": True},
    # the noise MMD gathers rows inside a hook of a checkpointed layer; the recomputation must not gather again
    "repnoise-checkpointed": {"num_pairs": 11, "max_length": 128, "batch_size": 4, "lr": 1e-3,
                              "gradient_checkpointing": True},
    "lora": {"num_samples": 10, "max_length": 40, "batch_size": 4, "lr": 1e-2, "rank": 4},
    # bf16 weights with float32 master weights and optimizer state (sharded: float32 shards, bf16 compute)
    "full-ft-bf16": {"num_samples": 10, "max_length": 40, "batch_size": 4, "lr": 1e-3, "fp32_optimizer": True},
}
TOLERANCE = {"full-ft-bf16": 1e-3}  # bf16 compute: gradients reduced in float32 across ranks, in bf16 in one process


def train_recipe(name: str, workdir: Path) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Run a registered recipe on a fresh tiny Llama; (per-step history, trained weights)."""
    import attacks  # noqa: F401  (registers)
    import defences  # noqa: F401
    from harness.data.readers import DataAccess
    from harness.registry import attacks as attack_registry
    from harness.registry import defences as defence_registry

    model, tokenizer = make_tiny_llama(seed=0)
    if name.endswith("-bf16"):
        model = model.to(torch.bfloat16)
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "tiny")
    plugin_name = PLUGIN.get(name, name)
    registry = defence_registry if plugin_name == "repnoise" else attack_registry
    plugin = registry.get(plugin_name)
    params = plugin.parse_params(SETTINGS[name], name)
    ctx = StageContext(seed=SEED, device="cpu", dtype="float32", data=DataAccess(resolve_data_dir(), "advbench", SEED),
                       cache_dir=workdir, workdir=workdir, console=Console(quiet=True))
    if name.startswith("full-ft"):  # the recipe's body (full_ft reports only a summary; this keeps every step)
        from harness.train.sft import fine_tune

        history = fine_tune(model, tokenizer, ctx.data.qa(params.dataset, n=params.num_samples), params, ctx,
                            "attack: full-ft").history
        _write_stats(workdir, name, ctx)
        return history, {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = plugin.fn(loaded, params, ctx)
    _write_stats(workdir, name, ctx)
    report = trained.report
    weights = {k: v.detach().clone() for k, v in trained.model.model.state_dict().items()}
    if plugin_name == "repnoise":
        return report["repnoise_history"], weights
    summary = report["attack_training"]  # lora: first and last step (the weights check every step's effect)
    return [{"loss": summary["first_loss"]}, {"loss": summary["last_loss"]}], weights


def _write_stats(workdir: Path, name: str, ctx: StageContext) -> None:
    from harness.distributed.world import current

    if current() is None or current().is_writer:
        (workdir / f"{name}.stats.json").write_text(json.dumps(ctx.stats))


def _rank(rank: int, size: int, port: int, out: str) -> None:
    """One rank of the sharded runs; rank 0 writes what it trained (the single writer)."""
    from safetensors.torch import save_file

    from harness.distributed.world import joined

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    with joined(rank, size, rank, torch.device("cpu")):
        for name in RECIPES:
            history, weights = train_recipe(name, Path(out))
            if rank == 0:
                Path(out, f"{name}.json").write_text(json.dumps(history))
                save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(out, f"{name}.safetensors")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(_rank, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_two_gloo_ranks_match_one_process(name, sharded, tmp_path):
    from safetensors.torch import load_file

    single_history, single_weights = train_recipe(name, tmp_path)
    sharded_history = json.loads((sharded / f"{name}.json").read_text())
    sharded_weights = load_file(str(sharded / f"{name}.safetensors"))
    assert len(sharded_history) == len(single_history) >= 2
    for one, two in zip(single_history, sharded_history):
        for term in one:  # loss and, for RepNoise, S, N, G, log_G
            assert two[term] == pytest.approx(one[term], abs=TOLERANCE.get(name, 1e-5), rel=1e-5), term
    assert sharded_weights.keys() == single_weights.keys()
    moved = 0.0
    initial = make_tiny_llama(seed=0)[0].state_dict()
    for key, value in single_weights.items():
        assert sharded_weights[key].dtype == value.dtype  # bf16 stays bf16
        torch.testing.assert_close(sharded_weights[key].float(), value.float(), atol=TOLERANCE.get(name, 1e-5),
                                   rtol=1e-2 if name in TOLERANCE else 1e-5, msg=key)
        value = value.float()
        start = initial.get(key, torch.zeros_like(value) if "lora_B" in key else value)  # LoRA B starts at 0
        moved = max(moved, float((value - start).abs().max()))
    assert moved > 1e-4  # the recipe did train: equality is not two untouched models
    # every micro-batch (4, 4 and 2 rows) was split over the two ranks, RepNoise's too
    assert json.loads((sharded / f"{name}.stats.json").read_text())["split_micro_batches"] == 3
    assert "split_micro_batches" not in json.loads((tmp_path / f"{name}.stats.json").read_text())


def test_sft_and_repnoise_losses_run_data_parallel():
    """A renamed causal_lm_loss, or RepNoise's loss losing its mark, would silently fall back to every rank
    computing the whole batch."""
    from functools import partial

    from defences.repnoise import repnoise_loss
    from harness.distributed.global_batch import is_data_parallel_loss
    from harness.distributed.step import TOKEN_MEAN_LOSSES, _name
    from harness.train.sft import causal_lm_loss

    assert _name(causal_lm_loss) in TOKEN_MEAN_LOSSES
    assert _name(repnoise_loss) not in TOKEN_MEAN_LOSSES
    assert is_data_parallel_loss(partial(repnoise_loss, params=None)) and not is_data_parallel_loss(causal_lm_loss)
    batch = {"labels": torch.tensor([[5, 6, -100, -100], [7, 8, 9, 10]])}
    assert int(TOKEN_MEAN_LOSSES[_name(causal_lm_loss)](batch)) == 1 + 3  # next-token targets not ignored


def test_repnoise_history_comes_from_every_step(sharded):
    history = json.loads((sharded / "repnoise.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all({"S", "N", "G", "log_G"} <= set(h) for h in history)


# ----- gradient checkpointing and float32 master weights (single process) -----------------------------


def _pairs_batch(tokenizer, n: int = 3) -> dict[str, torch.Tensor]:
    from harness.data.tokenization import collate_pairs, encode_pair

    examples = [encode_pair(tokenizer, f"question {i}", "harmful " * (i + 1), "no " * (i + 2), "chat", 40)
                for i in range(n)]
    return collate_pairs(examples, pad_id=tokenizer.eos_token_id)


def test_gradient_checkpointing_keeps_repnoise_loss_and_gradients():
    from defences.repnoise import RepNoiseParams, repnoise_loss
    from harness.train.loop import _checkpointing

    model, tokenizer = make_tiny_llama(seed=0)
    model = model.double().train()
    batch = _pairs_batch(tokenizer)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total, terms = repnoise_loss(model, batch, RepNoiseParams(), torch.Generator().manual_seed(0))
        total.backward()
        return total.detach(), terms, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = loss_and_grads()
    with _checkpointing(model, True):
        assert model.is_gradient_checkpointing
        assert model.model.layers[0].gradient_checkpointing
        checkpointed = loss_and_grads()
    assert not model.is_gradient_checkpointing  # switched off again after the block
    torch.testing.assert_close(checkpointed[0], plain[0])
    for term in plain[1]:
        torch.testing.assert_close(checkpointed[1][term], plain[1][term], msg=term)
    assert plain[2]["model.layers.0.mlp.down_proj.weight"].abs().sum() > 0
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, msg=name)


def test_gradient_checkpointing_setting_trains_the_same_model(tmp_path):
    from harness.data.tokenization import collate_sft, encode_sft
    from harness.train.loop import TrainSettings, train
    from harness.train.sft import causal_lm_loss

    def run(**options) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
        model, tokenizer = make_tiny_llama(seed=0)
        examples = [encode_sft(tokenizer, f"q {i}", "answer " * (i + 1), "chat", 40, False) for i in range(6)]
        ctx = StageContext(seed=1, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path,
                           console=Console(quiet=True))
        report = train(model, examples, lambda b: collate_sft(b, tokenizer.eos_token_id, True), causal_lm_loss,
                       TrainSettings(lr=1e-3, batch_size=3, **options), ctx)
        return report.history, model.state_dict()

    plain, plain_weights = run()
    checkpointed, checkpointed_weights = run(gradient_checkpointing=True)
    assert [h["loss"] for h in checkpointed] == pytest.approx([h["loss"] for h in plain], abs=1e-6)
    for name, value in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[name], value, msg=name)


def test_memory_options_change_stage_keys_only_when_set():
    from attacks.full_ft import FullFTParams
    from harness.files.hashing import stable_hash

    default = FullFTParams()
    assert "gradient_checkpointing" not in default.model_dump(mode="json")  # keys made before these options hold
    assert stable_hash(default) == stable_hash(FullFTParams(gradient_checkpointing=False))
    assert stable_hash(FullFTParams(fp32_optimizer=True)) != stable_hash(default)
    assert FullFTParams(gradient_checkpointing=True).model_dump(mode="json")["gradient_checkpointing"] is True


def test_fp32_master_weights_track_float32_training_better_than_bf16(tmp_path):
    from harness.data.tokenization import collate_sft, encode_sft
    from harness.train.loop import TrainSettings, train
    from harness.train.sft import causal_lm_loss

    def run(dtype: torch.dtype, **options) -> dict[str, torch.Tensor]:
        model, tokenizer = make_tiny_llama(seed=0)
        model = model.to(dtype)
        examples = [encode_sft(tokenizer, f"q {i}", "answer " * (i + 1), "chat", 40, False) for i in range(8)]
        ctx = StageContext(seed=1, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path,
                           console=Console(quiet=True))
        train(model, examples, lambda b: collate_sft(b, tokenizer.eos_token_id, True), causal_lm_loss,
              TrainSettings(lr=3e-4, batch_size=2, warmup_ratio=0, schedule="constant", **options), ctx)
        assert all(p.dtype == dtype for p in model.parameters())  # the model keeps its dtype
        return {k: v.float() for k, v in model.state_dict().items()}

    reference = run(torch.float32)
    master = run(torch.bfloat16, fp32_optimizer=True)
    plain = run(torch.bfloat16)

    def distance(weights: dict[str, torch.Tensor]) -> float:
        return float(sum((weights[k] - reference[k]).pow(2).sum() for k in reference).sqrt())

    # bf16 Adam updates of 3e-4 vanish against bf16 rounding of weights ~0.02; the float32 master keeps them.
    assert distance(master) < 0.5 * distance(plain)


# ----- bad input: clear errors before any work ------------------------------------------------------------


def test_more_processes_than_devices_is_refused_before_work():
    from harness.distributed.launch import check_devices

    with pytest.raises(ConfigError, match=r"--nproc 4096 CPU processes on a machine with \d+ core"):
        check_devices("cpu", 4096)
    with pytest.raises(ConfigError, match="--nproc 0"):
        check_devices("cpu", 0)
    assert check_devices("cpu", 1).type == "cpu"


def test_cli_refuses_nproc_beyond_the_cores(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    result = CliRunner().invoke(app, ["run", "--model", "tiny-llama", "--cache-dir", str(tmp_path / "c"),
                                      "--output-dir", str(tmp_path / "r"), "--nproc", str((os.cpu_count() or 1) + 1)])
    assert result.exit_code == 2
    assert "CPU processes on a machine with" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_torch_without_distributed_is_a_clear_error(monkeypatch):
    """A torch build without torch.distributed (some macOS/Windows wheels) cannot shard: say so."""
    import torch.distributed as dist

    from harness.distributed.world import check_support

    check_support()  # this build has it
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(HarnessError, match="needs torch.distributed"):
        check_support()


# ----- the whole pipeline: harness run --nproc 2 ----------------------------------------------------------

RUN_SETS = ["attack.num_samples=8", "attack.max_length=48", "attack.lr=1e-3", "defence.num_pairs=8",
            "defence.max_length=128", "evaluate.harmfulness.num_prompts=4",
            "evaluate.harmfulness.generation.max_new_tokens=6",
            "evaluate.harmfulness.judges=[{name: refusal-keywords}]",
            "resources.keep_attacked_weights=true"]  # the test loads the attacked model from each cache


def _cli_run(tmp_path: Path, name: str, *extra: str) -> dict:
    from typer.testing import CliRunner

    from harness.cli import app

    args = ["run", "--model", "tiny-llama", "--defence", "repnoise", "--attack", "full-ft", "--no-reference",
            "--evaluate", "harmfulness", "--cache-dir", str(tmp_path / name / "cache"),
            "--output-dir", str(tmp_path / name / "runs"), *[a for s in RUN_SETS for a in ("--set", s)], *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (results,) = (tmp_path / name / "runs").glob("*/results.json")  # one run directory: rank 0 wrote it alone
    return json.loads(results.read_text())


@pytest.mark.slow
def test_harness_run_nproc_2_matches_one_process_and_its_model_loads(tmp_path):
    from harness.models.loading import load_saved

    single = _cli_run(tmp_path, "single")
    sharded = _cli_run(tmp_path, "sharded", "--nproc", "2")
    stages, sharded_stages = single["stages"], sharded["stages"]
    for label in ("defend", "attack"):
        assert sharded_stages[label]["key"] == stages[label]["key"]  # same content key: sharding is not a param
    histories = (stages["defend"]["info"]["repnoise_history"], sharded_stages["defend"]["info"]["repnoise_history"])
    for one, two in zip(*histories):
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    attack_key = stages["attack"]["key"]
    one = load_saved(tmp_path / "single" / "cache" / "stages" / attack_key / "model", device="cpu")
    two = load_saved(tmp_path / "sharded" / "cache" / "stages" / attack_key / "model", device="cpu")
    for (name, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    # evaluated as usual, by rank 0
    for when in ("pre_attack", "post_attack"):
        evaluated = sharded["summary"]["branches"]["defended"][when]["harmfulness"]
        assert evaluated["n"] == 4 and evaluated["judge"] == "refusal-keywords"
        assert evaluated["mean"] == single["summary"]["branches"]["defended"][when]["harmfulness"]["mean"]
    resumed = _cli_run(tmp_path, "sharded", "--nproc", "2")  # a re-run is served from rank 0's cache
    assert all(stage["cached"] for stage in resumed["stages"].values())
