"""Reading data sets robustly and serving reproducible, disjoint splits to the stages.

A data set is named by a reference: its registered name, optionally with a category filter,
``jbb-pairs[Privacy,Malware/Hacking]`` (only those categories) or ``jbb-harmful-qa[^Privacy]``
(all but those), so held-out-category experiments need no new data set.

Readers skip malformed rows (bad JSON, bad encoding, missing or empty fields) and count them;
a data set with no usable row fails with the file and line of the first problem. Training
sets (QA, pairs) never contain a prompt of the evaluation set (compared after
:func:`harness.data.records.normalise_prompt`), and every set is de-duplicated by normalised prompt.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from harness.data.records import QA, Pair, Prompt, normalise_prompt
from harness.errors import DataError, HarnessError
from harness.files.hashing import cached_file_sha256, stable_hash
from harness.registry import datasets

log = logging.getLogger(__name__)
Record = TypeVar("Record", QA, Pair, Prompt)
_DATA_REF = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<exclude>\^)?(?P<categories>[^\[\]]*)\])?$")


@dataclass(frozen=True)
class DataRef:
    """A data set name plus an optional category filter (include, or exclude with ``^``)."""

    name: str
    categories: tuple[str, ...] = ()
    exclude: bool = False

    def keeps(self, category: str | None) -> bool:
        if not self.categories:
            return True
        return (category in self.categories) != self.exclude


def parse_data_ref(ref: str) -> DataRef:
    """``name``, ``name[A,B]`` or ``name[^A,B]``; category names are trimmed, commas separate them."""
    match = _DATA_REF.match(ref.strip())
    if not match:
        raise DataError(f"Data set reference {ref!r} is malformed; use NAME, NAME[cat1,cat2] or NAME[^cat1,cat2].")
    categories = tuple(c.strip() for c in (match.group("categories") or "").split(",") if c.strip())
    if match.group("categories") is not None and not categories:
        raise DataError(f"Data set reference {ref!r} has an empty category list.")
    return DataRef(match.group("name").strip(), categories, bool(match.group("exclude")))


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


def require_text(
    row: dict[str, Any], keys: Iterable[str], path: Path, line: int, problems: RowProblems
) -> list[str] | None:
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


PAIRS_FILE = "pairs-file:"  # a pairs JSONL outside the bundle, e.g. written by `harness data refusals`


def load_pairs_file(name: str) -> LoadedData:
    """``pairs-file:PATH``: JSONL rows with prompt, harmful and harmless (and optionally category)."""
    path = Path(name[len(PAIRS_FILE):]).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"Data set {name!r}: {path} does not exist (write one with `harness data refusals`).")
    problems = RowProblems()
    records = []
    for line, row in read_jsonl(path, problems):
        fields = require_text(row, ("prompt", "harmful", "harmless"), path, line, problems)
        if fields:
            records.append(Pair(*fields, text_of(row.get("category")), f"file:{path.name}"))
    if not records:
        raise DataError(f"Data set {name!r} has no usable rows ({len(problems)} malformed; first: "
                        f"{problems.first() if len(problems) else 'no rows'}).")
    _log_skipped(name, problems)
    return LoadedData(name, "pairs", records, cached_file_sha256(path), len(problems))


def _log_skipped(name: str, problems: RowProblems) -> None:
    """One warning per data set with dropped rows; the count also goes to results.json (data.skipped_rows)."""
    if len(problems):
        log.warning("Data set %s: skipped %d malformed rows (first: %s)", name, len(problems), problems.first())


# (name, reader, its version, (path, size, mtime) of each file) -> what was read: a sweep's cells each check every
# data set they name before their first stage, and re-parsing the same files per cell dominated cached re-runs.
_loaded_memo: dict[tuple[Any, ...], LoadedData] = {}
_MEMO_ENTRIES = 32


def load_dataset(name: str, data_dir: Path) -> LoadedData:
    """Read a registered data set from the data directory (or the hub, for hub-backed names); a set whose
    files are unchanged since this process last read it is not parsed again (its records are immutable)."""
    if name.startswith(PAIRS_FILE):
        return load_pairs_file(name)
    plugin = datasets.get(name)
    files = [data_dir / f for f in plugin.hook("files") or []]
    for path in files:
        if not path.exists():
            raise DataError(
                f"Data set {name!r} needs {path}, which does not exist. Check --data-dir / "
                "$HARNESS_DATA_DIR (it should point at the offline bundle's data/ folder)."
            )
    if not files:  # hub-backed: nothing local to tell a change by
        return _read_dataset(name, data_dir, plugin, files)
    stamps = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (name, id(plugin.fn), plugin.version, stamps)
    if key not in _loaded_memo:
        if len(_loaded_memo) >= _MEMO_ENTRIES:
            _loaded_memo.pop(next(iter(_loaded_memo)))
        _loaded_memo[key] = _read_dataset(name, data_dir, plugin, files)
    loaded = _loaded_memo[key]
    return LoadedData(loaded.name, loaded.kind, list(loaded.records), loaded.fingerprint, loaded.skipped)


def _read_dataset(name: str, data_dir: Path, plugin: Any, files: list[Path]) -> LoadedData:
    kind = plugin.hook("kind")
    problems = RowProblems()
    records = list(plugin.fn(data_dir, problems))
    if not records:
        where = problems.first() if len(problems) else "no rows"
        raise DataError(f"Data set {name!r} has no usable rows ({len(problems)} malformed; first: {where}).")
    _log_skipped(name, problems)
    fingerprint = stable_hash(
        {"name": name, "version": plugin.version, "files": {p.name: cached_file_sha256(p) for p in files},
         "hub": plugin.hook("hub")}
    )
    return LoadedData(name, kind, records, fingerprint, len(problems))


def filter_categories(data: LoadedData, ref: DataRef, text: str) -> LoadedData:
    """The records of ``data`` that ``ref`` keeps; unknown category names are an error, not an empty set."""
    known = sorted({r.category for r in data.records if r.category})
    if not known:
        raise DataError(f"{text}: data set {data.name!r} has no categories, so it cannot be filtered by them.")
    unknown = [c for c in ref.categories if c not in known]
    if unknown:
        raise DataError(f"{text}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                        f"{', '.join(map(repr, unknown))} of {data.name!r}. Known: {', '.join(known)}.")
    kept = [r for r in data.records if ref.keeps(r.category)]
    if not kept:
        raise DataError(f"{text}: the category filter keeps no records.")
    fingerprint = stable_hash({"of": data.fingerprint, "categories": sorted(ref.categories), "exclude": ref.exclude})
    return LoadedData(text, data.kind, kept, fingerprint, data.skipped)


class DataAccess:
    """What stages see of the data: named sets, split reproducibly, disjoint from evaluation prompts."""

    def __init__(self, data_dir: Path, eval_dataset: str, seed: int) -> None:
        self.data_dir = data_dir
        self.eval_dataset = eval_dataset
        self.seed = seed
        self._loaded: dict[str, LoadedData] = {}

    def load(self, ref: str) -> LoadedData:
        """A data set by reference (name, or name with a category filter), loaded once."""
        if ref not in self._loaded:
            parsed = parse_data_ref(ref)
            whole = self._loaded.get(parsed.name) or load_dataset(parsed.name, self.data_dir)
            self._loaded[parsed.name] = whole
            self._loaded[ref] = whole if not parsed.categories else filter_categories(whole, parsed, ref)
        return self._loaded[ref]

    def _expect(self, name: str, kind: str) -> LoadedData:
        loaded = self.load(name)
        if loaded.kind != kind:
            raise DataError(f"Data set {name!r} holds {loaded.kind}, but {kind} are needed here.")
        return loaded

    def check(self, ref: str, kind: str, where: str) -> None:
        """Load ``ref`` now and check its kind, so a typo in a data set name or category filter stops the
        run before the first stage instead of after the stages that do not read it."""
        try:
            self._expect(ref, kind)
        except HarnessError as exc:  # DataError, or UnknownPluginError for an unknown name
            raise DataError(f"{where}: {exc}") from None

    def skipped_rows(self) -> dict[str, int]:
        """Malformed rows dropped per data set read so far (the whole set, before category filters)."""
        return {name: data.skipped for name, data in sorted(self._loaded.items()) if name == data.name}

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
        if n is not None and n > len(kept):
            log.warning("%s: %d examples asked for, only %d available (after de-duplication and removing "
                        "evaluation prompts); using all %d.", name, n, len(kept), len(kept))
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
