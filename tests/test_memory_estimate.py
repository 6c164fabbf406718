"""The per-device memory estimate: exact parameter counts, hand-computed parts, early refusal with the
options that fit, and agreement with measured peaks of real training steps on CPU (within FACTOR)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import flat

from harness.errors import HarnessError
from harness.resources.memory import (
    ALL_LINEAR,
    GIB,
    SHAPES,
    ModelShape,
    TrainingPlan,
    check_fits,
    estimate,
    shape_for_ref,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
FACTOR = (0.5, 2.0)  # estimate / measured peak above the loaded model must lie in this range


def test_parameter_counts_match_real_models(tiny):
    model, _ = tiny
    assert shape_for_ref("tiny-llama").params == sum(p.numel() for p in model.parameters())
    assert SHAPES["llama-2-7b"].params == 6_738_415_616  # Llama-2-7b's published count
    assert SHAPES["smollm2-135m"].params == 134_515_008


def test_lora_trainable_count_matches_peft(tiny):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=list(ALL_LINEAR),
                                                                 task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape_for_ref("tiny-llama").lora_params(4, ALL_LINEAR) == trainable


def test_parts_by_hand():
    shape = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=100, tied=True)
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + 3 * 8*16 + 2*8 norms = 64+32+32+64+384+16 = 592
    assert shape.layer_params == 592 and shape.params == 2 * 592 + 100 * 8 + 8
    plan = TrainingPlan(batch_size=2, seq_len=3, optimizer="adamw")
    parts = estimate(shape, plan).parts
    assert parts["weights"] == parts["gradients"] == shape.params * 4
    assert parts["optimizer"] == 2 * shape.params * 4
    # 6 tokens x 2 layers x (8*8 + 2*4 + 4*16) values x 4 bytes; logits 6 x 100 x 3 x 4
    assert parts["activations"] == 6 * 2 * (64 + 8 + 64) * 4 and parts["logits"] == 6 * 100 * 3 * 4
    assert estimate(shape, plan.but(optimizer="sgd")).parts["optimizer"] == 0
    sharded = estimate(shape, plan.but(shards=2)).parts
    assert sharded["weights"] == shape.params * 4 / 2 + 2 * 592 * 4  # half, plus two gathered layers
    assert sharded["activations"] == parts["activations"] / 2  # the batch is split too
    bf16 = estimate(shape, plan.but(weight_bytes=2, state_bytes=4, master_weights=True)).parts
    assert bf16["weights"] == shape.params * 2 and bf16["optimizer"] == shape.params * (2 * 4 + 4)
    checkpointed = estimate(shape, plan.but(checkpointing=True)).parts
    assert checkpointed["activations"] == 6 * (2 * 8 * 4 + (64 + 8 + 64) * 4)  # inputs + one layer recomputed
    repnoise = estimate(shape, plan.but(stage="repnoise")).parts
    assert repnoise["activations"] == 2 * parts["activations"] and repnoise["repnoise_loss"] > 0


def test_7b_full_attack_on_a_24gb_card_is_refused_with_options():
    with pytest.raises(HarnessError) as caught:
        check_fits(SHAPES["llama-2-7b"], TrainingPlan(batch_size=4, seq_len=256, optimizer="adam"), 24 * GIB, "attack")
    message = flat(str(caught.value))
    assert "needs about 126 GiB" in message and "24 GiB is available" in message  # 111 + Adam step temporary
    assert "--nproc 8 sharded" in message
    fits_lora = check_fits(SHAPES["llama-2-7b"], TrainingPlan(4, 256, weight_bytes=2, lora_rank=8), 24 * GIB, "x")
    assert fits_lora.total < 24 * GIB


def test_a_run_that_cannot_fit_is_refused_before_any_stage(tiny_run_config, tmp_path):
    from harness.run.pipeline import Pipeline

    config = tiny_run_config("resources.device_memory_gb=0.01")
    with pytest.raises(HarnessError) as caught:
        Pipeline(config).run()
    assert "needs about" in flat(str(caught.value)) and "10.2 MiB is available" in flat(str(caught.value))
    assert not any((tmp_path / "cache" / "stages").glob("[0-9a-f]*"))  # nothing was built


def _measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"), *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ("--batch", "4", "--seq", "96"),
    ("--batch", "4", "--seq", "96", "--stage", "repnoise"),
    ("--batch", "4", "--seq", "96", "--lora-rank", "8", "--checkpointing"),
], ids=["sft", "repnoise", "lora-checkpointing"])
def test_estimate_matches_measured_peak_tiny(args):
    result = _measure("--model", "tiny-llama", *args)
    assert FACTOR[0] <= result["ratio"] <= FACTOR[1], result


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--batch", "2", "--seq", "64"),
                                  ("--batch", "2", "--seq", "64", "--stage", "repnoise")], ids=["sft", "repnoise"])
def test_estimate_matches_measured_peak_embedded(args):
    result = _measure("--model", "smollm2-135m-instruct", "--steps", "2", "--threads", "2", *args)
    assert FACTOR[0] <= result["ratio"] <= FACTOR[1], result
