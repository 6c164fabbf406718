"""TAR on the tiny model: the DPO and entropy losses against explicit formulas, the first-order outer
gradient for K = 1 against a hand computation (Adam's first step written out), the inner loop leaving
nothing behind, and the refusals of bad settings."""

from __future__ import annotations

import gc
import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from defences.tar import (
    TARParams,
    TARStreams,
    dpo_loss,
    max_entropy_loss,
    schedule_weight,
    simulated_attack_grads,
    tar_loss,
)
from harness.data.tokenization import collate_sft
from harness.errors import ConfigError
from harness.registry import defences

sys.path.insert(0, str(Path(__file__).parent))
from test_repnoise import EOS, VOCAB, hook_count, pair_batch, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sft_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in (7, 5, 9):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist() + [EOS]
        examples.append({"input_ids": ids, "labels": list(ids)})
    return collate_sft(examples, EOS, mask_padding=True)


def tr_batch() -> dict[str, torch.Tensor]:
    batch = pair_batch(seed=5)
    batch["ref_chosen"] = torch.tensor([-30.0, -12.5, -20.0], dtype=torch.float64)
    batch["ref_rejected"] = torch.tensor([-25.0, -14.0, -21.0], dtype=torch.float64)
    return batch


def answer_logp(model, ids: torch.Tensor, attention: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """log p of each row's tokens from its first difference with ``other`` on, one token at a time."""
    logits = model(input_ids=ids, attention_mask=attention).logits
    out = []
    for row in range(ids.shape[0]):
        first = int((ids[row] != other[row]).nonzero()[0])
        total = torch.zeros((), dtype=logits.dtype)
        for t in range(max(first, 1), int(attention[row].sum())):
            total = total + torch.log_softmax(logits[row, t - 1], -1)[ids[row, t]]
        out.append(total)
    return torch.stack(out)


def test_dpo_loss_matches_the_formula_token_by_token():
    model, batch = tiny_llama(dtype=torch.float64), tr_batch()
    c = answer_logp(model, batch["harmless_input_ids"], batch["harmless_attention_mask"], batch["harmful_input_ids"])
    r = answer_logp(model, batch["harmful_input_ids"], batch["harmful_attention_mask"], batch["harmless_input_ids"])
    beta = 0.1
    expected = -F.logsigmoid(beta * ((c - r) - (batch["ref_chosen"] - batch["ref_rejected"]))).mean()
    torch.testing.assert_close(dpo_loss(model, batch, beta), expected, rtol=1e-10, atol=1e-12)


def test_max_entropy_loss_is_minus_the_mean_entropy_over_the_harmful_answer():
    model, batch = tiny_llama(dtype=torch.float64), tr_batch()
    harmful, harmless = batch["harmful_input_ids"], batch["harmless_input_ids"]
    logits = model(input_ids=harmful, attention_mask=batch["harmful_attention_mask"]).logits
    entropies = []
    for row in range(harmful.shape[0]):
        first = int((harmful[row] != harmless[row]).nonzero()[0])
        for t in range(first, int(batch["harmful_attention_mask"][row].sum())):
            p = torch.softmax(logits[row, t - 1], -1)
            entropies.append(-(p * p.log()).sum())
    torch.testing.assert_close(max_entropy_loss(model, batch), -torch.stack(entropies).mean(), rtol=1e-10, atol=1e-12)


def test_weighting_schedule_is_the_codes():
    params = TARParams(inner_steps=8, schedule_lambda=0.0625)
    assert schedule_weight(7, 8, params) == 1.0
    assert schedule_weight(0, 8, params) == pytest.approx(math.exp(-0.0625 * 7))
    assert schedule_weight(3, 8, params.model_copy(update={"weighting_schedule": False})) == 1 / 8


@pytest.mark.parametrize("tr", ["dpo", "max_entropy"])
def test_outer_gradient_for_one_inner_step_equals_the_hand_computation(tr):
    """K = 1, one attack: grad = retain_scale * grad L_retain(theta) + tr_scale * grad L_TR(theta_1), with
    theta_1 = AdamW's first step from theta (decoupled decay 0.01, then lr * g / (|g| + eps))."""
    model = tiny_llama(dtype=torch.float64)
    batch, adversary, retain = tr_batch(), sft_batch(1), sft_batch(2)
    lr = 1e-2
    params = TARParams(tr_loss=tr, inner_steps=1, num_tasks=1, inner_lrs=[lr], tr_scale=0.7, retain_scale=1.3)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(weights, fn, *args):
        return fn(lambda **kw: functional_call(model, weights, args=(), kwargs=kw), *args)

    def ce(forward, b):
        logits = forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)

    def tr_fn(forward, b):
        class Wrapped(torch.nn.Module):
            def forward(self, **kw):
                return forward(**kw)
        return dpo_loss(Wrapped(), b, params.dpo_beta) if tr == "dpo" else max_entropy_loss(Wrapped(), b)

    leaves = {n: t.clone().requires_grad_() for n, t in theta.items()}
    g_adv = dict(zip(names, torch.autograd.grad(loss_at(leaves, ce, adversary), [leaves[n] for n in names])))
    theta_1 = {n: theta[n] * (1 - lr * 0.01) - lr * g_adv[n] / (g_adv[n].abs() + 1e-8) for n in names}
    leaves_1 = {n: t.clone().requires_grad_() for n, t in theta_1.items()}
    g_tr = torch.autograd.grad(loss_at(leaves_1, tr_fn, batch), [leaves_1[n] for n in names])
    leaves = {n: t.clone().requires_grad_() for n, t in theta.items()}
    g_retain = torch.autograd.grad(loss_at(leaves, ce, retain), [leaves[n] for n in names])
    expected = {n: 1.3 * gr + 0.7 * 1.0 * gt for n, gr, gt in zip(names, g_retain, g_tr)}  # w_0 = exp(0) = 1

    streams = TARStreams(retain=iter([retain]), adversary=iter([adversary]), rng=random.Random(0))
    total, terms = tar_loss(model, batch, params=params, streams=streams)
    total.backward()
    # the value is the retain term alone; causal_lm_loss scores in float32, hence the float32 tolerances
    torch.testing.assert_close(total.detach().float(), 1.3 * terms["retain"], rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)
        assert torch.equal(p.detach(), theta[n])  # the step itself is the shared loop's


def live_optimizers_over(model: torch.nn.Module) -> int:
    params = {id(p) for p in model.parameters()}
    gc.collect()
    with warnings.catch_warnings():  # isinstance over every live object touches deprecated module attributes
        warnings.simplefilter("ignore")
        optimizers = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
    return sum(1 for o in optimizers if any(id(p) in params for group in o.param_groups for p in group["params"]))


def test_the_inner_loop_leaves_no_hooks_grads_weights_or_optimizer_state_behind():
    model, batch = tiny_llama(), tr_batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # an accumulating outer step's gradient so far
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = hook_count(model)
    attacks = [(1e-2, [sft_batch(1), sft_batch(3)]), (1e-3, [sft_batch(4), sft_batch(5)])]
    grads, stats = simulated_attack_grads(model, batch, attacks, TARParams(inner_steps=2))
    assert live_optimizers_over(model) == 0
    assert hook_count(model) == hooks
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(p.grad, torch.full_like(p, 0.5)), n
        assert p.requires_grad == flags[n]
    assert all(g.abs().sum() > 0 for g in grads.values()) and math.isfinite(stats["tr_loss"])

    bad = [(1e-2, [sft_batch(1), {"input_ids": None}])]  # the second step fails after the first moved the weights
    with pytest.raises(Exception):
        simulated_attack_grads(model, batch, bad, TARParams(inner_steps=2))
    assert live_optimizers_over(model) == 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_bad_settings_are_refused_before_any_work():
    plugin = defences.get("tar")
    with pytest.raises(ConfigError, match="inner_steps.*at least one simulated attack step"):
        plugin.parse_params({"inner_steps": 0}, "defence.params")
    with pytest.raises(ConfigError, match="inner_lrs"):
        plugin.parse_params({"inner_lrs": [1e-5, 0.0]}, "defence.params")
    with pytest.raises(ConfigError, match="tr_loss"):
        plugin.parse_params({"tr_loss": "entropy"}, "defence.params")


def test_tar_runs_in_the_pipeline_with_the_random_mapping_safeguard(tiny_run_config):
    from harness.run.runner import execute

    config = tiny_run_config("defence.num_pairs=4", "defence.batch_size=2", "defence.max_length=48",
                             "defence.inner_steps=2", "defence.num_tasks=2", "defence.initial_safeguard_steps=1",
                             "defence.retain.num_samples=4", "defence.lr=1e-3",
                             defence={"name": "tar"}, attack={"name": "full-ft"}, compare_undefended=False)
    results, _ = execute(config)
    info = results["stages"]["defend"]["info"]
    assert info["tar_training"]["steps"] == 2 and info["tar_random_mapping"]["steps"] == 1
    for step in info["tar_history"]:
        assert {"retain", "tr_loss", "adversary_loss"} <= set(step) and math.isfinite(step["tr_loss"])


@pytest.mark.parametrize("setting, message", [
    ("defence.pairs=beavertails-unsafe", "defence.params.pairs: Data set 'beavertails-unsafe' holds qa, but pairs"),
    ("defence.retain.dataset=jbb-pairs", "defence.params.retain.dataset: Data set 'jbb-pairs' holds pairs, but qa"),
])
def test_data_sets_of_the_wrong_kind_are_refused_before_the_first_stage(tiny_run_config, setting, message):
    from harness.errors import DataError
    from harness.run.pipeline import Pipeline

    with pytest.raises(DataError, match=message):
        Pipeline(tiny_run_config(setting, defence={"name": "tar"}))
