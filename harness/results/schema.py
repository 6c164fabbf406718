"""Validate, read and migrate results.json against its typed model.

The models in :mod:`harness.results.model` (and the JSON Schema generated from them,
``harness/results/schemas/results-v<N>.schema.json``) are the contract between a run and everything that
reads it later: the leaderboard, submissions, other groups' tools. Files are validated when written
and when read; older versions are migrated on read, newer ones refused with a message saying to
upgrade. Errors name the path of each bad field.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from harness.errors import HarnessError
from harness.results.model import SCHEMA_VERSION, JudgeScores, RunResults
from harness.results.summary import derived_blocks, summary_block

MAX_PROBLEMS = 8  # listed per file; more are counted
MAX_JSON_DEPTH = 64  # a results.json nests about 10 levels; json.loads recurses once per level
MAX_JSON_BYTES = 32 * 1024 * 1024  # the submission archive's per-file limit
# A JSON string (closing quote optional, so an unterminated one ends the scan instead of making the
# regex retry at every later quote: each match is greedy and never backtracks, so the scan is linear).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class ResultsSchemaError(HarnessError):
    """A results.json that does not match its schema, or is not JSON at all."""


class ResultsVersionError(ResultsSchemaError):
    """A results.json whose schema version this harness cannot read."""


def json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, by a linear scan without recursion: json.loads
    recurses once per level, so a file nested 200,000 deep would end it in RecursionError."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def loads_bounded(data: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH,
                  max_bytes: int = MAX_JSON_BYTES, error: type[HarnessError] = ResultsSchemaError) -> Any:
    """``json.loads`` for text from outside: size and nesting depth are checked before parsing, and
    every failure is an ``error`` naming ``where`` and the limit, never a crash."""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise error(f"{where}: {size} bytes of JSON, over the limit of {max_bytes} bytes; refused unread.")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text ({exc}).") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} levels deep, over the limit of {max_depth}; refused unparsed "
                    "(harness files nest about 10 levels).")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{where}: not valid JSON ({exc}).") from None


@lru_cache(maxsize=None)
def schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The JSON Schema of one results.json version, shipped as package data (generated from
    :mod:`harness.results.model` for the current version)."""
    text = resources.files("harness.results").joinpath("schemas", f"results-v{version}.schema.json").read_text()
    return json.loads(text)


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_JSON_TYPES = {"int": "integer", "float": "number", "string": "string", "dict": "object", "model": "object",
               "list": "array", "bool": "boolean", "none": "null"}
# pydantic names the member of a union in the error location ('str', 'int', 'function-after[...]');
# a reader of results.json knows only field names
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "constrained-str"}


def _field_path(loc: tuple) -> tuple:
    return tuple(part for part in loc if not (isinstance(part, str) and (part in _UNION_TAGS or "[" in part)))


def _describe(error: dict[str, Any], prefix: tuple = ()) -> str:
    """One readable line per problem: 'model.fingerprint: missing required field'."""
    where = _path([*prefix, *_field_path(error["loc"])])
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return f"{where}: missing required field"
    if kind.endswith("_type") and kind[:-5] in _JSON_TYPES:
        return f"{where}: expected {_JSON_TYPES[kind[:-5]]}, got {_short(value)}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{where}: {_short(value)} is below {ctx.get('ge', ctx.get('gt'))}"
    if kind in ("less_than_equal", "less_than"):
        return f"{where}: {_short(value)} is above {ctx.get('le', ctx.get('lt'))}"
    if kind == "literal_error":
        return f"{where}: must be {ctx.get('expected')}, got {_short(value)}"
    if kind in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return f"{where}: must not be empty"
    if kind == "finite_number":
        return f"{where}: not a finite number"
    return f"{where}: {error['msg'][:200]}"


def _model_problems(model: type[BaseModel], obj: Any, prefix: tuple = ()) -> list[str]:
    try:
        model.model_validate(obj)
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=lambda e: list(map(str, _field_path(e["loc"]))))
        return list(dict.fromkeys(_describe(error, prefix) for error in errors))
    return []


def _judge_problems(obj: dict[str, Any]) -> list[str]:
    """What a field type cannot say: each judge's scores (keyed by the judge's name) are valid."""
    problems = []
    for branch, content in obj["results"].items():
        for phase in ("pre_attack", "post_attack"):
            entry = content[phase].get("harmfulness")
            if not entry:
                continue
            metrics = entry["metrics"]
            for judge in dict.fromkeys([metrics["primary_judge"], *entry["info"]["judges"]]):
                where = ("results", branch, phase, "harmfulness", "metrics", judge)
                if judge not in metrics:
                    problems.append(f"{_path(where)}: missing scores of judge {judge!r}")
                    continue
                problems += _model_problems(JudgeScores, metrics[judge], where)
    return problems


def _consistency_problems(obj: dict[str, Any]) -> list[str]:
    """The ``judge`` block is present exactly when harm was measured; ``summary`` matches ``results``."""
    problems = []
    harm_measured = bool(obj["results"]["defended"]["post_attack"].get("harmfulness"))
    if harm_measured and obj["judge"] is None:
        problems.append("judge: null, but the defended model's harmfulness was measured")
    if problems:
        return problems
    recorded = obj["summary"]["branches"]

    def recorded_metric(branch: str, phase: str) -> Callable[[str], str | None]:
        headlines = recorded.get(branch, {}).get(phase, {}).get("headlines", {})
        return lambda name: headlines.get(name, {}).get("metric")

    for branch in obj["results"]:
        for phase in ("pre_attack", "post_attack"):
            expected = summary_block(obj, recorded_metric(branch, phase))["branches"][branch][phase]
            if recorded.get(branch, {}).get(phase) != expected:
                problems.append(f"summary.branches.{branch}.{phase}: does not match results.{branch}.{phase}")
    if set(recorded) != set(obj["results"]):
        problems.append("summary.branches: branches differ from results")
    return problems


def validate_results(obj: Any, where: str = "results.json") -> None:
    """Raise :class:`ResultsSchemaError` naming every bad field of ``obj`` (a current-version dict)."""
    if not isinstance(obj, dict):
        raise ResultsSchemaError(f"{where}: expected a JSON object at the top level, got {type(obj).__name__}.")
    problems = _model_problems(RunResults, obj)
    try:
        problems += _judge_problems(obj)
    except (KeyError, TypeError, AttributeError):  # a broken structure the model already reported
        pass
    if not problems:
        problems = _consistency_problems(obj)
    if problems:
        more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise ResultsSchemaError(
            f"{where} does not match results schema v{SCHEMA_VERSION}: " + "; ".join(problems[:MAX_PROBLEMS]) + more
        )


def _v1_to_v2(obj: dict[str, Any]) -> dict[str, Any]:
    """v2 adds the derived ``judge`` and ``summary`` blocks; nothing else changed."""
    migrated = copy.deepcopy(obj)
    migrated.update(derived_blocks(migrated))
    migrated["schema_version"] = 2
    return migrated


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(obj: dict[str, Any], where: str = "results.json") -> dict[str, Any]:
    """Bring a results dict of any known version up to :data:`SCHEMA_VERSION` (returns a copy)."""
    version = obj.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ResultsVersionError(f"{where}: schema_version: missing or not an integer (got {_short(version)}); "
                                  f"is this a harness results.json?")
    if version > SCHEMA_VERSION:
        raise ResultsVersionError(
            f"{where}: schema version {version} was written by a newer harness; this one reads versions "
            f"1 to {SCHEMA_VERSION}. Upgrade harmful-ft-harness (pip install -U harmful-ft-harness)."
        )
    if version < 1:
        raise ResultsVersionError(f"{where}: unknown schema version {version} (known: 1 to {SCHEMA_VERSION}).")
    while version < SCHEMA_VERSION:
        try:
            obj = MIGRATIONS[version](obj)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ResultsSchemaError(
                f"{where}: cannot migrate schema v{version} to v{version + 1}: field {exc} is missing or malformed."
            ) from None
        version = obj["schema_version"]
    return obj


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a results.json, migrate it to the current version and validate it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:  # refused before reading it into memory
            raise ResultsSchemaError(f"{path}: {size} bytes, over the limit of {MAX_JSON_BYTES} bytes for a "
                                     "results.json; refused unread.")
        obj = loads_bounded(path.read_bytes(), str(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ResultsSchemaError(f"{path}: no such file.") from None
    except OSError as exc:  # unreadable (permissions, I/O): one bad file must not end a listing
        raise ResultsSchemaError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    if not isinstance(obj, dict):
        raise ResultsSchemaError(f"{path}: expected a JSON object at the top level.")
    obj = migrate(obj, str(path))
    validate_results(obj, str(path))
    return obj
