"""Reading data sets robustly and serving reproducible, disjoint splits to the stages.

Readers skip malformed rows (bad JSON, bad encoding, missing or empty fields) and count them;
a data set with no usable row fails with the file and line of the first problem. Training
sets (QA, pairs) never contain a prompt of the evaluation set (compared after
:func:`harness.records.normalise_prompt`), and every set is de-duplicated by normalised prompt.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from harness.errors import DataError
from harness.hashing import file_sha256, stable_hash
from harness.records import QA, Pair, Prompt, normalise_prompt
from harness.registry import datasets

log = logging.getLogger(__name__)
Record = TypeVar("Record", QA, Pair, Prompt)


@dataclass
class RowProblems:
    """Rows a reader dropped, with where and why (kept for the log and the error message)."""

    items: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, path: Path | str, line: int, reason: str) -> None:
        self.items.append((str(path), line, reason))

    def __len__(self) -> int:
        return len(self.items)

    def first(self) -> str:
        path, line, reason = self.items[0]
        return f"{path} line {line}: {reason}"


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def read_jsonl(path: Path, problems: RowProblems) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object); undecodable, unparsable and non-object lines are recorded."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.add(path, number, "not valid UTF-8")
                continue
            except json.JSONDecodeError as exc:
                problems.add(path, number, f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                problems.add(path, number, "not a JSON object")
                continue
            yield number, obj


def read_json(path: Path) -> Any:
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot parse JSON ({exc}).") from None


def read_csv(path: Path, problems: RowProblems) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) from a CSV with a header."""
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError:
        problems.add(path, 0, "not valid UTF-8")


def read_lines(path: Path, problems: RowProblems) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                problems.add(path, number, "not valid UTF-8")
                continue
            if text:
                yield number, text


def text_of(value: Any) -> str | None:
    """A non-empty stripped string, or None for missing, non-text or blank values."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def require_text(row: dict[str, Any], keys: Iterable[str], path: Path, line: int, problems: RowProblems) -> list[str] | None:
    values = [text_of(row.get(k)) for k in keys]
    missing = [k for k, v in zip(keys, values) if v is None]
    if missing:
        problems.add(path, line, f"missing or empty field(s): {', '.join(missing)}")
        return None
    return values  # type: ignore[return-value]


@dataclass
class LoadedData:
    name: str
    kind: str  # "qa" | "pairs" | "prompts"
    records: list[Any]
    fingerprint: str
    skipped: int


_fingerprint_memo: dict[tuple[str, int, int], str] = {}


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _fingerprint_memo:
        _fingerprint_memo[key] = file_sha256(path)
    return _fingerprint_memo[key]


def dedupe_by_prompt(records: Iterable[Record]) -> list[Record]:
    """Keep the first record of each normalised prompt."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = normalise_prompt(record.prompt)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def seeded_sample(records: list[Record], n: int | None, seed: int) -> list[Record]:
    """The same ``n`` records for the same seed; all (in a seeded order) when n is None or larger."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if n is not None:
        order = order[:n]
    return [records[i] for i in order]


def load_dataset(name: str, data_dir: Path) -> LoadedData:
    """Read a registered data set from the data directory (or the hub, for hub-backed names)."""
    plugin = datasets.get(name)
    kind = plugin.info["kind"]
    files = [data_dir / f for f in plugin.info.get("files", [])]
    for path in files:
        if not path.exists():
            raise DataError(
                f"Data set {name!r} needs {path}, which does not exist. Check --data-dir / "
                "$HARNESS_DATA_DIR (it should point at the offline bundle's data/ folder)."
            )
    problems = RowProblems()
    records = list(plugin.fn(data_dir, problems))
    if not records:
        where = problems.first() if len(problems) else "no rows"
        raise DataError(f"Data set {name!r} has no usable rows ({len(problems)} malformed; first: {where}).")
    if len(problems):
        log.warning("Data set %s: skipped %d malformed rows (first: %s)", name, len(problems), problems.first())
    fingerprint = stable_hash(
        {"name": name, "version": plugin.version, "files": {p.name: _file_fingerprint(p) for p in files},
         "hub": plugin.info.get("hub_fingerprint")}
    )
    return LoadedData(name, kind, records, fingerprint, len(problems))


class DataAccess:
    """What stages see of the data: named sets, split reproducibly, disjoint from evaluation prompts."""

    def __init__(self, data_dir: Path, eval_dataset: str, seed: int) -> None:
        self.data_dir = data_dir
        self.eval_dataset = eval_dataset
        self.seed = seed
        self._loaded: dict[str, LoadedData] = {}

    def load(self, name: str) -> LoadedData:
        if name not in self._loaded:
            self._loaded[name] = load_dataset(name, self.data_dir)
        return self._loaded[name]

    def _expect(self, name: str, kind: str) -> LoadedData:
        loaded = self.load(name)
        if loaded.kind != kind:
            raise DataError(f"Data set {name!r} holds {loaded.kind}, but {kind} are needed here.")
        return loaded

    def held_out_prompts(self) -> set[str]:
        """Every normalised prompt of the evaluation set: training data must avoid all of them."""
        return {normalise_prompt(r.prompt) for r in self.load(self.eval_dataset).records}

    def _training(self, name: str, kind: str, n: int | None) -> list[Any]:
        held_out = self.held_out_prompts()
        records = dedupe_by_prompt(self._expect(name, kind).records)
        kept = [r for r in records if normalise_prompt(r.prompt) not in held_out]
        if len(kept) < len(records):
            log.info("%s: dropped %d prompts that are in the evaluation set", name, len(records) - len(kept))
        if not kept:
            raise DataError(f"Every prompt of {name!r} is also in the evaluation set {self.eval_dataset!r}.")
        return seeded_sample(kept, n, self.seed)

    def qa(self, name: str, n: int | None = None) -> list[QA]:
        return self._training(name, "qa", n)

    def pairs(self, name: str, n: int | None = None) -> list[Pair]:
        return self._training(name, "pairs", n)

    def eval_prompts(self, n: int | None = None) -> list[Prompt]:
        records = dedupe_by_prompt(self._expect(self.eval_dataset, "prompts").records)
        return seeded_sample(records, n, self.seed)

    def fingerprint(self, name: str) -> str:
        return self.load(name).fingerprint
