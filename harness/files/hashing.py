"""Stable content fingerprints: the basis of every cache key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def _normalise(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _normalise(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _normalise(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return "NaN"
    return obj


def stable_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace) so equal configs hash equally."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(stable_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_sha256_memo: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: Path) -> str:
    """:func:`file_sha256`, remembered per (path, size, mtime) for this process: data files are
    fingerprinted for every cache key, and re-reading them each time is wasted I/O."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_memo:
        _sha256_memo[key] = file_sha256(path)
    return _sha256_memo[key]
