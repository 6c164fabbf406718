"""The Python API behind `harness run`: run a config, write results.json, print the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from harness.models.loading import model_fingerprint
from harness.results.record import build_results, print_summary, write_run
from harness.run.config import RunConfig
from harness.run.pipeline import Pipeline


def execute(config: RunConfig, console: Console | None = None) -> tuple[dict[str, Any], Path]:
    """Run every stage (reusing cached ones) and return (results, run directory)."""
    console = console or Console(stderr=True)
    pipeline = Pipeline(config, console)
    outcome = pipeline.run()
    fingerprints = dict(sorted(pipeline.data_fingerprints.items()))
    results = build_results(config, outcome, fingerprints, model_fingerprint(config.model.ref, config.model.revision))
    directory = write_run(config, results)
    print_summary(results, directory, console)
    return results, directory
