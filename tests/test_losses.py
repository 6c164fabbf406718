"""harness.train.losses against formulas: MMD, the RepNoise position mask, masked CE and the chunked head CE."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from harness.data.tokenization import collate_pairs
from harness.train.losses import (
    MMD_BANDWIDTH_FACTORS,
    head_ce,
    head_ce_sums,
    masked_ce,
    masked_head_ce,
    mmd,
    position_mask,
    shift_targets,
)

EOS = 2


def explicit_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PAPER.md §3 word for word: explicit pairwise differences, no Gram trick."""
    z = torch.cat([x.flatten(1), y.flatten(1)]).double()
    n = z.shape[0]
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    m = d2.detach().sum() / (n * n - n)
    k = sum(torch.exp(-d2 / (m * f)) for f in MMD_BANDWIDTH_FACTORS)
    b = x.shape[0]
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


# --- MMD ---------------------------------------------------------------------------------------


def test_mmd_of_a_sample_with_itself_is_zero():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    assert abs(mmd(x, x).item()) < 1e-5


def test_mmd_is_positive_for_shifted_gaussians_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    same = mmd(x, y).item()
    shifted = mmd(x, y + 1.0).item()
    far = mmd(x, y + 3.0).item()
    assert 0 < same < shifted < far


def test_mmd_two_points_matches_hand_formula():
    # n = 2 points, D² = [[0, d], [d, 0]], m = 2d / (4 - 2) = d, so every cross kernel is
    # sum_f exp(-1/f) whatever d is, and MMD = K_xx + K_yy - 2 K_xy = 10 - 2 sum_f exp(-1/f).
    expected = 10 - 2 * sum(math.exp(-1 / f) for f in (0.25, 0.5, 1, 2, 4))
    for x, y in ([[0.0, 0.0]], [[3.0, 4.0]]), ([[1.0]], [[-7.5]]):
        assert mmd(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-6)


def test_mmd_matches_a_hand_loop_over_kernel_entries():
    x = [[0.0, 1.0], [2.0, 0.0]]
    y = [[1.0, 1.0], [0.0, -1.0]]
    points = x + y
    d2 = [[sum((a - b) ** 2 for a, b in zip(p, q)) for q in points] for p in points]
    m = sum(map(sum, d2)) / (4 * 4 - 4)
    k = [[sum(math.exp(-v / (m * f)) for f in (0.25, 0.5, 1, 2, 4)) for v in row] for row in d2]
    expected = sum(k[i][j] + k[2 + i][2 + j] - k[i][2 + j] - k[2 + i][j] for i in range(2) for j in range(2)) / 4
    assert mmd(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-6)


def test_mmd_value_and_gradient_match_explicit_pairwise_with_detached_bandwidth():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * 1.5
    fast = mmd(x, y)
    (grad_fast,) = torch.autograd.grad(fast, x)
    ref = explicit_mmd(x, y)
    (grad_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-8, atol=1e-10)


def test_mmd_is_computed_in_float32_for_bfloat16_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g).bfloat16()
    y = (torch.randn(4, 64, generator=g) + 0.5).bfloat16()
    out = mmd(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mmd(x.float(), y.float()))


def test_mmd_of_all_zero_inputs_is_zero_not_nan():
    x = torch.zeros(3, 10, requires_grad=True)
    out = mmd(x, torch.zeros(3, 10))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all()


def test_mmd_rejects_unequal_sample_sizes():
    with pytest.raises(ValueError, match="same number of points"):
        mmd(torch.zeros(2, 3), torch.zeros(3, 3))


# --- the position mask ---------------------------------------------------------------------------


def test_position_mask_is_positionwise_inequality():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 5, (3, 9), generator=g)
    b = torch.randint(0, 5, (3, 9), generator=g)
    mask = position_mask(a, b)
    assert mask.dtype == torch.bool
    assert all(mask[i, t] == (a[i, t] != b[i, t]) for i in range(3) for t in range(9))


def test_position_mask_padding_cases_of_the_paper():
    prompt = [10, 11, 12]
    batch = collate_pairs(
        [
            # harmful longer: tail where harmless is EOS padding is IN the mask
            {"harmful": prompt + [20, 21, 22, EOS], "harmless": prompt + [30, EOS]},
            # harmless longer: tail where harmful is padding is IN as well
            {"harmful": prompt + [40, EOS], "harmless": prompt + [50, 51, 52, 53, EOS]},
            # an answer token equal at the same position is OUT
            {"harmful": prompt + [60, 61, EOS], "harmless": prompt + [70, 61, EOS]},
        ],
        pad_id=EOS,
    )
    mask = position_mask(batch["harmful_input_ids"], batch["harmless_input_ids"]).int().tolist()
    assert mask[0] == [0, 0, 0, 1, 1, 1, 0, 0]  # 20/30, 21/EOS, 22/pad differ; EOS/pad and pad/pad equal
    assert mask[1] == [0, 0, 0, 1, 1, 1, 1, 0]  # harmful EOS + pads vs 51, 52, 53; final EOS == pad
    assert mask[2] == [0, 0, 0, 1, 0, 0, 0, 0]  # 61 == 61 and EOS == EOS are out
    assert not position_mask(batch["harmful_input_ids"], batch["harmful_input_ids"]).any()


def test_position_mask_needs_equal_shapes():
    with pytest.raises(ValueError, match="same shape|one shape"):
        position_mask(torch.zeros(2, 3), torch.zeros(2, 4))


# --- masked CE ---------------------------------------------------------------------------------


def test_shift_targets_scores_position_t_from_t_minus_one_and_skips_t0():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[1, 0, 1, 1]])
    targets = shift_targets(ids, mask)
    assert targets.position.tolist() == [1, 2]
    assert targets.ids.tolist() == [7, 8]


def test_masked_ce_matches_hand_computation():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, generator=g)
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    mask = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0]])
    picked = [(0, 1), (0, 3), (1, 1), (1, 2)]  # (row, target t); (1, 0) has no predictor
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]] for b, t in picked]
    assert masked_ce(logits, ids, mask).item() == pytest.approx(sum(terms).item() / len(terms), rel=1e-6)


def test_masked_ce_of_an_empty_mask_is_an_attached_zero():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    out = masked_ce(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    out.backward()
    assert out.item() == 0.0 and logits.grad is not None


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
@pytest.mark.parametrize("bias", [False, True])
def test_masked_head_ce_equals_full_logits_path_values_and_gradients(chunk_rows, bias):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=bias).double()
    norm = torch.nn.RMSNorm(8, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.4

    def grads(loss):
        return torch.autograd.grad(loss, [hidden, head.weight, norm.weight] + ([head.bias] if bias else []))

    fast = masked_head_ce(hidden, ids, mask, head, norm, chunk_rows=chunk_rows)
    ref = masked_ce(head(norm(hidden)), ids, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(fast), grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_head_ce_passes_gradcheck_with_non_uniform_upstream_gradients():
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (5,), generator=g)
    scale = torch.arange(1.0, 6.0, dtype=torch.float64)  # each row gets a different upstream gradient

    def loss(r, w, b):
        return (head_ce(r, targets, SimpleNamespace(weight=w, bias=b), chunk_rows=2) * scale).sum()

    assert torch.autograd.gradcheck(loss, (rows, weight, bias))


def test_head_ce_sums_weighted_groups_pass_gradcheck_under_a_nonlinear_upstream():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ta, tb = torch.randint(0, 7, (4,), generator=g), torch.randint(0, 7, (5,), generator=g)
    wb = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)

    def loss(a, b, weight, bias):
        head = SimpleNamespace(weight=weight, bias=bias)
        sums = head_ce_sums([(a, ta, 0.25), (b, tb, wb)], head, chunk_rows=2)
        return 3.0 * sums[0] - torch.log(sums[1] + 1.0)

    assert torch.autograd.gradcheck(loss, (a, b, weight, bias))
    sums = head_ce_sums([(a, ta, 0.25), (b, tb, wb)], SimpleNamespace(weight=weight, bias=bias))
    per_a = F.cross_entropy(F.linear(a, weight, bias), ta, reduction="none")
    per_b = F.cross_entropy(F.linear(b, weight, bias), tb, reduction="none")
    torch.testing.assert_close(sums, torch.stack([per_a.mean(), (per_b * wb).sum()]))


def test_head_ce_sums_handles_an_empty_group():
    head = torch.nn.Linear(3, 5, bias=False)
    rows = torch.randn(2, 3, requires_grad=True)
    sums = head_ce_sums([(rows[:0], torch.zeros(0, dtype=torch.long), 1.0), (rows, torch.tensor([1, 4]), 0.5)], head)
    sums.sum().backward()
    assert sums[0].item() == 0.0 and rows.grad is not None


def test_head_ce_in_bfloat16_returns_float32_close_to_float32_path():
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(9, 16, generator=g)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (9,), generator=g)
    ref = F.cross_entropy(head(rows), targets, reduction="none")
    out = head_ce(rows.bfloat16(), targets, head.bfloat16(), chunk_rows=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
