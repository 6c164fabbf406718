"""`harness leaderboard add`: check a submission file from an outside group and put it on a board.

Checks, each failing with the file and the reason: the archive is safe to read (see
:mod:`leaderboard.archive`); the manifest lists exactly the files present with matching sha256;
every results.json matches its schema (older versions migrated) and agrees with its own config
and the manifest; names are safe; generation records are present. Accepted submissions live in
``<board>/submissions/<id>/``, where the id is the content address of the files, so adding the
same submission twice changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.atomic import atomic_dir
from harness.errors import HarnessError
from harness.results_schema import migrate, validate_results
from leaderboard.archive import MAX_FILE_BYTES, MAX_TOTAL_BYTES, SubmissionError, read_archive
from leaderboard.package import FORMAT, FORMAT_VERSION, MANIFEST, check_names, sha256, submission_id


@dataclass
class Submission:
    id: str
    manifest: dict[str, Any]
    files: dict[str, bytes]  # without the manifest
    results: dict[str, dict[str, Any]]  # member name -> validated results (current schema)

    def run(self, index: int) -> tuple[str, dict[str, Any]]:
        """(member name, results) of the manifest's ``index``-th run."""
        runs = self.manifest["runs"]
        if not 0 <= index < len(runs):
            listing = "; ".join(f"{i}: {r['defence']} / {r['attack']} / seed {r['seed']}" for i, r in enumerate(runs))
            raise HarnessError(f"No cell {index} in this submission; it has {len(runs)}: {listing}.")
        name = runs[index]["results"]
        return name, self.results[name]


def _json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SubmissionError(f"{name}: not valid JSON ({exc}).") from None


def _check_manifest(manifest: Any, files: dict[str, bytes]) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SubmissionError(f"{MANIFEST}: not a harness submission manifest (format must be {FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SubmissionError(f"{MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
                              f"(this harness reads {FORMAT_VERSION}); upgrade harmful-ft-harness.")
    for key, kind in (("files", dict), ("runs", list), ("defences", list)):
        if not isinstance(manifest.get(key), kind) or not manifest[key]:
            raise SubmissionError(f"{MANIFEST}: {key}: missing or empty.")
    listed = manifest["files"]
    if missing := sorted(set(listed) - set(files)):
        raise SubmissionError(f"{MANIFEST} lists files the archive does not contain: {', '.join(missing[:5])}.")
    if extra := sorted(set(files) - set(listed)):
        raise SubmissionError(f"Archive files not listed (no checksum) in {MANIFEST}: {', '.join(extra[:5])}.")
    for name in sorted(files):
        actual = sha256(files[name])
        if listed[name] != actual:
            raise SubmissionError(f"{name}: checksum mismatch (manifest sha256 {str(listed[name])[:12]}…, file "
                                  f"{actual[:12]}…): the file was changed after it was packaged.")


def _check_results(name: str, results: dict[str, Any], files: dict[str, bytes]) -> None:
    """Plausibility beyond the schema: the record agrees with its own config and carries its evidence."""
    check_names(results, name)
    expected = f"runs/{results['run_name']}/results.json"
    if name != expected:
        raise SubmissionError(f"{name}: run_name {results['run_name']!r} does not match its place in the archive.")
    config = results["config"]
    for field in ("defence", "attack"):
        if config[field]["name"] != results[field]["name"]:
            raise SubmissionError(f"{name}: {field}.name {results[field]['name']!r} differs from the recorded "
                                  f"config's {config[field]['name']!r}.")
    if config["seed"] != results["seed"]:
        raise SubmissionError(f"{name}: seed {results['seed']} differs from the recorded config's {config['seed']}.")
    base = name.rsplit("/", 1)[0]
    for branch, content in results["results"].items():
        for phase in ("pre_attack", "post_attack"):
            for evaluator, entry in content[phase].items():
                if f"{base}/{entry['records']}" not in files:
                    raise SubmissionError(f"{name}: results.{branch}.{phase}.{evaluator}.records "
                                          f"{entry['records']!r} is not in the archive.")


def open_submission(path: Path, max_file_bytes: int = MAX_FILE_BYTES,
                    max_total_bytes: int = MAX_TOTAL_BYTES) -> Submission:
    """Read and check a submission file completely; nothing is written."""
    files = read_archive(path, max_file_bytes, max_total_bytes)
    if MANIFEST not in files:
        raise SubmissionError(f"{path}: no {MANIFEST} at the top of the archive (make one with `harness submit`).")
    manifest = _json(MANIFEST, files.pop(MANIFEST))
    _check_manifest(manifest, files)
    ident = submission_id(manifest["files"])
    if manifest.get("id") not in (None, ident):
        raise SubmissionError(f"{MANIFEST}: id {manifest['id']!r} does not match the files (expected {ident}).")
    results = {}
    for name in sorted(n for n in files if n.endswith("/results.json")):
        obj = _json(name, files[name])
        if not isinstance(obj, dict):
            raise SubmissionError(f"{name}: expected a JSON object.")
        obj = migrate(obj, name)
        validate_results(obj, name)
        _check_results(name, obj, files)
        results[name] = obj
    listed = [run.get("results") if isinstance(run, dict) else None for run in manifest["runs"]]
    if sorted(map(str, listed)) != sorted(results):
        raise SubmissionError(f"{MANIFEST}: runs list {len(listed)} results files but the archive holds "
                              f"{len(results)}; they must be the same files.")
    named = {d.get("name") if isinstance(d, dict) else None for d in manifest["defences"]}
    used = {r["defence"]["name"] for r in results.values()}
    if named != used:
        raise SubmissionError(f"{MANIFEST}: defences {sorted(map(str, named))} do not match the runs' defences "
                              f"{sorted(used)}.")
    if any(not isinstance(d.get("module"), str) for d in manifest["defences"]):
        raise SubmissionError(f"{MANIFEST}: every defence needs its plugin module (re-package with `harness submit`).")
    return Submission(ident, manifest, files, results)


def add(path: Path, board: Path, **limits: int) -> tuple[Submission, Path, bool]:
    """Check ``path`` and copy it into ``board``; returns (submission, its directory, newly added?)."""
    submission = open_submission(path, **limits)
    target = Path(board) / "submissions" / submission.id
    if (target / MANIFEST).is_file():
        return submission, target, False
    with atomic_dir(target) as scratch:
        for name, data in {**submission.files, MANIFEST: json.dumps(submission.manifest, indent=2).encode()}.items():
            destination = scratch / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)
    return submission, target, True
