"""Atomic file and directory writes: a reader sees the old state or the complete new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``final`` only if the block finishes.

    An existing ``final`` is replaced. A crash leaves only a ``.tmp-*`` sibling, which
    :func:`sweep_scratch` removes later; ``final`` is never half-written.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(scratch, _directory_mode())  # mkdtemp's 0700 would lock other users out of a shared cache
    try:
        yield scratch
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _directory_mode() -> int:
    """What ``mkdir`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def sweep_scratch(parent: Path, is_stale: Callable[[str], bool] = lambda name: True) -> None:
    """Remove scratch directories left by a killed process. ``is_stale(final_name)`` says whether
    the scratch of ``final_name`` may go (a caller sharing the directory with live writers checks
    that no one is writing it)."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        for marker in (".tmp-", ".old-"):
            if entry.name.startswith(".") and marker in entry.name:
                if is_stale(entry.name[1:entry.name.index(marker)]):
                    shutil.rmtree(entry, ignore_errors=True)
                break
