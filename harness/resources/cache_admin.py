"""`harness cache ls | du | prune`: see what the stage cache holds and remove what is no longer needed.

A stage is held while a process has its lock (``StageStore.claim``: an flock on ``stages/.locks/<key>.lock``,
which the kernel releases when the holder dies, so a held lock always means a live process). Prune takes
that lock itself, without waiting, before it touches a stage: a held stage is skipped, and no process can
start building or dropping it while it is removed. Scratch directories of writes in progress (``.<key>.tmp-*``)
are never listed or pruned; the store removes abandoned ones itself.

Dropping a model stage's weights keeps its manifest (stats, loss history, key) and marks it
``"weights": "dropped"``; the pipeline recreates the weights through its cache-miss path when a later stage
needs them.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from harness.errors import ConfigError
from harness.files.atomic import write_json
from harness.resources.sizes import tree_size

MANIFEST = "stage.json"  # harness.run.store.MANIFEST, repeated so that listing the cache imports no torch
WEIGHTS_DIR = "model"
KINDS = ("defend", "attack", "evaluate")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


@dataclass
class StageEntry:
    """One stored stage as ``cache ls`` shows it."""

    key: str
    kind: str
    plugin: str
    parent: str | None
    size: int
    created: float
    weights: str  # "kept", "dropped", "alias" (points at its parent) or "none" (an evaluation)
    held: bool
    complete: bool = True

    def age_seconds(self, now: float | None = None) -> float:
        return (now or time.time()) - self.created


@dataclass
class PruneReport:
    removed: list[StageEntry] = field(default_factory=list)
    dropped: list[StageEntry] = field(default_factory=list)  # weights dropped, stage kept
    held: list[StageEntry] = field(default_factory=list)  # matched but a live process holds it
    kept_defended: int = 0  # matched defended models left alone (--include-defended to prune them)
    freed: int = 0


def stages_root(cache_dir: Path) -> Path:
    return Path(cache_dir) / "stages"


def lock_path(cache_dir: Path, key: str) -> Path:
    """The lock ``StageStore.claim`` takes for ``key``."""
    return stages_root(cache_dir) / ".locks" / f"{key}.lock"


@contextmanager
def try_hold(cache_dir: Path, key: str) -> Iterator[bool]:
    """Hold ``key``'s lock for the block if no live process holds it; yields whether it is ours."""
    path = lock_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_held(cache_dir: Path, key: str) -> bool:
    if not lock_path(cache_dir, key).exists():
        return False
    with try_hold(cache_dir, key) as ours:
        return not ours


def list_stages(cache_dir: Path) -> list[StageEntry]:
    """Every stage directory (oldest first); one without a readable manifest is listed as incomplete."""
    root = stages_root(cache_dir)
    if not root.is_dir():
        return []
    entries = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None
        size = tree_size(directory)
        held = is_held(cache_dir, directory.name)
        if manifest is None:
            entries.append(StageEntry(directory.name, "?", "?", None, size, directory.stat().st_mtime, "none",
                                      held, complete=False))
            continue
        entries.append(StageEntry(
            key=directory.name, kind=str(manifest.get("kind", "?")), plugin=str(manifest.get("plugin", "?")),
            parent=manifest.get("parent"), size=size, created=float(manifest.get("created", 0)),
            weights=_weights_state(manifest), held=held,
        ))
    return sorted(entries, key=lambda e: e.created)


def _weights_state(manifest: dict) -> str:
    if manifest.get("weights") == "dropped":
        return "dropped"
    output = manifest.get("output")
    if output == "alias":
        return "alias"
    return "kept" if output in ("model", "adapter") else "none"


def usage(cache_dir: Path) -> dict[str, int]:
    """Bytes by stage kind (plus dropped-weight stages' remains under their kind) and by other cache folders."""
    totals: dict[str, int] = {}
    for entry in list_stages(cache_dir):
        name = entry.kind if entry.complete else "incomplete"
        totals[f"stages/{name}"] = totals.get(f"stages/{name}", 0) + entry.size
    root = Path(cache_dir)
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.name != "stages":
                totals[child.name] = tree_size(child) if child.is_dir() else child.stat().st_size
    return totals


def drop_weights(cache_dir: Path, key: str) -> int:
    """Remove a model stage's weights, keep its manifest (now marked dropped); the caller holds the stage's
    lock. Returns the bytes freed (0 for a stage without weights or already dropped)."""
    directory = stages_root(cache_dir) / key
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if _weights_state(manifest) != "kept":
        return 0
    weights = directory / WEIGHTS_DIR
    freed = tree_size(weights)
    prefix = f"{WEIGHTS_DIR}/"
    dropped = {name: entry for name, entry in manifest["files"].items() if name.startswith(prefix)}
    manifest["files"] = {name: entry for name, entry in manifest["files"].items() if name not in dropped}
    manifest.update(weights="dropped", dropped_bytes=freed, dropped_at=time.time())
    # Weights first: a manifest that still lists them is "missing a file" (rebuilt) if we die between the two,
    # a manifest that does not while they exist would be "unlisted file" (also rebuilt): both are safe.
    shutil.rmtree(weights, ignore_errors=True)
    write_json(manifest_path, manifest)
    return freed


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise ConfigError(f"--older-than {text!r}: give a number and a unit, e.g. 12h, 7d or 2w (s, m, h, d, w).")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]


def parse_size(text: str) -> int:
    """'500MB', '1.5GiB', '2G', '10k' -> bytes (binary multiples: a cache of weights is sized in GiB)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--larger-than {text!r}: give a size such as 500MB, 2GB or 1.5GiB.")
    return int(float(match.group(1)) * 1024 ** " kmgt".index((match.group(2) or " ").lower()))


def prune(cache_dir: Path, *, older_than: float | None = None, kinds: tuple[str, ...] = (),
          larger_than: int | None = None, include_defended: bool = False, weights_only: bool = False,
          dry_run: bool = False, now: float | None = None) -> PruneReport:
    """Remove stages that match every given criterion; defended models only with ``include_defended``, a
    stage a live process holds never. ``weights_only`` drops model weights and keeps results and manifests."""
    if older_than is None and not kinds and larger_than is None:
        raise ConfigError("cache prune: say what to prune with --older-than, --kind or --larger-than "
                          "(e.g. --kind attack --older-than 7d); `harness cache ls` shows what is there.")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ConfigError(f"--kind {', '.join(unknown)}: choose from {', '.join(KINDS)}.")
    report = PruneReport()
    now = now or time.time()
    for entry in list_stages(cache_dir):
        if older_than is not None and entry.age_seconds(now) < older_than:
            continue
        if kinds and entry.kind not in kinds:
            continue
        if larger_than is not None and entry.size < larger_than:
            continue
        if entry.kind == "defend" and not include_defended:
            report.kept_defended += 1
            continue
        if weights_only and entry.weights != "kept":
            continue
        with try_hold(cache_dir, entry.key) as ours:
            if not ours:
                report.held.append(entry)
                continue
            if dry_run:
                (report.dropped if weights_only else report.removed).append(entry)
                report.freed += tree_size(stages_root(cache_dir) / entry.key / WEIGHTS_DIR) if weights_only \
                    else entry.size
            elif weights_only:
                report.freed += drop_weights(cache_dir, entry.key)
                report.dropped.append(entry)
            else:
                shutil.rmtree(stages_root(cache_dir) / entry.key, ignore_errors=True)
                report.freed += entry.size
                report.removed.append(entry)
    return report
