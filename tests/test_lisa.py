"""Lisa (defences/lisa.py) on the real tiny-llama: the bi-state schedule it claims, the proximal term
rho/2 ||w - w_anchor||^2 by hand with the anchor at each switch, and the attack-time hook through the
shared training loop (``intercept_training``), in the pipeline too."""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS, flat
from typer.testing import CliRunner

from defences.lisa import (
    ALIGNMENT_FILE,
    LisaParams,
    LisaSchedule,
    during_attack,
    lisa,
    proximal_term,
    state_at,
)
from harness.cli import app
from harness.context import StageContext
from harness.data.readers import DataAccess
from harness.data.records import QA
from harness.data.tokenization import encode_sft
from harness.errors import HarnessError
from harness.models.loading import LoadedModel
from harness.train.loop import intercept_training
from harness.train.sft import SFTSettings, causal_lm_loss, fine_tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ctx_for(tmp_path: Path, data: DataAccess) -> StageContext:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return StageContext(seed=0, device="cpu", dtype="float32", data=data, cache_dir=tmp_path, workdir=workdir,
                        prompt_format="chat")


def test_the_schedule_starts_aligned_and_alternates_k1_then_k2():
    assert "".join(state_at(s, 2, 3)[0] for s in range(12)) == "aafffaafffaa"
    assert "".join(state_at(s, 100, 900)[0] for s in (0, 99, 100, 999, 1000, 1099, 1100)) == "aaffaaf"


def test_the_proximal_term_by_hand():
    w = [torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    anchor = [torch.tensor([0.0, 1.0]), torch.tensor([[2.0]])]
    term = proximal_term(w, anchor, rho=0.5)
    # 0.5 / 2 * ((1 - 0)^2 + (-2 - 1)^2 + (0.5 - 2)^2) = 0.25 * 12.25
    assert term.item() == pytest.approx(3.0625)
    term.backward()  # its gradient: rho (w - anchor)
    assert w[0].grad.tolist() == pytest.approx([0.5, -1.5]) and w[1].grad.item() == pytest.approx(-0.75)


def test_through_the_shared_loop_the_states_batches_and_anchors_are_as_claimed(base, data, tmp_path):
    """An attack-like fine_tune of 7 steps inside the interceptor: user loss only in fine-tuning steps,
    alignment batches of the user's batch size, and every step's proximal term equal to rho/2 ||w - anchor||^2
    with the anchor taken at the step where the state began."""
    model = copy.deepcopy(base.model)
    params = LisaParams(rho=2.0, alignment_steps=2, finetune_steps=3, max_length=40)
    alignment = [encode_sft(base.tokenizer, p.prompt, p.harmless, "chat", 40, False)
                 for p in data.pairs("jbb-pairs", n=5)]
    schedule = LisaSchedule(params, alignment, base.tokenizer.eos_token_id, seed=0)
    user_calls: list[int] = []
    seen: list[tuple[int, list[torch.Tensor], dict]] = []

    def user_loss(m, batch):
        user_calls.append(len(batch["input_ids"]))
        return causal_lm_loss(m, batch)

    def recorder(run, loss_fn):  # entered inside Lisa's, so it wraps Lisa's loss and sees its weights and terms
        def record(m, batch):
            weights = [p.detach().clone() for p in run.parameters]
            loss, terms = loss_fn(m, batch)
            seen.append((run.step, weights, terms))
            return loss, terms
        return record

    records = [QA(p.prompt, p.harmful) for p in data.pairs("jbb-pairs", n=14)]
    settings = SFTSettings(lr=1e-3, batch_size=2, max_length=40, warmup_ratio=0.0, schedule="constant")
    with ExitStack() as stack:
        stack.enter_context(intercept_training(schedule))
        stack.enter_context(intercept_training(recorder))
        report = fine_tune(model, base.tokenizer, records, settings, ctx_for(tmp_path, data), "attack",
                           loss_fn=user_loss)

    states = [state_at(step, 2, 3) for step, _, _ in seen]
    assert "".join(s[0] for s in states) == "aafffaa" and [s for s, _, _ in seen] == list(range(7))
    assert user_calls == [2, 2, 2]  # the attack's own batches in its three fine-tuning steps only
    assert [r["alignment_state"] for r in report.history] == [1, 1, 0, 0, 0, 1, 1]
    assert schedule.runs == [{"description": "attack", "alignment_steps": 4, "finetune_steps": 3}]
    starts = {0: 0, 1: 0, 2: 2, 3: 2, 4: 2, 5: 5, 6: 5}  # the step each state began at
    for step, weights, terms in seen:
        anchor = seen[starts[step]][1]
        by_hand = 2.0 / 2 * sum(((w - a) ** 2).sum() for w, a in zip(weights, anchor)).item()
        assert terms["proximal"].item() == pytest.approx(by_hand, rel=1e-4, abs=1e-9), step
    assert seen[0][2]["proximal"].item() == 0.0 and seen[1][2]["proximal"].item() > 0


@pytest.mark.parametrize("after, nonzero", [(0.0, [False, True, False, True]), (0.5, [False, False, False, True])])
def test_proximal_after_delays_the_term(base, data, tmp_path, after, nonzero):
    """4 steps, states of 2: the term is 0 at each state's first step; with proximal_after=0.5 (the released
    code's warm-up, here half the run) also at step 1."""
    model = copy.deepcopy(base.model)
    params = LisaParams(rho=1.0, alignment_steps=2, finetune_steps=2, max_length=40, proximal_after=after)
    alignment = [encode_sft(base.tokenizer, p.prompt, p.harmless, "chat", 40, False)
                 for p in data.pairs("jbb-pairs", n=3)]
    records = [QA(p.prompt, p.harmful) for p in data.pairs("jbb-pairs", n=8)]
    settings = SFTSettings(lr=1e-3, batch_size=2, max_length=40, warmup_ratio=0.0, schedule="constant")
    with intercept_training(LisaSchedule(params, alignment, base.tokenizer.eos_token_id, seed=0)):
        report = fine_tune(model, base.tokenizer, records, settings, ctx_for(tmp_path, data), "attack")
    assert [r["proximal"] > 0 for r in report.history] == nonzero


def test_the_interceptor_sees_optimizer_steps_and_leaves_no_trace(base, data, tmp_path):
    """run.step counts optimizer steps under gradient accumulation; outside the block (also after an error
    inside it) ``train`` uses its own loss function again."""
    from harness.train.loop import _INTERCEPTORS

    records = [QA(p.prompt, p.harmful) for p in data.pairs("jbb-pairs", n=10)]
    settings = SFTSettings(lr=1e-3, batch_size=2, grad_accum=2, max_length=40, warmup_ratio=0.0)
    steps: list[int] = []

    def spy(run, loss_fn):
        assert run.total_steps == 3 and run.grad_accum == 2 and run.description == "attack"
        return lambda m, b: (steps.append(run.step), loss_fn(m, b))[1]

    with intercept_training(spy):
        fine_tune(copy.deepcopy(base.model), base.tokenizer, records, settings, ctx_for(tmp_path, data), "attack")
    assert steps == [0, 0, 1, 1, 2]  # 5 micro-batches, 3 optimizer steps (the last one short)
    with pytest.raises(RuntimeError, match="boom"):
        with intercept_training(spy):
            raise RuntimeError("boom")
    assert _INTERCEPTORS.get() == ()
    fine_tune(copy.deepcopy(base.model), base.tokenizer, records, settings, ctx_for(tmp_path, data), "attack")
    assert len(steps) == 5


def test_the_hook_needs_its_file_and_a_training_loop(base, data, tmp_path):
    model = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.ref, base.fingerprint)
    params = LisaParams(num_pairs=4, max_length=40, alignment_sft=False)
    with pytest.raises(HarnessError, match="lisa_alignment.json is missing"):
        with during_attack(model, params, tmp_path / "nowhere"):
            pass
    ctx = ctx_for(tmp_path, data)
    trained = lisa(model, params, ctx)
    assert trained.model is None  # no alignment stage asked for: the defended model is the base
    stored = json.loads((ctx.workdir / ALIGNMENT_FILE).read_text())
    assert len(stored["records"]) == 4 and stored["prompt_format"] == "chat" and stored["seed"] == 0
    with pytest.raises(HarnessError, match="ran no training loop"):
        with during_attack(model, params, ctx.workdir):
            pass  # an "attack" that trains nothing through the harness


@pytest.mark.parametrize("defence", ["lisa", "t-vaccine"])
def test_pairs_named_by_a_qa_set_stop_before_any_stage(tmp_path, defence):
    argv = ["run", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs"),
            "--model", "tiny-llama", "--defence", defence, "--set", "defence.pairs=beavertails-unsafe"]
    result = CliRunner().invoke(app, argv + [a for s in TINY_SETS for a in ("--set", s)])
    assert result.exit_code == 2, result.output
    assert "holds qa, but pairs are needed" in flat(result.output) and "defence.params.pairs" in flat(result.output)
    assert not list((tmp_path / "cache").glob("stages/*/stage.json"))


def test_a_tiny_pipeline_runs_lisa_around_the_attack(tmp_path):
    argv = ["run", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs"),
            "--model", "tiny-llama", "--defence", "lisa", "--attack", "full-ft", "--no-reference",
            "--set", "defence.num_pairs=4", "--set", "defence.max_length=40",
            "--set", "defence.alignment_steps=1", "--set", "defence.finetune_steps=1"]
    result = CliRunner().invoke(app, argv + [a for s in TINY_SETS for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    stages = results["stages"]
    assert stages["attack"]["cached"] is False and stages["defend"]["plugin"] == "lisa"
