"""Start a sharded run: ``harness run --nproc N`` spawns N local processes, one per device; under
``torchrun`` (WORLD_SIZE > 1 in the environment) each started ``harness run`` joins as its rank.

Every rank runs the same pipeline (:mod:`harness.distributed.pipeline`); rank 0 writes results.json.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from harness.distributed.world import World, barrier, check_support, joined, world_from_env
from harness.errors import ConfigError, HarnessError
from harness.models.loading import model_fingerprint, resolve_device
from harness.run.config import RunConfig


def check_devices(device: str, nproc: int) -> torch.device:
    """The device type the ranks use; a clear error when ``nproc`` processes cannot each get one."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give a number of processes >= 1.")
    kind = resolve_device(device)
    if kind.type == "cuda":
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise ConfigError(f"--nproc {nproc} asks for one GPU per process, but {visible} CUDA device(s) are "
                              f"visible. Use --nproc {visible} or fewer (CUDA_VISIBLE_DEVICES selects them).")
        if kind.index is not None and nproc > 1:
            raise ConfigError(f"--device {device} names one GPU; sharded runs place rank i on cuda:i. "
                              "Use --device cuda or auto.")
    elif kind.type == "cpu":
        cores = os.cpu_count() or 1
        if nproc > cores:
            raise ConfigError(f"--nproc {nproc} CPU processes on a machine with {cores} core(s): use --nproc "
                              f"{cores} or fewer.")
    else:
        raise ConfigError(f"Sharded training runs on CUDA GPUs or CPUs, not on {kind.type}; drop --nproc.")
    return kind


def rank_device(kind: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if kind.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def execute_rank(config: RunConfig, world: World, console: Console) -> Path | None:
    """This rank's part of the run; rank 0 returns the run directory, the others None."""
    from harness.distributed.pipeline import DistributedPipeline
    from harness.results.record import build_results, print_summary, write_run

    if world.device.type == "cuda":
        config = config.model_copy(update={"model": config.model.model_copy(update={"device": str(world.device)})})
    pipeline = DistributedPipeline(config, console if world.is_writer else Console(stderr=True, quiet=True), world)
    outcome = pipeline.run()
    barrier()
    if not world.is_writer:
        return None
    fingerprints = dict(sorted(pipeline.data_fingerprints.items()))
    results = build_results(config, outcome, fingerprints, model_fingerprint(config.model.ref, config.model.revision))
    directory = write_run(config, results)
    print_summary(results, directory, console)
    return directory


def _spawned(rank: int, size: int, config: dict[str, Any], port: int, threads: int | None) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if threads:
        torch.set_num_threads(threads)
    run_config = RunConfig.model_validate(config)
    kind = resolve_device(run_config.model.device)
    with joined(rank, size, rank, rank_device(kind, rank)) as world:
        execute_rank(run_config, world, Console(stderr=True))


def run(config: RunConfig, console: Console, nproc: int) -> None:
    """Run ``config`` sharded over ``nproc`` local processes, or as this torchrun rank."""
    check_support()
    started = world_from_env()
    if started is not None:
        rank, size, local_rank = started
        kind = check_devices(config.model.device, 1)
        with joined(rank, size, local_rank, rank_device(kind, local_rank)) as world:
            execute_rank(config, world, console)
        return
    check_devices(config.model.device, nproc)
    import torch.multiprocessing as mp

    # Ranks share the cores: without a cap each would start one thread per core and thrash.
    threads = max(1, (os.cpu_count() or 1) // nproc) if resolve_device(config.model.device).type == "cpu" else None
    console.print(f"Starting {nproc} processes (sharded training, rank 0 writes the cache and results)…")
    try:
        mp.start_processes(_spawned, args=(nproc, config.model_dump(mode="json"), _free_port(), threads),
                           nprocs=nproc, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        raise HarnessError(f"A rank of the sharded run failed:\n{_last_error(str(exc))}") from None
    except mp.ProcessExitedException as exc:
        raise HarnessError(f"A rank of the sharded run died ({exc}); the other ranks were stopped. Finished "
                           "stages are cached: run the same command again to resume.") from None


def _last_error(traceback_text: str) -> str:
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else traceback_text
