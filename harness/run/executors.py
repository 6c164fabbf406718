"""Where sweep cells run: one after the other here (``local``), or as Ray tasks (``ray``).

A cell is an ordinary run given as its full, validated config, so it is idempotent: a finished
cell is served from the stage cache, and a failed one is retried without redoing the others.
Concurrent cells that need the same stage wait for whichever builds it first (the store's lock).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from harness.errors import HarnessError
from harness.terminal import plain

CellOutcome = dict[str, Any]  # {"status": "ok"|"failed", "run_dir": str|None, "error": str|None}


def run_cell(config: dict[str, Any], threads: int | None = None, quiet: bool = False) -> CellOutcome:
    """Run one cell from its config dict (as a plain function, so a Ray worker can call it too)."""
    import torch

    from harness.run.config import RunConfig
    from harness.run.runner import execute

    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True, quiet=quiet)
    try:
        _, directory = execute(RunConfig.model_validate(config), console)
    except HarnessError as exc:
        return {"status": "failed", "run_dir": None, "error": f"{type(exc).__name__}: {exc}", "ran_on": ran_on()}
    return {"status": "ok", "run_dir": str(directory), "error": None, "ran_on": ran_on()}


def ran_on() -> dict[str, Any]:
    """Where a cell ran (host, process, Ray node when on Ray): which worker served it, in sweep.json."""
    import os
    import socket

    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_node": node}


def _absolute(config: dict[str, Any]) -> dict[str, Any]:
    """Paths resolved here, so a worker with another working directory writes to the same places."""
    resolved = dict(config)
    for field in ("cache_dir", "output_dir"):
        resolved[field] = str(Path(config[field]).resolve())
    return resolved


def run_local(configs: list[dict[str, Any]], threads: int | None, console: Console,
              on_done: Callable[[int, CellOutcome], None]) -> None:
    for index, config in enumerate(configs):
        console.rule(f"cell {index + 1}/{len(configs)}")
        try:
            outcome = run_cell(config, threads)
        except Exception as exc:  # a crash in one cell (a plugin bug, OOM) is recorded, as on Ray
            outcome = {"status": "failed", "run_dir": None,
                       "error": "".join(traceback.format_exception(exc, limit=-3)).strip()}
        on_done(index, outcome)


def run_ray(configs: list[dict[str, Any]], threads: int | None, console: Console,
            on_done: Callable[[int, CellOutcome], None], address: str | None = None,
            num_cpus: float = 1, num_gpus: float = 0, resources: dict[str, float] | None = None) -> None:
    """One Ray task per cell (``num_gpus`` and custom ``resources`` each, e.g. ``{"a100": 1}`` that only
    some nodes declare); a local Ray instance unless ``address`` is given."""
    try:
        import ray
    except ImportError:
        raise HarnessError("The ray executor needs Ray: pip install 'harmful-ft-harness[ray]'.") from None
    started_here = not ray.is_initialized()
    if started_here:
        # "local" starts a fresh instance even where `ray start` left a (possibly dead) cluster's address behind
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    try:
        _check_capacity(ray.cluster_resources(), num_cpus, num_gpus, resources or {})
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(run_cell)
        pending = {task.remote(_absolute(c), threads, True): i for i, c in enumerate(configs)}
        console.print(f"Submitted {len(pending)} cells to Ray ({plain(address or 'local instance')}).")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # the worker died (OOM, killed): the cell failed, the others go on
                outcome = {"status": "failed", "run_dir": None, "error": f"Ray task failed: {exc}"}
            on_done(index, outcome)
    finally:
        if started_here:
            ray.shutdown()


def _check_capacity(resources: dict[str, float], num_cpus: float, num_gpus: float,
                    custom: dict[str, float] | None = None) -> None:
    """Fail now, not hang: a cell that asks for more than the cluster has would never be scheduled."""
    for name, wanted in (("CPU", num_cpus), ("GPU", num_gpus), *(custom or {}).items()):
        if name not in ("CPU", "GPU") and wanted > resources.get(name, 0):
            raise HarnessError(
                f"Each cell asks for {wanted:g} of the custom resource {name!r} but the Ray cluster has "
                f"{resources.get(name, 0):g}. Start a node with `ray start --resources '{{\"{name}\": N}}'` "
                "or change ray.resources_per_cell in the sweep file."
            )
        if wanted > resources.get(name, 0):
            raise HarnessError(
                f"Each cell asks for {wanted:g} {name}(s) but the Ray cluster has {resources.get(name, 0):g}. "
                f"Lower ray.num_{name.lower()}s_per_cell in the sweep file or connect to a bigger cluster."
            )
