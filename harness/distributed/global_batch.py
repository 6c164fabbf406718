"""Whole-batch quantities for losses that are not a mean over tokens, when the batch's rows are split over ranks.

RepNoise's noise term is an MMD over every row of the micro-batch and its ascent term the log of a batch
mean, so a rank that holds only some rows cannot compute either alone. A loss marked
:func:`data_parallel_loss` asks for what it needs through the functions here instead; while
:func:`split_over` is active (the sharded step's data-parallel mode) they talk to the other ranks, and
otherwise (one process, or every rank computing the whole batch) they return their input unchanged, so the
single-process arithmetic is exactly what it was.

Convention while split: the loss a rank returns is its *share*, and the shares' gradients sum to the
gradient of the whole batch's loss (their values to its value); the terms a rank reports are whole-batch
values, the same on every rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from harness.distributed.world import World

Fn = TypeVar("Fn", bound=Callable[..., Any])
_split: World | None = None


def data_parallel_loss(fn: Fn) -> Fn:
    """Mark a loss that computes its whole-batch quantities with this module, so sharded training may give
    each rank only some rows of a micro-batch (an unmarked loss that is not a token mean runs every rank on
    the whole batch)."""
    fn.data_parallel_loss = True  # type: ignore[attr-defined]
    return fn


def is_data_parallel_loss(fn: Callable[..., Any]) -> bool:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return bool(getattr(fn, "data_parallel_loss", False))


@contextmanager
def split_over(world: World) -> Iterator[None]:
    """Within the block, this rank's loss sees only its rows of the micro-batch."""
    global _split
    saved, _split = _split, world
    try:
        yield
    finally:
        _split = saved


def total_count(count: int) -> int:
    """A count over the whole micro-batch (e.g. the targets a mean runs over)."""
    if _split is None:
        return count
    import torch.distributed as dist

    summed = torch.tensor([count], dtype=torch.int64, device=_split.device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return int(summed.item())


def total(value: torch.Tensor) -> torch.Tensor:
    """The whole batch's value of a quantity each rank holds a share of (detached when split: a report)."""
    if _split is None:
        return value
    import torch.distributed as dist

    summed = value.detach().clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def share(value: torch.Tensor) -> torch.Tensor:
    """This rank's share of a quantity every rank computed whole (from :func:`gather_rows`)."""
    return value if _split is None else value / _split.size


class _GatherRows(torch.autograd.Function):
    """Rows of every rank along dim 0 (ragged row counts allowed). Backward: the summed gradient of this
    rank's rows, since every rank differentiates its own copy of the gathered tensor."""

    @staticmethod
    def forward(ctx, x, sizes):  # type: ignore[override]
        import torch.distributed as dist

        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        import torch.distributed as dist

        # all_reduce of the whole gathered gradient, then this rank's rows: a reduce-scatter's result with
        # ragged rows and on every backend (gloo has no reduce-scatter), at W times its traffic.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The whole batch's rows of ``x`` [rows, ...] in rank order (differentiable for floating tensors)."""
    if _split is None:
        return x
    import torch.distributed as dist

    sizes_tensor = torch.zeros(_split.size, dtype=torch.int64, device=x.device)
    sizes_tensor[_split.rank] = x.shape[0]
    dist.all_reduce(sizes_tensor, op=dist.ReduceOp.SUM)
    sizes = [int(n) for n in sizes_tensor.tolist()]
    if x.is_floating_point():
        return _GatherRows.apply(x, sizes)
    return _GatherRows.apply(x.to(torch.int64), sizes).to(x.dtype)  # masks: no gradient, any dtype


@dataclass(frozen=True)
class LogOfTotal:
    """log(Σ shares + offset): its value, the value's log, and what a rank backpropagates."""

    value: torch.Tensor
    log: torch.Tensor
    loss: torch.Tensor  # alone: ``log``; split: a share whose gradient is ∇share / value


def log_of_total(part: torch.Tensor, offset: float) -> LogOfTotal:
    """The log of a whole-batch sum (plus ``offset``) of which this rank holds ``part``."""
    if _split is None:
        value = part + offset if offset else part
        log = torch.log(value)
        return LogOfTotal(value, log, log)
    value = total(part) + offset
    log = torch.log(value)
    return LogOfTotal(value, log, log / _split.size + (part - part.detach()) / value)
