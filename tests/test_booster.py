"""Booster (defences/booster.py): its lambda-term is the explicit two-pass computation of the paper's
update, checked on the real tiny-llama against a hand-made copy whose weights are moved in place."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS, flat
from typer.testing import CliRunner

from defences.booster import BoosterParams, booster, booster_loss, collate_booster
from harness.cli import app
from harness.context import StageContext
from harness.data.tokenization import encode_sft
from harness.models.loading import LoadedModel
from harness.train.sft import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def batch(base, data) -> dict[str, torch.Tensor]:
    examples = [{side: encode_sft(base.tokenizer, p.prompt, getattr(p, side), "chat", 40, False)
                 for side in ("harmless", "harmful")} for p in data.pairs("jbb-pairs", n=3)]
    return collate_booster(examples, base.tokenizer.eos_token_id, mask_padding=True)


def side(batch: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: batch[f"{name}_{k}"] for k in ("input_ids", "attention_mask", "labels")}


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_the_lambda_term_is_the_explicit_two_pass_computation(base, batch):
    lam, alpha = 5.0, 0.1
    model = copy.deepcopy(base.model).train()
    loss, terms = booster_loss(model, batch, lam=lam, alpha=alpha)
    got = grads_of(model, loss)

    # By hand: g_h at w; move a copy's weights to w - alpha g_h / ||g_h|| in place; g_h' there; g_f at w.
    hand = copy.deepcopy(base.model).train()
    h = causal_lm_loss(hand, side(batch, "harmful"))
    g_h = grads_of(hand, h)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    moved = copy.deepcopy(hand)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), g_h):
            p -= alpha * g / norm
    h_after = causal_lm_loss(moved, side(batch, "harmful"))
    g_h_after = grads_of(moved, h_after)
    f = causal_lm_loss(hand, side(batch, "harmless"))
    g_f = grads_of(hand, f)

    assert norm > 0 and h_after < h  # a real step: the harmful loss does drop
    # A difference of two ~11-nat float32 losses: equal to float32 resolution (ulp ~1e-6).
    assert terms["harmful_reduction"].item() == pytest.approx((h - h_after).item(), abs=1e-5)
    assert loss.item() == pytest.approx((f + lam * (h - h_after)).item(), rel=1e-5)
    for name_grad, (a, b, c, d) in zip(model.named_parameters(), zip(got, g_f, g_h, g_h_after)):
        expected = b + lam * (c - d)
        assert torch.allclose(a, expected, rtol=1e-4, atol=1e-7), name_grad[0]
    # The lambda-term is not negligible here: without it the gradient would be different.
    assert max((a - b).abs().max().item() for a, b in zip(got, g_f)) > 1e-4
    # The model's own weights were never written (pass 2 ran on a functional copy).
    for p, q in zip(model.parameters(), base.model.parameters()):
        assert torch.equal(p, q)


def test_lambda_zero_is_plain_refusal_sft(base, batch):
    model = copy.deepcopy(base.model).train()
    loss, _ = booster_loss(model, batch, lam=0.0, alpha=0.1)
    got = grads_of(model, loss)
    hand = copy.deepcopy(base.model).train()
    expected = grads_of(hand, causal_lm_loss(hand, side(batch, "harmless")))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(got, expected))


def test_the_recipe_trains_and_records_its_terms(base, data, tmp_path):
    model = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.ref, base.fingerprint)
    params = BoosterParams(num_pairs=8, batch_size=4, max_length=40, lr=1e-3, warmup_ratio=0.0, schedule="constant")
    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=data, cache_dir=tmp_path, workdir=tmp_path,
                       prompt_format="chat")
    trained = booster(model, params, ctx)
    history = trained.report["booster_history"]
    assert len(history) == 2 and trained.report["booster_training"]["pairs"] == 8
    for record in history:
        assert record["loss"] == pytest.approx(record["alignment_loss"] + 5.0 * record["harmful_reduction"], rel=1e-4)
    changed = [not torch.equal(p, q) for p, q in zip(model.model.parameters(), base.model.parameters())]
    assert all(changed)


def test_pairs_named_by_a_qa_set_stop_before_any_stage(tmp_path: Path):
    argv = ["run", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs"),
            "--model", "tiny-llama", "--defence", "booster", "--set", "defence.pairs=beavertails-unsafe"]
    result = CliRunner().invoke(app, argv + [a for s in TINY_SETS for a in ("--set", s)])
    assert result.exit_code == 2, result.output
    assert "holds qa, but pairs are needed" in flat(result.output) and "defence.params.pairs" in flat(result.output)
    assert not list((tmp_path / "cache").glob("stages/*/stage.json"))
