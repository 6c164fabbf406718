"""FSDP2 sharding of a model for the length of one training stage.

The model a recipe trains stays an ordinary module: training runs on a *sharded twin* built on
the meta device (no memory), sharded with ``fully_shard`` (one group per decoder layer, the rest —
embeddings, final norm, LM head, tied or not — in the root group) and filled from the model's own
weights. After training, the twin's full weights are gathered and copied back into the model, so
saving, evaluation and the next stage see the same object as in a single-process run.

The root of the twin is a :class:`LossModule`: its forward *is* the recipe's loss function, so
whatever the loss calls — the whole model, the decoder alone, the LM head on selected rows, forward
hooks on MLPs — runs while the root group is gathered, and each layer is gathered around its own
forward. That is what lets RepNoise's hooks, its masked LM-head pass and its MMD run unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

from harness.distributed.world import World
from harness.errors import HarnessError
from harness.models.activations import decoder_parts


class LossModule(torch.nn.Module):
    """The FSDP root: ``forward(batch)`` runs ``loss_fn(model, batch)`` on the sharded model."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.loss_fn(self.model, batch)


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters live on the meta device (tied weights stay tied; buffers are copied)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        twin = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        memo[id(param)] = twin
    return copy.deepcopy(model, memo)


class ShardedTwin:
    """Build, train through, and gather back a sharded twin of ``model``."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Any], world: World,
                 mixed_precision: torch.dtype | None = None) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model = model
        self.world = world
        twin = meta_twin(model)
        if mixed_precision is not None:  # float32 shards (and optimizer state), compute in mixed_precision
            twin = twin.float()
        policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32 if mixed_precision
                                      else None)
        for layer in decoder_parts(twin).layers:
            fully_shard(layer, mp_policy=policy)
        self.root = LossModule(twin, loss_fn)
        fully_shard(self.root, mp_policy=policy)
        self.root.to_empty(device=world.device)
        self._restore_buffers(twin)
        self.twin = twin
        self._load()

    def _restore_buffers(self, twin: torch.nn.Module) -> None:
        """to_empty left buffers (rotary frequencies) uninitialised: take them from the model."""
        originals = dict(self.model.named_buffers())
        for name, buffer in twin.named_buffers():
            buffer.copy_(originals[name].to(buffer.device))

    def _load(self) -> None:
        """Each rank keeps its own shard of every weight (the model is identical on every rank)."""
        from torch.distributed.tensor import distribute_tensor

        originals = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, param in self.twin.named_parameters():
                full = originals[name].detach().to(device=self.world.device, dtype=param.dtype)
                shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())

    def parameters_for(self, chosen: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The twin's parameters standing for ``chosen`` parameters of the model (by name)."""
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        twin = dict(self.twin.named_parameters())
        names = []
        for param in chosen:
            if id(param) not in by_id:
                raise HarnessError(
                    "Sharded training can only optimise parameters of the model itself; this recipe trains "
                    "tensors outside it. Run it without --nproc."
                )
            names.append(by_id[id(param)])
        return [twin[name] for name in names]

    def gather_into_model(self) -> None:
        """Copy the trained full weights back into the model, on every rank (a collective)."""
        originals = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, param in self.twin.named_parameters():
                full = param.full_tensor()
                target = originals[name]
                target.copy_(full.to(device=target.device, dtype=target.dtype))
