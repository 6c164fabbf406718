"""Where data, caches and run outputs live. Every location is configurable; nothing is copied."""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import DataError

DATA_DIR_ENV = "HARNESS_DATA_DIR"
CACHE_DIR_ENV = "HARNESS_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path | None:
    """The offline bundle beside the project (../shared/data), if present."""
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if (candidate / "MANIFEST.json").exists():
            return candidate.resolve()
    return None


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """CLI/config value, else $HARNESS_DATA_DIR, else the bundle at ../shared/data."""
    chosen = explicit or os.environ.get(DATA_DIR_ENV) or default_data_dir()
    if chosen is None:
        raise DataError(
            "No data directory found. Point the harness at the offline bundle with --data-dir PATH, "
            f"the {DATA_DIR_ENV} environment variable, or data.dir in the config."
        )
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"Data directory {path} does not exist. Set --data-dir or ${DATA_DIR_ENV}.")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, ".harness-cache")).resolve()
