"""Submission archives: written deterministically, read defensively.

A submission is a ``.tar.gz`` of plain text files (JSON, JSONL, YAML, Markdown). Reading never
extracts: each member is checked (a regular file, a safe relative name, an allowed type, within
the size limits) and read into memory, and anything pickled or binary is refused, because a
leaderboard must never execute or unpickle what a stranger uploaded.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from pathlib import Path, PurePosixPath

from harness.errors import HarnessError
from harness.run.names import SAFE_PART

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_TOTAL_BYTES = 256 * 1024 * 1024
MAX_MEMBERS = 5000
MAX_DEPTH = 6
TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".csv")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib", ".npy", ".npz", ".dill")
# Pickle protocols 2-5 open with PROTO (0x80) and the protocol number; torch.save files are zips.
BINARY_MAGIC = {b"\x80\x02": "a pickle", b"\x80\x03": "a pickle", b"\x80\x04": "a pickle", b"\x80\x05": "a pickle",
                b"PK\x03\x04": "a zip archive (torch.save writes pickles inside zips)"}


class SubmissionError(HarnessError):
    """A submission that cannot be accepted; the message says which file and why."""


def check_name(name: str) -> str:
    """A member name must be a plain relative path: no absolute paths, no '..', no odd characters."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise SubmissionError(f"Archive member {name!r}: absolute or non-POSIX path; only relative paths are allowed.")
    parts = PurePosixPath(name).parts
    if any(part in ("..", ".") for part in name.split("/")):
        raise SubmissionError(f"Archive member {name!r}: '..' or '.' in the path (path traversal) is not allowed.")
    if len(parts) > MAX_DEPTH:
        raise SubmissionError(f"Archive member {name!r}: nested deeper than {MAX_DEPTH} levels.")
    for part in parts:
        if not SAFE_PART.match(part):
            raise SubmissionError(f"Archive member {name!r}: the name part {part!r} has characters outside "
                                  "letters, digits and ._@+=- (or starts with one of them).")
    return "/".join(parts)


def check_content(name: str, data: bytes) -> None:
    """Only text of an allowed type; pickles (by suffix or by magic bytes) are refused outright."""
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise SubmissionError(f"Archive member {name!r}: pickled/binary payloads ({', '.join(PICKLE_SUFFIXES)}) "
                              "are not accepted; submissions carry results, not weights.")
    for magic, what in BINARY_MAGIC.items():
        if data.startswith(magic):
            raise SubmissionError(f"Archive member {name!r} is {what}; pickled payloads are not accepted.")
    if not lower.endswith(TEXT_SUFFIXES):
        raise SubmissionError(f"Archive member {name!r}: file type not allowed (allowed: {', '.join(TEXT_SUFFIXES)}).")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise SubmissionError(f"Archive member {name!r} is not UTF-8 text.") from None


def read_archive(path: Path, max_file_bytes: int = MAX_FILE_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> dict[str, bytes]:
    """Every file of a submission archive, by member name, after the checks above."""
    path = Path(path)
    if path.is_dir():
        raise SubmissionError(f"{path} is a directory, not a submission file. Package its runs first with "
                              f"`harness submit {path} --out submission.tar.gz`, then add that file.")
    if not path.is_file():
        raise SubmissionError(f"{path}: no such file (give the .tar.gz that `harness submit` wrote).")
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise SubmissionError(f"{path}: more than {MAX_MEMBERS} archive members.")
                name = check_name(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
                    raise SubmissionError(f"Archive member {name!r} is {kind}; only regular files are allowed.")
                if member.size > max_file_bytes:
                    raise SubmissionError(f"Archive member {name!r} is {member.size} bytes, over the per-file "
                                          f"limit of {max_file_bytes} bytes.")
                total += member.size
                if total > max_total_bytes:
                    raise SubmissionError(f"{path}: files total more than {max_total_bytes} bytes.")
                if name in files:
                    raise SubmissionError(f"Archive member {name!r} appears twice.")
                handle = tar.extractfile(member)
                data = handle.read(max_file_bytes + 1) if handle else b""
                check_content(name, data)
                files[name] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SubmissionError(f"{path}: not a readable .tar.gz submission ({exc}).") from None
    return files


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    """A gzipped tar of ``files`` with fixed metadata (no owner, time 0), members in name order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(check_name(name))
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(buffer.getvalue())
    tmp.replace(path)
    return path
