"""The process group this process belongs to, and the few collectives the harness needs.

A world exists only while ``joined`` holds it; ``current()`` is None in an ordinary single-process
run, which therefore takes exactly the code path it always took.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from harness.errors import HarnessError

# Rank 0 evaluates while the other ranks wait at a barrier: allow long evaluations of big models.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """This process's place in the group: ``rank`` of ``size``, ``device`` it trains on."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes the stage cache and results (single writer)."""
        return self.rank == 0


_current: World | None = None


def current() -> World | None:
    """The joined world, or None in a single-process run."""
    return _current


def check_support() -> None:
    """Fail before any work when this torch build cannot run sharded training."""
    import torch.distributed as dist

    if not dist.is_available():
        raise HarnessError(
            "Sharded training needs torch.distributed, which this torch build lacks "
            f"(torch {torch.__version__}). Install a torch wheel from pytorch.org for Linux, or drop --nproc."
        )
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise HarnessError(
            f"Sharded training needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); torch "
            f"{torch.__version__} has none. Upgrade torch or drop --nproc."
        ) from None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def joined(rank: int, size: int, local_rank: int, device: torch.device,
           timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[World]:
    """Join the process group (MASTER_ADDR/MASTER_PORT from the environment) for the block."""
    import torch.distributed as dist

    global _current
    check_support()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    _current = World(rank=rank, size=size, local_rank=local_rank, device=device, backend=backend)
    try:
        yield _current
    finally:
        _current = None
        dist.destroy_process_group()


@contextmanager
def solo() -> Iterator[None]:
    """Within the block this rank works alone (rank 0's evaluations, which may train): no collectives."""
    global _current
    saved, _current = _current, None
    try:
        yield
    finally:
        _current = saved


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, size, local rank) when started by torchrun with more than one process, else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over the ranks, returned on every rank."""
    import torch.distributed as dist

    summed = value.detach().clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small picklable values only: decisions, keys, flags)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
