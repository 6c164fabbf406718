"""Sweeps: defences × attacks × seeds expanded into runs that share the stage cache.

A sweep file names the grid and the settings common to every cell::

    name: table1-cpu
    base:            # any run-config field: model, profile, evaluate, data, ...
      evaluate: {harmfulness: {}}
    defences: [none, repnoise, {name: safety-sft, params: {lr: 1.0e-5}, label: sft-1e-5}]
    attacks: [full-ft@cpu-3e-5-32, full-ft@cpu-8e-5-128]
    seeds: [42]

Every cell is an ordinary run (its own results.json); cells that share a defence and seed share
the defended model, and every defence shares the undefended reference, through the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console

from harness.errors import ConfigError, HarnessError
from harness.files.atomic import write_json, write_text
from harness.registry import format_validation_error
from harness.results.schema import load_results
from harness.run.config import RunConfig, build_config, deep_merge, load_yaml, parse_set
from harness.terminal import plain


class GridEntry(BaseModel):
    """One defence or attack of the grid: a name (``name@preset`` allowed), params and a column label."""

    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = Field(None, description="row/column title (default: name@preset)")

    @property
    def title(self) -> str:
        return self.label or self.name


class RayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray instance")
    num_gpus_per_cell: float = Field(0, ge=0, description="GPUs reserved for each cell's task")
    num_cpus_per_cell: float = Field(1, gt=0, description="CPUs reserved for each cell's task")
    resources_per_cell: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per cell, e.g. {a100: 1}: only nodes declaring them")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="names the sweep directory")
    base: dict[str, Any] = Field(default_factory=dict, description="run-config fields shared by every cell")
    defences: list[GridEntry] = Field(min_length=1)
    attacks: list[GridEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    executor: Literal["local", "ray"] = "local"
    ray: RayOptions = Field(default_factory=RayOptions)
    disk_budget_gb: float | None = Field(
        None, gt=0, description="most GiB the sweep may add to the cache (a quota the file system does not report)")
    threads_per_cell: int | None = Field(
        None, ge=1, description="torch CPU threads in each cell (None: torch's default)"
    )

    @field_validator("defences", "attacks", mode="before")
    @classmethod
    def _names_are_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("base")
    @classmethod
    def _base_has_no_grid_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted({"defence", "attack", "seed"} & set(value))
        if clash:
            raise ValueError(f"base must not set {', '.join(clash)}: the grid does (defences, attacks, seeds)")
        return value


@dataclass(frozen=True)
class Cell:
    """One run of the grid, with its validated config."""

    defence: str  # row title
    attack: str  # column title
    seed: int
    config: RunConfig

    @property
    def title(self) -> str:
        return f"{self.defence} × {self.attack} × seed {self.seed}"


def load_sweep(path: Path, sets: list[str] | None = None) -> SweepConfig:
    """Read a sweep file; ``--set`` values (``base.model.ref=tiny-llama``, ``seeds=[1,2]``) override it."""
    data = load_yaml(path)
    for expr in sets or []:
        data = deep_merge(data, _parse_sweep_set(expr))
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"sweep {path}")) from None


def _parse_sweep_set(expr: str) -> dict[str, Any]:
    """Like a run's ``--set`` but rooted at the sweep file (no defence/attack shortcut)."""
    nested = parse_set(expr)
    head = next(iter(nested))
    if head in ("defence", "attack"):
        raise ConfigError(f"--set {expr!r}: a sweep sets cells through its grid; use base.… for shared fields")
    return nested


def expand(sweep: SweepConfig) -> list[Cell]:
    """Every (defence, attack, seed) cell, validated before anything runs (defence-major order, so a
    defended model is built once and then attacked by every attack)."""
    cells = []
    for defence in sweep.defences:
        for attack in sweep.attacks:
            for seed in sweep.seeds:
                flags = deep_merge(sweep.base, {
                    "defence": {"name": defence.name, "params": defence.params},
                    "attack": {"name": attack.name, "params": attack.params},
                    "seed": seed,
                })
                try:
                    config = build_config(flags=flags)
                except ConfigError as exc:
                    raise ConfigError(f"sweep cell {defence.title} × {attack.title} × seed {seed}: {exc}") from None
                cells.append(Cell(defence.label or config.defence.label, attack.label or config.attack.label,
                                  seed, config))
    _check_unique_titles(cells)
    return cells


def unequal_sizes(cells: list[Cell]) -> list[str]:
    """Plugins of the grid that bring no sizes for the sweep's profile while others of their kind do:
    they run at their own (paper-sized) defaults beside plugins sized for the profile, an unequal
    comparison the matrix would not show."""
    from harness.run.presets import profile_params, unsized

    problems = []
    profile = cells[0].config.profile  # the sweep's base sets it for every cell
    for kind, field in (("defences", "defence"), ("attacks", "attack")):
        names = sorted({getattr(c.config, field).name for c in cells})
        bare = [n for n in names if unsized(kind, n, profile)]
        sized = [n for n in names if profile_params(kind, n, profile) is not None]
        if bare and sized:
            problems.append(f"{kind} {', '.join(bare)} bring no {profile} sizes and run at their defaults, "
                            f"while {', '.join(sized)} run at their {profile} sizes")
    return problems


def _check_unique_titles(cells: list[Cell]) -> None:
    seen: dict[tuple[str, str, int], RunConfig] = {}
    for cell in cells:
        key = (cell.defence, cell.attack, cell.seed)
        if key in seen and seen[key] != cell.config:
            raise ConfigError(f"Two different sweep cells are titled {cell.title}; give them distinct labels.")
        seen[key] = cell.config


def run_sweep(sweep: SweepConfig, console: Console, executor: str | None = None) -> Path:
    """Run every cell (cached cells cost seconds), write sweep.json and the matrix, return the sweep dir."""
    from harness.results.sweep_table import render_markdown, sweep_matrix, sweep_table
    from harness.run.executors import run_local, run_ray

    cells = expand(sweep)
    configs = [cell.config.model_dump(mode="json") for cell in cells]
    directory = Path(cells[0].config.output_dir) / "sweeps" / sweep.name
    outcomes: list[dict[str, Any] | None] = [None] * len(cells)

    def record(index: int, outcome: dict[str, Any]) -> None:  # after each cell: nothing finished is lost
        outcomes[index] = outcome
        write_json(directory / "sweep.json", _index(sweep, cells, outcomes))  # first: a print cannot lose it
        mark = "[green]✓[/]" if outcome["status"] == "ok" else f"[red]✗[/] {plain(outcome['error'])}"
        console.print(f"{mark} {plain(cells[index].title)}")

    chosen = executor or sweep.executor
    console.print(f"Sweep [bold]{sweep.name}[/]: {len(cells)} cells ({len(sweep.defences)} defences × "
                  f"{len(sweep.attacks)} attacks × {len(sweep.seeds)} seeds), executor {chosen}")
    for problem in unequal_sizes(cells):
        console.print(f"[yellow]Unequal sizes:[/] {plain(problem)}; set their params in the sweep file (or give "
                      "the plugins profiles=) for a like-for-like comparison.")
    check_sweep_disk(sweep, cells, chosen, console)
    if chosen == "ray":
        run_ray(configs, sweep.threads_per_cell, console, record, sweep.ray.address,
                sweep.ray.num_cpus_per_cell, sweep.ray.num_gpus_per_cell, sweep.ray.resources_per_cell)
    else:
        run_local(configs, sweep.threads_per_cell, console, record)
    results = [_read_results(o) for o in outcomes]
    matrix = sweep_matrix(cells, results)
    write_text(directory / "matrix.md", render_markdown(matrix))
    write_json(directory / "matrix.json", matrix)
    Console(markup=False).print(sweep_table(matrix))  # labels and judge names are user text, never markup
    failed = [c.title for c, o in zip(cells, outcomes) if not o or o["status"] != "ok"]
    if failed:
        raise HarnessError(f"{len(failed)} of {len(cells)} sweep cells failed ({'; '.join(failed)}). "
                           f"Finished cells are cached: run the sweep again to retry only the failed ones. "
                           f"Details: {directory / 'sweep.json'}")
    console.print(f"Sweep results: [bold]{plain(directory)}[/] (sweep.json, matrix.md, matrix.json)")
    return directory


def _index(sweep: SweepConfig, cells: list[Cell], outcomes: list[dict[str, Any] | None]) -> dict[str, Any]:
    return {
        "sweep": sweep.model_dump(mode="json"),
        "unequal_sizes": unequal_sizes(cells),
        "cells": [{"defence": c.defence, "attack": c.attack, "seed": c.seed,
                   **(o or {"status": "pending", "run_dir": None, "error": None})}
                  for c, o in zip(cells, outcomes)],
    }


def _read_results(outcome: dict[str, Any] | None) -> dict[str, Any] | None:
    if not outcome or outcome["status"] != "ok":
        return None
    return load_results(Path(outcome["run_dir"]) / "results.json")


def check_sweep_disk(sweep: SweepConfig, cells: list[Cell], executor: str, console: Console) -> None:
    """Print the disk the sweep will add to the cache and refuse before the first cell when it cannot hold it."""
    import os

    from harness.resources.disk import check_disk, sweep_disk_need
    from harness.resources.memory import gib

    concurrent = 1 if executor == "local" else min(len(cells), max(1, int((os.cpu_count() or 1)
                                                                        // sweep.ray.num_cpus_per_cell)))
    need = sweep_disk_need([cell.config for cell in cells], concurrent)
    cache_dir = Path(cells[0].config.cache_dir)
    available = check_disk(need, cache_dir, sweep.disk_budget_gb, f"Sweep {sweep.name}")
    console.print(f"Disk: about {gib(need.total)} more in {plain(cache_dir)} ({plain(need.describe())}); "
                  f"{gib(available)} available", highlight=False)
