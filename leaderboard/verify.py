"""`harness leaderboard verify`: re-run one submitted cell from its recorded config and compare.

A submission's numbers are claims; this turns one of them into a measurement. The recorded
config (every param, seed, evaluator and judge) is rebuilt with :func:`harness.run.config.build_config`
and run with :func:`harness.run.runner.execute` into separate cache and output directories; then the
model and data fingerprints must be equal and every numeric metric within ``tolerance``
(absolute). On CPU the pipeline is deterministic, so a re-run matches exactly; across GPUs and
library versions small differences are expected, hence the tolerance.

The recorded config is a stranger's, so verify runs only what the board's rules allow, and refuses
anything else before any work: every plugin must be registered here and every param valid (as for
a first-party run); ``trust_remote_code`` is off everywhere and no param names an interpreter; the
model and any judge model are the embedded ones (``smollm2-135m-instruct``, ``tiny-llama``) unless
the user allows another reference (``--allow-model``); and the run name, cache, output and data
directories are this machine's, never the submitter's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError
from harness.models.loading import EMBEDDED_MODEL, TINY_MODEL
from harness.results.schema import load_results
from harness.run.config import RunConfig, build_config
from harness.run.names import safe_part
from harness.terminal import plain

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


KNOWN_MODELS = (EMBEDDED_MODEL, TINY_MODEL)  # what the harness ships: no code from outside
MODEL_KEYS = ("model", "ref", "base_model", "reference_model")  # params that name a model to load


class RefusedConfig(HarnessError):
    """A recorded config that verify will not run; the message names the field and what to do."""


def rerun_config(results: dict[str, Any], cache_dir: Path, output_dir: Path, data_dir: Path | None = None,
                 device: str | None = None, allow_models: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The recorded config, validated like a first-party one, with this machine's directories, a
    safe run name (and optionally device) swapped in; refused if it would do what the board forbids."""
    recorded = copy.deepcopy(results["config"])
    if not isinstance(recorded, dict):
        raise RefusedConfig("config: the recorded config is not an object; nothing to re-run.")
    recorded["cache_dir"], recorded["output_dir"] = str(Path(cache_dir).resolve()), str(Path(output_dir).resolve())
    recorded["run_name"] = rerun_name(results)
    data = recorded.get("data")
    recorded["data"] = {**(data if isinstance(data, dict) else {}), "dir": str(data_dir) if data_dir else None}
    if device and isinstance(recorded.get("model"), dict):
        recorded["model"]["device"] = device
    config = build_config(flags=recorded, profile=recorded.get("profile"))
    check_rerunnable(config, allow_models)
    return config


def rerun_name(results: dict[str, Any]) -> str:
    """A run name made here (one safe path part), never the submitter's: the re-run stays in --output-dir."""
    def name(field: str) -> str:
        value = results.get(field)
        return str(value.get("name")) if isinstance(value, dict) else "x"

    return safe_part(f"verify-{name('defence')}-{name('attack')}-seed{results.get('seed')}", "verify")


def _judge_params(config: RunConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every judge's params with its defaults filled in (a default model is loaded as much as a set one)."""
    from harness.registry import judges

    for evaluator, params in config.evaluate.items():
        for i, spec in enumerate(params.get("judges") or []):
            where = f"evaluate.{evaluator}.judges.{i}.params"
            yield where, judges.get(spec["name"]).parse_params(spec.get("params") or {}, where).model_dump(mode="json")


def check_rerunnable(config: RunConfig, allow_models: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse a config that loads model code, runs another interpreter or loads a model not allowed."""
    from leaderboard.intake import walk

    found = [("", config.model_dump(mode="json")), *_judge_params(config)]
    for prefix, tree in found:
        for where, value in walk(tree, prefix):
            key = where.rsplit(".", 1)[-1]
            if key == "trust_remote_code" and value:
                raise RefusedConfig(f"{where} is true in the recorded config: verify never runs model code from "
                                    "the hub. A first-party run would not do it either; nothing was run.")
            if key == "python" and value is not None:
                raise RefusedConfig(f"{where} is {value!r} in the recorded config: verify runs only this "
                                    "harness's own interpreter; nothing was run.")
            if key in MODEL_KEYS and isinstance(value, str):
                check_model(where, value, allow_models)


def check_model(where: str, ref: str, allow_models: list[str] | tuple[str, ...] = ()) -> None:
    """Embedded models always; a local directory or hub id only when the user listed it."""
    if ref in KNOWN_MODELS or ref in allow_models:
        return
    raise RefusedConfig(f"{where} is {ref!r}, which is not an embedded model ({', '.join(KNOWN_MODELS)}). Verify "
                        f"loads another model only if you allow it: check it, then pass --allow-model {ref!r}.")


def describe(config: RunConfig) -> str:
    """What will actually run: from the rebuilt config, not from the submitter's record."""
    evaluators = ", ".join(config.evaluate)
    return (f"{config.defence.label} / {config.attack.label} / seed {config.seed} on {config.model.ref} "
            f"(device {config.model.device}, evaluators {evaluators}) into {config.output_dir / config.run_name}")


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


def verify(results: dict[str, Any], config: RunConfig, tolerance: float = DEFAULT_TOLERANCE,
           console: Console | None = None) -> tuple[list[Check], Path]:
    """Re-run the cell with ``config`` (from :func:`rerun_config`); returns (checks, the re-run's directory)."""
    from harness.run.runner import execute

    rerun, directory = execute(config, console or Console(stderr=True))
    return compare(results, rerun, tolerance), directory


def report(checks: list[Check], tolerance: float, title: str) -> Table:
    table = Table(title=plain(title))
    table.add_column("check", overflow="fold", ratio=3)
    for column in ("submitted", "re-run", "|diff|", f"within {tolerance:g}"):
        table.add_column(column, overflow="fold", ratio=1)

    def show(v: Any) -> str:
        return f"{v:.6g}" if isinstance(v, float) else ("–" if v is None else str(v))

    for c in checks:
        name = c.name.replace("pre_attack", "pre").replace("post_attack", "post")
        table.add_row(plain(name), plain(show(c.submitted)), plain(show(c.rerun)), show(c.diff),
                      "[green]pass[/]" if c.ok else "[bold red]FAIL[/]")
    return table
