"""examples/outside-defence: a complete outside package, installed into a throw-away directory, found
through its entry point and run through `harness run --model tiny-llama`. It proves that a new
defence needs one package and no edit of this repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SETS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "outside-defence"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """An environment where the example package is installed (into its own directory, not the venv)."""
    site = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(site), str(EXAMPLE)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert list(site.glob("harness_example_shield-*.dist-info/entry_points.txt"))
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}


def harness(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_the_installed_example_is_listed_and_runs_end_to_end(installed, tmp_path):
    listed = harness(installed, "list", "defences")
    assert listed.returncode == 0 and "refusal-anchor" in listed.stdout, listed.stderr
    sets = [a for s in [*TINY_SETS, "defence.num_pairs=4", "defence.batch_size=4"]
            for a in ("--set", s)]
    run = harness(installed, "run", "--model", "tiny-llama", "--defence", "refusal-anchor", "--attack", "full-ft",
                  "--no-reference", "--cache-dir", str(tmp_path / "cache"),
                  "--output-dir", str(tmp_path / "runs"), *sets)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())
    assert results["defence"]["name"] == "refusal-anchor" and results["defence"]["params"]["mask_prompt"] is True
    report = results["stages"]["defend"]["info"]["refusal_anchor_training"]
    assert report["pairs"] == 4 and report["steps"] == 2  # 4 pairs, batch 4, 2 epochs


def test_the_example_passes_its_own_test(installed):
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                           capture_output=True, text=True, env=installed, cwd=EXAMPLE, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:]


def test_the_example_imports_only_the_public_api():
    source = (EXAMPLE / "src" / "harness_example_shield" / "shield.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("from harness", "import harness"))]
    assert imports and all(line.startswith("from harness.api import") for line in imports)
