"""Where data, caches and run outputs live. Every location is configurable; nothing is copied."""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import ConfigError, DataError

DATA_DIR_ENV = "HARNESS_DATA_DIR"
CACHE_DIR_ENV = "HARNESS_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]


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
    if path.exists() and not path.is_dir():
        raise DataError(f"Data directory {path} is a file, not a directory. Point --data-dir or ${DATA_DIR_ENV} "
                        "at the bundle's data/ folder.")
    if not path.is_dir():
        raise DataError(f"Data directory {path} does not exist. Set --data-dir or ${DATA_DIR_ENV}.")
    return path


def check_output_dir(path: str | Path, field: str) -> None:
    """A cache or output directory that is (or lies under) a file would fail only when the first result
    is written; say so before any work."""
    resolved = Path(path).expanduser().absolute()
    for candidate in (resolved, *resolved.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == resolved else f"lies under {candidate}, which is"
                raise ConfigError(f"{field} {resolved} {where} a file, not a directory; give a directory path "
                                  f"(--{field.replace('_', '-')}).")
            return


def default_cache_dir() -> Path:
    """$HARNESS_CACHE_DIR, else .harness-cache in the working directory (relative, as a config would give it)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or ".harness-cache")
