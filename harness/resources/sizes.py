"""Sizes on disk: what a directory holds and what its file system has free (no harness imports, so the
cache tools and the pipeline can both use it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while we walked
                continue
    return total


def free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged user) on the file system that holds ``path`` or its nearest parent."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
