"""A sweep's disk need, counted by hand for a tiny grid; a disk too small refuses before the first cell."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import flat
from rich.console import Console

from harness.errors import HarnessError
from harness.resources.disk import (
    EVALUATION_BYTES,
    TOKENIZER_BYTES,
    check_disk,
    free_bytes,
    sweep_disk_need,
    tree_size,
)
from harness.resources.memory import ALL_LINEAR, shape_for_ref
from harness.run.sweep import expand, load_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = Console(quiet=True)


def _sweep(tmp_path, **extra):
    spec = {
        "name": "disk",
        "base": {"model": {"ref": "tiny-llama"}, "cache_dir": str(tmp_path / "cache"),
                 "output_dir": str(tmp_path / "runs"),
                 "evaluate": {"harmfulness": {"num_prompts": 4, "generation": {"max_new_tokens": 4},
                                              "judges": [{"name": "refusal-keywords"}]}}},
        "defences": ["none", {"name": "repnoise", "params": {"num_pairs": 4, "max_length": 32}}],
        "attacks": [{"name": "full-ft", "params": {"num_samples": 4, "max_length": 32}},
                    {"name": "lora", "params": {"num_samples": 4, "max_length": 32}}],
        "seeds": [1],
        "threads_per_cell": 1,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_need_counted_by_hand(tmp_path):
    sweep = load_sweep(_sweep(tmp_path))
    configs = [cell.config for cell in expand(sweep)]
    shape = shape_for_ref("tiny-llama")
    model, adapter = shape.params * 4 + TOKENIZER_BYTES, shape.lora_params(8, ALL_LINEAR) * 4 + TOKENIZER_BYTES
    need = sweep_disk_need(configs)
    # One defended model (repnoise; "none" is an alias). Attack stages: full-ft and lora on the undefended and on
    # the repnoise model (the reference attack is shared with the "none" row): 4, dropped after evaluation, so
    # only the biggest is on disk at once. Evaluations: 2 defended + 4 attacked models.
    assert need.defended == model
    assert need.attacked_kept == 0 and need.attacked_transient == model
    assert need.evaluations == 6 * EVALUATION_BYTES
    kept = sweep_disk_need([c.model_copy(update={"resources": c.resources.model_copy(
        update={"keep_attacked_weights": True})}) for c in configs])
    assert kept.attacked_kept == 2 * model + 2 * adapter and kept.attacked_transient == 0
    assert sweep_disk_need(configs, concurrency=3).attacked_transient == 2 * model + adapter  # 3 biggest at once


def test_a_disk_too_small_refuses_before_any_cell(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, disk_budget_gb=0.001))
    with pytest.raises(HarnessError) as caught:
        run_sweep(sweep, QUIET)
    message = flat(str(caught.value))
    assert "Sweep disk needs about" in message and "the disk budget of 0.001 GiB" in message
    assert "harness cache prune" in message
    assert not (tmp_path / "runs" / "sweeps" / "disk" / "sweep.json").exists()
    assert not any((tmp_path / "cache" / "stages").glob("[0-9a-f]*"))


def test_check_disk_against_the_real_free_space(tmp_path):
    assert free_bytes(tmp_path / "not" / "yet") == shutil.disk_usage(tmp_path).free
    sweep = load_sweep(_sweep(tmp_path))
    need = sweep_disk_need([cell.config for cell in expand(sweep)])
    assert abs(check_disk(need, tmp_path) - free_bytes(tmp_path)) < 2**30  # others write to this disk too
    assert check_disk(need, tmp_path, budget_gb=0.5) == 2**29
    need.defended = 10 * shutil.disk_usage(tmp_path).total  # more than the disk
    with pytest.raises(HarnessError, match="free on the file system"):
        check_disk(need, tmp_path)


def test_a_finished_sweep_needs_nothing_more(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, defences=["none"], attacks=[{"name": "full-ft", "params": {
        "num_samples": 4, "max_length": 32}}]))
    run_sweep(sweep, QUIET)
    assert sweep_disk_need([cell.config for cell in expand(sweep)]).total == 0
    assert tree_size(tmp_path / "cache") > 0
