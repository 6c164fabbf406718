"""The body of ``harness probe`` (registered in harness/cli.py). Heavy imports wait until it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def probe(
    run_dir: Path = typer.Argument(..., help="a run directory written by `harness run` (holds results.json)"),
    stages: str = typer.Option("base,defended,attacked", "--stages",
                               help="comma-separated: base, defended, attacked, undefended-attacked"),
    layers: Optional[str] = typer.Option(None, "--layers", help="hidden-state indices to report, e.g. 0,10,20 "
                                         "(0 = embeddings; default all)"),
    sets: list[str] = typer.Option([], "--set", help="probe params, e.g. --set num_prompts=128 --set seeds=10"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="stage cache (default: the run's)"),
) -> None:
    """Per layer: linear-probe accuracy (harmful vs harmless prompts), logit lens, weight change between stages
    and MMD to Gaussian noise, for the run's cached models; writes probe.json beside results.json."""
    from rich.console import Console

    from harness.errors import ConfigError, HarnessError
    from harness.run.config import parse_set
    from harness.terminal import plain, print_error, state

    console = Console(stderr=True)

    try:
        values: dict = {}
        for expr in sets:
            values.update(parse_set(expr))
        if layers is not None:
            try:
                values["layers"] = [int(part) for part in layers.split(",") if part.strip()]
            except ValueError:
                raise ConfigError(f"--layers {layers!r}: give comma-separated integers, e.g. 0,10,20.") from None
        from harness.probe.params import parse_probe_params
        from harness.probe.report import probe_run
        from harness.probe.view import curve_lines, layer_tables

        params = parse_probe_params(values)
        labels = tuple(dict.fromkeys(s.strip() for s in stages.split(",") if s.strip()))  # in order, once each
        if not labels:
            raise ConfigError("--stages names no stage; use e.g. base,defended,attacked.")
        report, path = probe_run(run_dir, params, labels, cache_dir, console)
        out = Console()
        for table in layer_tables(report):
            out.print(table)
        for line in curve_lines(report):
            out.print(plain(line))
        console.print(f"Probe: [bold]{plain(path)}[/] ({report['wall_seconds']:.1f}s)")
    except (HarnessError, OSError) as exc:  # OSError: a path that cannot be read or written
        if state["debug"]:
            raise
        print_error(console, exc)
        raise typer.Exit(code=2) from None
