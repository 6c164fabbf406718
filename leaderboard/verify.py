"""`harness leaderboard verify`: re-run one submitted cell from its recorded config and compare.

A submission's numbers are claims; this turns one of them into a measurement. The recorded
config (every param, seed, evaluator and judge) is rebuilt with :func:`harness.config.build_config`
and run with :func:`harness.runner.execute` into separate cache and output directories; then the
model and data fingerprints must be equal and every numeric metric within ``tolerance``
(absolute). On CPU the pipeline is deterministic, so a re-run matches exactly; across GPUs and
library versions small differences are expected, hence the tolerance.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table

from harness.config import RunConfig, build_config
from harness.errors import HarnessError
from harness.results_schema import load_results

DEFAULT_TOLERANCE = 0.02


@dataclass
class Check:
    name: str
    submitted: Any
    rerun: Any
    ok: bool

    @property
    def diff(self) -> float | None:
        if isinstance(self.submitted, (int, float)) and isinstance(self.rerun, (int, float)):
            return abs(self.submitted - self.rerun)
        return None


def load_cell(path: Path, cell: int = 0) -> tuple[str, dict[str, Any]]:
    """(description, results) of one cell: from a submission archive, a results.json or a run dir."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if path.name.endswith((".tar.gz", ".tgz")):
        from leaderboard.intake import open_submission

        submission = open_submission(path)
        name, results = submission.run(cell)
        _require_defence(results["defence"]["name"], submission.manifest)
        return f"{path.name}: {name}", results
    if cell != 0:
        raise HarnessError(f"{path} holds a single run; --cell applies to submission files only.")
    return str(path), load_results(path)


def _require_defence(name: str, manifest: dict[str, Any]) -> None:
    """Say which package to install when the submitted defence's code is not here."""
    from harness.errors import UnknownPluginError
    from harness.registry import defences

    try:
        defences.get(name)
    except UnknownPluginError:
        ref = next((d for d in manifest["defences"] if d.get("name") == name), {})
        dist = ref.get("distribution") or {}
        package = f"{dist.get('name')}=={dist.get('version')}" if dist.get("name") else "its package"
        raise HarnessError(f"Defence {name!r} is not installed here. Install {package} (module "
                           f"{ref.get('module', '?')}, entry point {ref.get('entry_point') or '–'}) and run "
                           f"verify again.") from None


def rerun_config(results: dict[str, Any], cache_dir: Path, output_dir: Path, data_dir: Path | None = None,
                 device: str | None = None) -> RunConfig:
    """The recorded config with this machine's directories (and optionally device) swapped in."""
    recorded = copy.deepcopy(results["config"])
    recorded["cache_dir"], recorded["output_dir"] = str(cache_dir), str(output_dir)
    recorded.setdefault("data", {})["dir"] = str(data_dir) if data_dir else None
    if device:
        recorded["model"]["device"] = device
    return build_config(flags=recorded, profile=recorded.get("profile"))


def _numbers(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{prefix}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{prefix}[{i}]")
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        yield prefix, value


def _same(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= tolerance
    return a == b


def compare(submitted: dict[str, Any], rerun: dict[str, Any], tolerance: float) -> list[Check]:
    """Fingerprints must be equal; every metric of every evaluation within ``tolerance``."""
    checks = [Check("model fingerprint", submitted["model"]["fingerprint"], rerun["model"]["fingerprint"],
                    submitted["model"]["fingerprint"] == rerun["model"]["fingerprint"])]
    for name, digest in sorted(submitted["data"]["fingerprints"].items()):
        theirs = rerun["data"]["fingerprints"].get(name)
        checks.append(Check(f"data fingerprint {name}", digest, theirs, digest == theirs))
    for branch, content in submitted["results"].items():
        for phase in ("pre_attack", "post_attack"):
            for evaluator, entry in content[phase].items():
                other = rerun["results"].get(branch, {}).get(phase, {}).get(evaluator, {}).get("metrics", {})
                mine = dict(_numbers(entry["metrics"], f"{branch}.{phase}.{evaluator}"))
                theirs = dict(_numbers(other, f"{branch}.{phase}.{evaluator}"))
                for key, value in mine.items():
                    checks.append(Check(key, value, theirs.get(key), key in theirs
                                        and _same(value, theirs[key], tolerance)))
    return checks


def verify(results: dict[str, Any], cache_dir: Path, output_dir: Path, tolerance: float = DEFAULT_TOLERANCE,
           data_dir: Path | None = None, device: str | None = None,
           console: Console | None = None) -> tuple[list[Check], Path]:
    """Re-run the cell; returns (checks, the re-run's directory)."""
    from harness.runner import execute

    config = rerun_config(results, cache_dir, output_dir, data_dir, device)
    rerun, directory = execute(config, console or Console(stderr=True))
    return compare(results, rerun, tolerance), directory


def report(checks: list[Check], tolerance: float, title: str) -> Table:
    table = Table(title=title)
    table.add_column("check", overflow="fold", ratio=3)
    for column in ("submitted", "re-run", "|diff|", f"within {tolerance:g}"):
        table.add_column(column, overflow="fold", ratio=1)

    def show(v: Any) -> str:
        return f"{v:.6g}" if isinstance(v, float) else ("–" if v is None else str(v))

    for c in checks:
        name = c.name.replace("pre_attack", "pre").replace("post_attack", "post")
        table.add_row(name, show(c.submitted), show(c.rerun), show(c.diff),
                      "[green]pass[/]" if c.ok else "[bold red]FAIL[/]")
    return table
