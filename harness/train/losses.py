"""Loss plumbing shared by defences: masked next-token CE, a memory-lean CE through the LM head, MMD.

Mask convention (used everywhere here): a mask ``M[b, t]`` marks *target* positions. Position ``t``
is scored by the model's prediction made at ``t - 1``; position 0 is never a target (nothing
predicts it), so ``M[:, 0]`` is ignored. A masked CE is the mean of the per-target cross-entropies
over all targets with ``M = 1`` in the batch (one mean over tokens, not a mean of per-example means),
which is PAPER.md §3's "next-token cross-entropy averaged over target positions where M = 1".
An empty mask gives 0 (still attached to the graph), not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from harness.models.activations import decoder_parts

# Full-vocabulary rows one CE chunk may hold (float32): 2**24 elements = 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**24
# Bandwidth multipliers of the five Gaussian kernels of PAPER.md §3.
MMD_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def position_mask(harmful_ids: torch.Tensor, harmless_ids: torch.Tensor) -> torch.Tensor:
    """RepNoise's mask: ``M[b, t] = harmful_ids[b, t] != harmless_ids[b, t]`` (bool, [B, T]).

    Both sides must be padded to the same T with the same pad id (EOS). Intent: skip the shared
    prompt. Literal consequences (kept on purpose, as in the paper's code):
    - the mask runs from the first differing token to the end of the *longer* answer, so
      positions where one side is already padding (EOS) and the other still has text are in it
      (the shorter side is then trained/scored on predicting EOS padding there);
    - positions where both sides are padding are out (equal ids), so the padded length T changes
      nothing;
    - an answer token that happens to equal the other side's token at the same position is out.
    """
    if harmful_ids.shape != harmless_ids.shape:
        raise ValueError(
            f"position_mask needs both sides padded to one shape; got {tuple(harmful_ids.shape)} "
            f"and {tuple(harmless_ids.shape)}."
        )
    return harmful_ids != harmless_ids


@dataclass(frozen=True)
class Targets:
    """The masked next-token targets of a [B, T] batch, flattened to K entries."""

    batch: torch.Tensor  # [K] row of each target
    position: torch.Tensor  # [K] position whose output predicts it (t - 1)
    ids: torch.Tensor  # [K] the target token id (at t)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def flat_index(self, seq_len: int) -> torch.Tensor:
        """Indices of the predicting positions in a [B * T, ...] view."""
        return self.batch * seq_len + self.position

    def select(self, keep: torch.Tensor) -> Targets:
        """The targets where the boolean [K] ``keep`` is set."""
        return Targets(self.batch[keep], self.position[keep], self.ids[keep])


def shift_targets(ids: torch.Tensor, mask: torch.Tensor) -> Targets:
    """Targets ``ids[b, t]`` with ``mask[b, t]`` set and ``t >= 1``, and where they are predicted from."""
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} differ in shape.")
    target_mask = mask.bool().clone()
    target_mask[:, 0] = False
    batch, target_pos = target_mask.nonzero(as_tuple=True)
    return Targets(batch, target_pos - 1, ids[batch, target_pos])


def _ce_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: at least float32 (bf16/fp16 upcast), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _mean_or_zero(per_target: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    if per_target.numel():
        return per_target.mean()
    return anchor.sum().to(_ce_dtype(anchor.dtype)) * 0.0  # zero that keeps the graph connected


def masked_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked next-token CE from full logits [B, T, V] (convention in the module docstring).

    Only the K predicting rows are gathered and upcast, never the whole logit tensor.
    """
    targets = shift_targets(ids, mask)
    rows = logits[targets.batch, targets.position]
    per_target = F.cross_entropy(rows.to(_ce_dtype(rows.dtype)), targets.ids, reduction="none")
    return _mean_or_zero(per_target, logits)


def default_chunk_rows(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row CE of ``x @ W.T + b`` against targets, computed chunk by chunk.

    Forward keeps only the inputs and each row's log-sum-exp (R floats); backward recomputes each
    chunk's logits once. Peak extra memory is one chunk of logits instead of R x V saved
    log-probabilities; the price is one more LM-head matmul over the R rows in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_rows):  # type: ignore[override]
        out_dtype = _ce_dtype(x.dtype)
        losses = torch.empty(x.shape[0], dtype=out_dtype, device=x.device)
        lse = torch.empty_like(losses)
        for start in range(0, x.shape[0], chunk_rows):
            stop = start + chunk_rows
            logits = F.linear(x[start:stop], weight, bias).to(out_dtype)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            gold = logits.gather(1, targets[start:stop, None]).squeeze(1)
            losses[start:stop] = lse[start:stop] - gold
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # type: ignore[override]
        x, weight, bias, targets, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        acc_dtype = _ce_dtype(weight.dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        for start in range(0, x.shape[0], ctx.chunk_rows):
            stop = start + ctx.chunk_rows
            x_chunk = x[start:stop]
            logits = F.linear(x_chunk, weight, bias).to(lse.dtype)
            # d CE / d logits = softmax - onehot, scaled by the upstream gradient of each row.
            grad_logits = torch.exp(logits.sub_(lse[start:stop, None]))
            rows = torch.arange(grad_logits.shape[0], device=x.device)
            grad_logits[rows, targets[start:stop]] -= 1.0
            grad_logits.mul_(grad_losses[start:stop, None].to(grad_logits.dtype))
            g = grad_logits.to(weight.dtype)
            del logits, grad_logits
            if need_x:
                grad_x[start:stop] = g @ weight
            if need_w:
                grad_w.add_((g.t() @ x_chunk).to(acc_dtype))
            if need_b:
                grad_b.add_(g.sum(0).to(acc_dtype))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None


def head_ce(
    rows: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Linear,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy [R] of ``head(rows)`` (rows [R, d]) against ``targets`` [R].

    Never holds more than ``chunk_rows`` full-vocabulary rows; see ``_LinearCrossEntropy``.
    Values are float32 (float64 for float64 inputs).
    """
    if rows.ndim != 2 or targets.shape != rows.shape[:1]:
        raise ValueError(f"head_ce needs rows [R, d] and targets [R]; got {tuple(rows.shape)}, {tuple(targets.shape)}")
    weight = head.weight
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(rows.to(weight.dtype), weight, head.bias, targets, chunk_rows)


class _GroupedLinearCrossEntropy(torch.autograd.Function):
    """Weighted per-group sums of row CEs through a linear head, with gradients made in the forward.

    The output is linear in each row's CE, so d(output_k)/d(logits_r) = w_r (softmax_r - onehot_r) is
    known before the upstream gradient is: each chunk's logits are used once and dropped, and only
    grad-of-rows [R, d] and one weight-gradient accumulator per group [V, d] are kept for backward,
    where they are scaled by the upstream gradient of their group (Liger-style fused linear CE,
    generalised to several groups). Costs the same three head matmuls as autograd, no recompute.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, row_weights, sizes, chunk_rows, with_grad):  # type: ignore[override]
        dtype = _ce_dtype(x.dtype)
        acc_dtype = _ce_dtype(weight.dtype)
        need_x, need_w, need_b = (with_grad and need for need in ctx.needs_input_grad[:3])
        sums = torch.zeros(len(sizes), dtype=dtype, device=x.device)
        grad_rows = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros((len(sizes), *weight.shape), dtype=acc_dtype, device=x.device) if need_w else None
        grad_b = torch.zeros((len(sizes), *bias.shape), dtype=acc_dtype, device=x.device) if need_b else None
        start = 0
        for group, size in enumerate(sizes):
            for lo in range(start, start + size, chunk_rows):
                hi = min(lo + chunk_rows, start + size)
                target = targets[lo:hi]
                w = row_weights[lo:hi].to(dtype)
                # Four passes over the chunk, all in place: max, shift + exp, sum, scale.
                logits = F.linear(x[lo:hi], weight, bias).to(dtype)
                gold = logits.gather(1, target[:, None]).squeeze(1)
                peak = logits.amax(dim=-1)
                exp = logits.sub_(peak[:, None]).exp_()
                total = exp.sum(dim=-1)
                sums[group] += ((total.log() + peak - gold) * w).sum()
                if not (need_x or need_w or need_b):
                    continue
                grad_logits = exp.mul_((w / total)[:, None])  # w * softmax
                grad_logits[torch.arange(hi - lo, device=x.device), target] -= w
                g = grad_logits.to(weight.dtype)
                if need_x:
                    grad_rows[lo:hi] = g @ weight
                if need_w:
                    grad_w[group].add_((g.t() @ x[lo:hi]).to(acc_dtype))
                if need_b:
                    grad_b[group].add_(g.sum(0).to(acc_dtype))
            start += size
        ctx.save_for_backward(grad_rows, grad_w, grad_b)
        ctx.sizes, ctx.weight_dtype = sizes, weight.dtype
        return sums

    @staticmethod
    def backward(ctx, grad_sums):  # type: ignore[override]
        grad_rows, grad_w, grad_b = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if grad_rows is not None:
            per_row = torch.repeat_interleave(grad_sums, torch.tensor(ctx.sizes, device=grad_sums.device))
            grad_x = grad_rows * per_row[:, None].to(grad_rows.dtype)
        if grad_w is not None:
            grad_weight = torch.tensordot(grad_sums.to(grad_w.dtype), grad_w, dims=1).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_bias = torch.tensordot(grad_sums.to(grad_b.dtype), grad_b, dims=1).to(ctx.weight_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def head_ce_sums(
    groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]],
    head: torch.nn.Linear,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``[sum_r w_r * CE(head(rows_r), target_r) for each (rows, targets, w) group]`` as one tensor [n].

    With w = 1 / K a group's entry is its mean CE. The fastest and leanest way to get several
    masked CE terms through one LM head: at most ``chunk_rows`` full-vocabulary rows exist at a
    time, and no logits are recomputed in backward (see ``_GroupedLinearCrossEntropy``).
    Gradients flow to the rows, the head weight and bias; weights and targets are constants.
    """
    weight = head.weight
    rows = torch.cat([r.reshape(-1, weight.shape[1]) for r, _, _ in groups]).to(weight.dtype)
    targets = torch.cat([t.reshape(-1) for _, t, _ in groups])
    row_weights = torch.cat([
        torch.as_tensor(w, dtype=torch.float64, device=rows.device).expand(t.numel())
        if not isinstance(w, torch.Tensor) or w.ndim == 0 else w.reshape(-1)
        for _, t, w in groups
    ]).detach()
    sizes = tuple(int(t.numel()) for _, t, _ in groups)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return _GroupedLinearCrossEntropy.apply(
        rows, weight, head.bias, targets, row_weights, sizes, chunk_rows, torch.is_grad_enabled()
    )


def masked_head_ce(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    head: torch.nn.Linear,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Masked next-token CE of ``head(norm(hidden))`` projecting only the masked positions.

    Equal to ``masked_ce(head(norm(hidden)), ids, mask)`` (norm is per position, so gathering
    first changes nothing) without materialising the [B, T, V] logits.
    """
    rows, target_ids = gather_rows(hidden, ids, mask)
    if norm is not None:
        rows = norm(rows)
    weight = 1.0 / max(1, len(target_ids))
    return head_ce_sums([(rows, target_ids, weight)], head, chunk_rows=chunk_rows)[0]


def gather_rows(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [K, d] at the predicting positions of the masked targets, and the targets [K]."""
    targets = shift_targets(ids, mask)
    batch, seq_len, dim = hidden.shape
    rows = hidden.reshape(batch * seq_len, dim).index_select(0, targets.flat_index(seq_len))
    return rows, targets.ids


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased multi-kernel Gaussian MMD² between two samples of B points each (PAPER.md §3).

    ``x``, ``y``: [B, ...], flattened to [B, D]. The 2B points are stacked, pairwise squared
    distances D² come from one Gram matrix (||a||² + ||b||² - 2<a, b>, clamped at 0, exact 0 on the
    diagonal), the bandwidth m = sum(D²) / (n² - n) is computed without gradient, and five kernels
    exp(-D² / bw) with bw in m/4, m/2, m, 2m, 4m are summed. Result: mean of
    K_xx + K_yy - K_xy - K_yx over the B x B blocks (diagonals included).

    Computed in float32 for bf16/fp16/float32 inputs (float64 stays float64): bf16 Gram entries
    would cancel catastrophically. m is floored at the smallest normal float so that all-zero
    inputs (an empty mask) give 0 instead of 0/0 = NaN; for any other input the floor is inert.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"mmd needs the same number of points on both sides; got {x.shape[0]} and {y.shape[0]}.")
    dtype = _ce_dtype(torch.promote_types(x.dtype, y.dtype))
    points = torch.cat([x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)]).to(dtype)
    n = points.shape[0]
    gram = points @ points.t()
    sq = gram.diagonal()
    off_diagonal = 1.0 - torch.eye(n, dtype=dtype, device=points.device)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0) * off_diagonal
    with torch.no_grad():
        m = (d2.sum() / (n * n - n)).clamp_min(torch.finfo(dtype).tiny)
    kernels = sum(torch.exp(-d2 / (m * factor)) for factor in MMD_BANDWIDTH_FACTORS)
    b = x.shape[0]
    return (kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b]).mean()


def pair_ces(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    harmful_mask: torch.Tensor,
    harmless_mask: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked CE of the harmful side, masked CE of the harmless side) of a ``collate_pairs`` batch.

    One decoder forward over both sides stacked along the batch, then one chunked LM-head pass
    (``head_ce_sums``) over the masked rows only: no [B, T, V] logits. Equal to ``masked_ce`` of
    each side's full logits.
    """
    harmful_ids, harmless_ids = batch["harmful_input_ids"], batch["harmless_input_ids"]
    b = harmful_ids.shape[0]
    parts = decoder_parts(model)
    final = parts.decoder(
        input_ids=torch.cat([harmful_ids, harmless_ids]),
        attention_mask=torch.cat([batch["harmful_attention_mask"], batch["harmless_attention_mask"]]),
        use_cache=False,
    ).last_hidden_state
    groups = []
    for hidden, ids, mask in ((final[:b], harmful_ids, harmful_mask), (final[b:], harmless_ids, harmless_mask)):
        rows, targets = gather_rows(hidden, ids, mask)
        groups.append((rows, targets, 1.0 / max(1, targets.numel())))
    sums = head_ce_sums(groups, parts.head, chunk_rows=chunk_rows)
    return sums[0], sums[1]
