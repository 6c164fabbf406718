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
        os.fchmod(fd, _file_mode())  # mkstemp's 0600 would hide results from other users of a shared cache
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
        _share(scratch)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _share(directory: Path) -> None:
    """Give what a library wrote into ``directory`` the umask's modes (some write weights through
    mkstemp, 0600), so every user of a shared cache can read a published stage."""
    directory_mode, file_mode = _directory_mode(), _file_mode()  # one umask read per stage, not per file
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, directory_mode if path.is_dir() else file_mode)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask(0) would briefly
    let other threads create world-writable files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _directory_mode() -> int:
    """What ``mkdir`` would give under the current umask."""
    return 0o777 & ~_umask()


def _file_mode() -> int:
    """What ``open(path, "w")`` would give under the current umask."""
    return 0o666 & ~_umask()


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
