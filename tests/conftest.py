"""Shared fixtures: a tiny model, small CPU-sized settings, isolated cache and output dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Settings that keep a full tiny-llama pipeline to a few seconds.
TINY_SETS = [
    "attack.num_samples=8",
    "attack.max_length=48",
    "evaluate.harmfulness.num_prompts=4",
    "evaluate.harmfulness.generation.max_new_tokens=6",
    # The trained default judge costs minutes to build per cache; its own tests cover it.
    "evaluate.harmfulness.judges=[{name: refusal-keywords}]",
]


def flat(text: str) -> str:
    """Rich wraps long messages; compare with whitespace collapsed."""
    return " ".join(text.split())


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spinning makes them
    many times slower. Modules opt in with pytestmark = pytest.mark.usefixtures(...)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from harness.files.paths import resolve_data_dir

    return resolve_data_dir()


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Llama with the real SmolLM2 tokenizer."""
    from harness.models.loading import make_tiny_llama

    return make_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def base():
    """The tiny-llama as a LoadedModel, one per test module (recipe tests copy it before training)."""
    from harness.models.loading import load_model

    return load_model("tiny-llama", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def data(data_dir):
    """The bundle's data access with advbench as the harmful set, as the recipe tests read it."""
    from harness.data.readers import DataAccess

    return DataAccess(data_dir, "advbench", seed=0)


@pytest.fixture
def tiny_run_config(tmp_path):
    """Build a validated tiny-llama RunConfig with isolated cache/output dirs."""
    from harness.run.config import build_config

    def make(*sets: str, **flags):
        base = {"model": {"ref": "tiny-llama"}, "cache_dir": str(tmp_path / "cache"),
                "output_dir": str(tmp_path / "runs")}
        base.update(flags)
        return build_config(flags=base, sets=[*TINY_SETS, *sets])

    return make
