"""Local judge weights: a directory is accepted only with safetensors (unpickling a checkpoint runs
code), and its files' sha256 identify the scorer in stage keys and results."""

from __future__ import annotations

from pathlib import Path

from harness.api import HarnessError, cached_file_sha256


def local_dir(judge: str, ref: str) -> Path | None:
    """The directory ``ref`` names (after refusing one without safetensors); None for a hub id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise HarnessError(
                f"{judge}: {path} has no *.safetensors weights. Pickled checkpoints (.bin/.pt) are never loaded, "
                "since unpickling runs code; convert them to safetensors with a trusted tool first.")
        return path.resolve()
    if path.exists():
        raise HarnessError(f"{judge}: model {ref!r} is a file; pass the directory holding it.")
    if ref.startswith(("/", ".", "~")):
        raise HarnessError(f"{judge}: model directory {ref!r} does not exist.")
    return None


def weights_sha256(directory: Path) -> dict[str, str]:
    return {p.name: cached_file_sha256(p) for p in sorted(directory.glob("*.safetensors"))}
