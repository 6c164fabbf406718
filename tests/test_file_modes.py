"""Files the harness writes get the umask's mode, like the directories around them, so a second
user of a shared cache or runs directory can read results, manifests and cached weights."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_atomic_write_gets_the_umask_mode_not_mkstemps_0600(tmp_path, umask_022):
    from harness.files.atomic import write_json, write_text

    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"x": 1})
    assert _modes(tmp_path) == {"a.txt": 0o644, "b.json": 0o644}


def test_atomic_write_follows_a_stricter_umask(tmp_path):
    from harness.files.atomic import write_text

    before = os.umask(0o077)
    try:
        write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_a_run_leaves_every_file_readable_by_others(tiny_run_config, tmp_path, umask_022):
    from harness.run.runner import execute

    execute(tiny_run_config("attack.num_samples=4", "resources.keep_attacked_weights=true"))  # weights checked too
    written = {**{f"runs/{k}": v for k, v in _modes(tmp_path / "runs").items()},
               **{f"cache/{k}": v for k, v in _modes(tmp_path / "cache").items() if "/.locks/" not in f"/{k}"}}
    assert any(name.endswith("results.json") for name in written)
    assert any(name.endswith("stage.json") for name in written)
    assert any(name.endswith(".safetensors") for name in written)
    unreadable = {name: oct(mode) for name, mode in written.items() if mode & 0o044 != 0o044}
    assert not unreadable, f"written without read permission for group/others: {unreadable}"
