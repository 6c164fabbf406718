"""One training micro-batch across ranks: which rows this rank computes, and how its loss is weighted so
the summed gradients and the reported loss equal the single-process run's.

Three modes, chosen per loss function:

- *data parallel*, for losses that are a mean over tokens (``causal_lm_loss``: SFT, LoRA, SFT-shaped
  defences), registered in :data:`TOKEN_MEAN_LOSSES`: rank r takes a contiguous slice of the global
  micro-batch (collated once, so padding is the same as in one process) and weights its mean by
  n_r / N, its share of the counted tokens. The weighted sum over ranks is the global mean exactly.
- *data parallel, whole-batch aware*, for losses marked ``global_batch.data_parallel_loss`` (RepNoise,
  whose log of a batch mean and MMD over all rows are not sums over rows): rank r takes its slice and
  the loss itself reaches the other ranks for whole-batch counts, rows and sums
  (:mod:`harness.distributed.global_batch`); it returns its share of the loss and whole-batch terms.
- *sharded only*, for every other loss: every rank computes the whole micro-batch on the sharded model.
  The parameters, gradients and optimizer state are still split across ranks (the memory win); the
  arithmetic is the single-process run's.

FSDP averages gradients over ranks, so the data-parallel loss is also multiplied by the world size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from harness.data.tokenization import IGNORE_INDEX
from harness.distributed.global_batch import is_data_parallel_loss, split_over
from harness.distributed.sharding import ShardedTwin
from harness.distributed.world import World, all_sum

Batch = dict[str, torch.Tensor]


def _labelled_targets(batch: Batch) -> torch.Tensor:
    """What causal_lm_loss averages over: next-token targets that are not ignored."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


# loss function (module.qualname, so that this module need not import the recipes' modules) -> the per-batch
# count its mean runs over. Only losses listed here run data-parallel.
TOKEN_MEAN_LOSSES: dict[str, Callable[[Batch], torch.Tensor]] = {"harness.train.sft.causal_lm_loss": _labelled_targets}


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def _rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


class ShardedStep:
    """Builds the sharded twin of ``model`` and runs micro-batches through it."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Any], world: World,
                 trainable: Iterable[torch.nn.Parameter], fp32_optimizer: bool) -> None:
        dtype = next(model.parameters()).dtype
        mixed = dtype if fp32_optimizer and dtype != torch.float32 else None
        self.world = world
        self.counter = TOKEN_MEAN_LOSSES.get(_name(loss_fn))
        self.whole_batch_aware = is_data_parallel_loss(loss_fn)
        self.split_micro_batches = 0  # micro-batches whose rows were split over the ranks (a stage stat)
        self.twin = ShardedTwin(model, loss_fn, world, mixed_precision=mixed)
        self.parameters = self.twin.parameters_for(trainable)
        self.twin.root.train()

    @property
    def data_parallel(self) -> bool:
        return self.counter is not None or self.whole_batch_aware

    def _bounds(self, batch: Batch) -> list[int] | None:
        """Row bounds of each rank's contiguous slice, or None when some rank would get no rows."""
        rows = _rows(batch)
        if not self.data_parallel or rows < self.world.size:
            return None
        return torch.linspace(0, rows, self.world.size + 1).round().long().tolist()

    def _share(self, batch: Batch) -> tuple[Batch, float] | None:
        """This rank's rows and weight n_r / N, or None when some rank would get no rows or no tokens."""
        bounds = self._bounds(batch)
        if self.counter is None or bounds is None:
            return None
        counts = [int(self.counter(_slice(batch, bounds[r], bounds[r + 1]))) for r in range(self.world.size)]
        if min(counts) == 0:
            return None
        mine = _slice(batch, bounds[self.world.rank], bounds[self.world.rank + 1])
        return mine, counts[self.world.rank] / sum(counts)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, dict[str, Any]]:
        """(loss to backpropagate before 1/grad_accum, its terms, global loss, global terms)."""
        if self.whole_batch_aware:
            return self._forward_whole_batch_aware(batch)
        share = self._share(batch)
        if share is None:  # every rank computes the whole micro-batch: identical values everywhere
            loss, terms = self._loss(batch)
            return loss, terms, loss, terms
        rows, weight = share
        self.split_micro_batches += 1
        loss, terms = self._loss(rows)
        named = {"loss": loss, **{k: v for k, v in terms.items() if isinstance(v, torch.Tensor)}}
        summed = all_sum(torch.stack([v.detach().float().reshape(()) * weight for v in named.values()]))
        total = dict(zip(named, summed))
        return loss * (weight * self.world.size), terms, total.pop("loss"), {**terms, **total}

    def _forward_whole_batch_aware(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor,
                                                                  dict[str, Any]]:
        bounds = self._bounds(batch)
        if bounds is None:  # fewer rows than ranks: every rank computes the whole micro-batch
            loss, terms = self._loss(batch)
            return loss, terms, loss, terms
        self.split_micro_batches += 1
        with split_over(self.world):
            loss, terms = self._loss(_slice(batch, bounds[self.world.rank], bounds[self.world.rank + 1]))
        return loss * self.world.size, terms, all_sum(loss.detach()), terms  # terms: whole-batch values

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        output = self.twin.root(batch)
        return output if isinstance(output, tuple) else (output, {})

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)

    def finish(self) -> None:
        """Full trained weights back into the model on every rank."""
        self.twin.gather_into_model()
