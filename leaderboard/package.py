"""`harness submit`: package finished runs into one file a leaderboard can check and accept.

The archive holds, per run, its results.json (at the current schema version), the config it ran
with and its generation records; a sweep's index if one was given; and ``manifest.json`` with a
sha256 of every file and a reference to the code of each defence (module, plugin version and
the installed distribution it came from), so a reader can install the same code and re-run a cell.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.results.schema import load_results
from harness.run.names import SAFE_NAME
from leaderboard.aggregate import find_results
from leaderboard.archive import SubmissionError, write_archive

FORMAT = "harness-submission"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SWEEP_FILES = ("sweep.json", "matrix.json", "matrix.md")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def submission_id(checksums: dict[str, str]) -> str:
    """Content address of a submission: the same files give the same id, however often packaged."""
    return sha256("\n".join(f"{name} {digest}" for name, digest in sorted(checksums.items())).encode())[:16]


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def run_dirs(path: Path) -> tuple[list[Path], list[Path]]:
    """(run directories, sweep files) for a run dir, a sweep dir (sweep.json) or any tree of runs."""
    path = Path(path)
    if (path / "results.json").is_file():
        return [path], []
    index = path / "sweep.json"
    if index.is_file():
        cells = json.loads(index.read_text()).get("cells", [])
        found = []
        for cell in cells:
            if cell.get("status") != "ok" or not cell.get("run_dir"):
                continue
            recorded = Path(cell["run_dir"])
            # the sweep lives in <output_dir>/sweeps/<name>; runs in <output_dir>/<run_name>
            for candidate in (recorded, path.parent.parent / recorded.name):
                if (candidate / "results.json").is_file():
                    found.append(candidate)
                    break
            else:
                raise HarnessError(f"{index}: cell run directory {recorded} has no results.json.")
        return found, [path / name for name in SWEEP_FILES if (path / name).is_file()]
    return [p.parent for p in find_results([path])], []


def plugin_reference(name: str) -> dict[str, Any]:
    """Where the code of defence ``name`` comes from, as installed in this environment."""
    from harness.registry import BUILTIN_MODULES, defences

    plugin = defences.get(name)
    module = plugin.fn.__module__
    entry_point, distribution = None, None
    for ep in importlib.metadata.entry_points(group=defences.entry_point_group):
        target = ep.value.split(":")[0]
        if module == target or module.startswith(target + "."):
            entry_point = f"{ep.name} = {ep.value}"
            distribution = ep.dist.name if ep.dist else None
            break
    if distribution is None:
        names = importlib.metadata.packages_distributions().get(module.split(".")[0], [])
        distribution = names[0] if names else None
    version = None
    if distribution:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "name": name, "module": module, "function": plugin.fn.__qualname__, "plugin_version": plugin.version,
        "description": plugin.description, "builtin": module.split(".")[0] in BUILTIN_MODULES,
        "entry_point": entry_point,
        "distribution": {"name": distribution, "version": version} if distribution else None,
    }


def check_names(results: dict[str, Any], where: str) -> None:
    """Names that end up in pages, file names and tables must be plain identifiers."""
    for field in ("defence", "attack"):
        for key in ("name", "preset"):
            value = results[field].get(key)
            if value is not None and not SAFE_NAME.match(str(value)):
                raise SubmissionError(f"{where}: {field}.{key} {str(value)!r} is not a safe name "
                                      f"(letters, digits and ._+- only, at most 64, starting with a letter or digit).")


def collect(path: Path) -> tuple[dict[str, bytes], list[dict[str, Any]], set[str]]:
    """(archive files, run entries for the manifest, defence names) of the runs under ``path``."""
    runs, sweep_files = run_dirs(path)
    if not runs:
        raise HarnessError(f"{path}: no results.json found (give a run directory, a sweep directory or a tree "
                           "of runs).")
    files: dict[str, bytes] = {}
    entries, defences = [], set()
    for run_dir in runs:
        results = load_results(run_dir / "results.json")
        check_names(results, str(run_dir / "results.json"))
        base = f"runs/{results['run_name']}"
        if f"{base}/results.json" in files:
            raise HarnessError(f"Two runs are named {results['run_name']!r}; submit them separately.")
        for content in results["results"].values():
            for phase in ("pre_attack", "post_attack"):
                for evaluator, entry in content[phase].items():
                    source = run_dir / entry["records"]
                    if not source.is_file():
                        raise HarnessError(f"{source}: records of {evaluator} are missing; re-run to recreate them.")
                    files[f"{base}/{entry['records']}"] = source.read_bytes()
        files[f"{base}/results.json"] = _dumps(results)
        files[f"{base}/config.json"] = _dumps(results["config"])
        defences.add(results["defence"]["name"])
        entries.append({"run_name": results["run_name"], "results": f"{base}/results.json",
                        "model": results["model"]["ref"], "defence": results["defence"]["name"],
                        "attack": results["attack"]["name"], "attack_preset": results["attack"].get("preset"),
                        "seed": results["seed"]})
    for sweep_file in sweep_files:
        files[f"sweep/{sweep_file.name}"] = sweep_file.read_bytes()
    return files, entries, defences


def package(path: Path, out: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the submission archive; returns (its path, the manifest)."""
    from harness.results.record import code_version

    files, entries, defences = collect(Path(path))
    checksums = {name: sha256(data) for name, data in sorted(files.items())}
    ident = submission_id(checksums)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "id": ident,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "harness": {"version": importlib.metadata.version("harmful-ft-harness"), "code_version": code_version()},
        "defences": [plugin_reference(name) for name in sorted(defences)],
        "runs": sorted(entries, key=lambda e: e["results"]),
        "files": checksums,
    }
    out = Path(out) if out else Path(f"submission-{ident}.tar.gz")
    write_archive(out, {**files, MANIFEST: _dumps(manifest)})
    return out, manifest
