"""Content-addressed stage store: ``<cache>/stages/<key>/`` holds one stage's output.

A stage directory is complete only if its ``stage.json`` manifest exists, every file it
lists has the recorded size and sha256, and every file present is listed (a manifest that
lists nothing must not vouch for weights beside it). Anything else (a killed write, a truncated or edited
file) is detected, removed and rebuilt, never trusted. Writes go to a scratch directory that
is renamed into place, so a crash never leaves a half-written stage under its key.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.files.atomic import atomic_dir, sweep_scratch, write_json
from harness.files.hashing import file_sha256

log = logging.getLogger(__name__)
MANIFEST = "stage.json"


class StageStore:
    def __init__(self, cache_dir: Path) -> None:
        self.root = Path(cache_dir) / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self._verified: set[str] = set()
        sweep_scratch(self.root, is_stale=self._unclaimed)  # not the scratch of a live concurrent writer

    def path(self, key: str) -> Path:
        return self.root / key

    def _problem(self, key: str) -> str | None:
        """Why the stage under ``key`` cannot be trusted, or None if it is complete."""
        directory = self.path(key)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            return "no manifest (interrupted write?)"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            return "unreadable manifest"
        if manifest.get("key") != key:
            return "manifest belongs to another key"
        listed = manifest.get("files")
        if not isinstance(listed, dict):
            return "manifest has no file list"
        present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
        unlisted = sorted(present - set(listed))
        if unlisted:
            return f"file {unlisted[0]} is not covered by the manifest"
        for name, expected in listed.items():
            path = directory / name
            if not path.is_file():
                return f"missing file {name}"
            if not isinstance(expected, dict) or path.stat().st_size != expected.get("size"):
                return f"wrong size for {name}"
            if file_sha256(path) != expected.get("sha256"):
                return f"checksum mismatch for {name}"
        return None

    def has(self, key: str) -> bool:
        """True for a complete, verified stage; a corrupt one is deleted so it is rebuilt."""
        if key in self._verified:
            return True
        directory = self.path(key)
        if not directory.exists():
            return False
        problem = self._problem(key)
        if problem is None:
            self._verified.add(key)
            return True
        log.warning("Stage %s is incomplete or corrupt (%s); rebuilding it.", key, problem)
        shutil.rmtree(directory, ignore_errors=True)
        return False

    def manifest(self, key: str) -> dict[str, Any]:
        return json.loads((self.path(key) / MANIFEST).read_text())

    def _lock_file(self, key: str) -> Path:
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        return locks / f"{key}.lock"

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Exclusive lock on ``key`` while it is checked and built, so concurrent runs sharing this
        cache (sweep cells on Ray) build a shared stage once and the others reuse it."""
        with open(self._lock_file(key), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _unclaimed(self, key: str) -> bool:
        """True if no process is building ``key`` right now (its lock is free)."""
        with open(self._lock_file(key), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    @contextmanager
    def write(self, key: str, meta: dict[str, Any]) -> Iterator[Path]:
        """Yield a scratch directory; on success checksum its files and publish it under ``key``."""
        started = time.time()
        with atomic_dir(self.path(key)) as scratch:
            yield scratch
            files = {}
            for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
                name = path.relative_to(scratch).as_posix()
                files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
            manifest = {"key": key, **meta, "files": files, "created": started, "written": time.time()}
            write_json(scratch / MANIFEST, manifest)  # last: its presence marks completeness
        self._verified.add(key)
