"""`harness leaderboard add`: check a submission file from an outside group and put it on a board.

Checks, each failing with the file and the reason: the archive is safe to read (see
:mod:`leaderboard.archive`); every JSON file is parsed with depth and size limits; the manifest
lists exactly the files present with matching sha256; every results.json matches its schema
(older versions migrated); its recorded config is one a first-party run could have used (no
``trust_remote_code``, a plain run name) and agrees with the record on what ran (model, defence
and attack with params and presets, seed, profile, data, evaluators and their params); names are
safe; and every harmfulness number (judge-error-corrected rates and the fluency guard included),
capability number and over-refusal number (each refusal flag re-derived from its response) is
what the submitted records give (:mod:`leaderboard.evidence`). Accepted submissions live in
``<board>/submissions/<id>/``, where the id is the content address of the files, so adding the
same submission twice changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.errors import ConfigError, HarnessError
from harness.files.atomic import atomic_dir
from harness.results.schema import loads_bounded, migrate, validate_results
from harness.run.names import check_run_name
from leaderboard.archive import MAX_FILE_BYTES, MAX_TOTAL_BYTES, SubmissionError, read_archive
from leaderboard.evidence import check_evidence
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
            listing = "; ".join(f"{i}: {r.get('defence')} / {r.get('attack')} / seed {r.get('seed')}"
                                for i, r in enumerate(runs))
            raise HarnessError(f"No cell {index} in this submission; it has {len(runs)}: {listing}.")
        name = runs[index]["results"]
        return name, self.results[name]


# (field of the record, field of its recorded config) that must be equal: what ran is what is claimed
AGREE = [("model.ref", "model.ref"), ("model.revision", "model.revision"), ("seed", "seed"),
         ("profile", "profile"), ("data.eval_prompts", "data.eval_prompts"),
         ("data.prompt_format", "data.prompt_format"),
         *((f"{p}.{k}", f"{p}.{k}") for p in ("defence", "attack") for k in ("name", "preset", "params"))]


def _json(name: str, data: bytes) -> Any:
    """Parse a submitted JSON file with depth and size limits (a deep file never reaches json.loads)."""
    return loads_bounded(data, name, error=SubmissionError)


def _get(obj: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every entry of nested dicts and lists, however deep."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            yield where, item
            yield from walk(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk(item, f"{path}.{i}")


def _check_config(name: str, results: dict[str, Any]) -> None:
    """The recorded config is what verify would re-run: it must be safe and describe this record."""
    config = results["config"]
    if not isinstance(config, dict):
        raise SubmissionError(f"{name}: config: expected an object.")
    for where, value in walk(config, "config"):
        if where.endswith(".trust_remote_code") and value is not False:
            raise SubmissionError(f"{name}: {where} is {value!r}; a submission must run without model code from "
                                  "the hub (false), as first-party runs do.")
    for where, value in (("run_name", results["run_name"]), ("config.run_name", config.get("run_name"))):
        if value is not None:
            try:
                check_run_name(str(value))
            except ConfigError as exc:
                raise SubmissionError(f"{name}: {where}: {exc}") from None
    for recorded, configured in AGREE:
        if _get(results, recorded) != _get(config, configured):
            raise SubmissionError(f"{name}: {recorded} {_get(results, recorded)!r} differs from the recorded "
                                  f"config's {configured} {_get(config, configured)!r}.")
    _check_evaluators(name, results, config)


def _check_evaluators(name: str, results: dict[str, Any], config: dict[str, Any]) -> None:
    """The config's evaluators (with their params) are exactly the evaluations recorded."""
    configured = config.get("evaluate")
    if not isinstance(configured, dict):
        raise SubmissionError(f"{name}: config.evaluate: expected an object of evaluator -> params.")
    for branch, content in results["results"].items():
        for phase in ("pre_attack", "post_attack"):
            for evaluator, entry in content[phase].items():
                if evaluator not in configured:
                    raise SubmissionError(f"{name}: results.{branch}.{phase}.{evaluator} was not in the recorded "
                                          f"config's evaluate ({', '.join(sorted(configured)) or 'none'}).")
                if entry["params"] != configured[evaluator]:
                    raise SubmissionError(f"{name}: results.{branch}.{phase}.{evaluator}.params differ from the "
                                          f"recorded config's evaluate.{evaluator}.")


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
    _check_config(name, results)
    expected = f"runs/{results['run_name']}/results.json"
    if name != expected:
        raise SubmissionError(f"{name}: run_name {results['run_name']!r} does not match its place in the archive.")
    base = name.rsplit("/", 1)[0]
    for branch, content in results["results"].items():
        for phase in ("pre_attack", "post_attack"):
            for evaluator, entry in content[phase].items():
                if f"{base}/{entry['records']}" not in files:
                    raise SubmissionError(f"{name}: results.{branch}.{phase}.{evaluator}.records "
                                          f"{entry['records']!r} is not in the archive.")
    recorded = f"{base}/config.json"
    if recorded in files and _json(recorded, files[recorded]) != results["config"]:
        raise SubmissionError(f"{base}/config.json differs from the config recorded in {name}.")
    check_evidence(name, results, files)


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
        try:
            _check_results(name, obj, files)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # schema-valid, malformed inside
            raise SubmissionError(f"{name}: malformed ({type(exc).__name__}: {exc}); re-package the runs with "
                                  "`harness submit`.") from None
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


def check_board(board: Path) -> Path:
    """A board is a directory (made if missing); say so before reading the submission."""
    board = Path(board)
    for path in (board, board / "submissions"):
        if path.exists() and not path.is_dir():
            raise SubmissionError(f"--board {board}: {path} is a file, not a directory. Give the leaderboard "
                                  "directory (it is created if missing), e.g. --board board/.")
    return board


def add(path: Path, board: Path, **limits: int) -> tuple[Submission, Path, bool]:
    """Check ``path`` and copy it into ``board``; returns (submission, its directory, newly added?)."""
    board = check_board(board)
    submission = open_submission(path, **limits)
    target = board / "submissions" / submission.id
    if (target / MANIFEST).is_file():
        return submission, target, False
    with atomic_dir(target) as scratch:
        for name, data in {**submission.files, MANIFEST: json.dumps(submission.manifest, indent=2).encode()}.items():
            destination = scratch / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)
    return submission, target, True
