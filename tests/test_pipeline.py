"""The staged pipeline and its cache, on the tiny model: hits, misses, crashes and corruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS

from harness.run.config import build_config
from harness.run.pipeline import Pipeline
from harness.run.runner import execute


def make_config(root: Path, *sets: str, attack: str = "lora"):
    flags = {"model": {"ref": "tiny-llama"}, "attack": {"name": attack},
             "cache_dir": str(root / "cache"), "output_dir": str(root / "runs")}
    # these tests read the attacked model's files after the run (dropped by default: tests/test_cache_admin.py)
    return build_config(flags=flags, sets=[*TINY_SETS, "resources.keep_attacked_weights=true", *sets])


def cached_flags(results):
    stages = {label: s["cached"] for label, s in results["stages"].items()}
    branch = results["results"]["defended"]
    stages["pre_eval"] = branch["pre_attack"]["harmfulness"]["cached"]
    stages["post_eval"] = branch["post_attack"]["harmfulness"]["cached"]
    return stages


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    results, directory = execute(make_config(root))
    return root, results, directory


def test_first_run_computes_everything_and_writes_results(first_run):
    root, results, directory = first_run
    assert set(cached_flags(results).values()) == {False}
    on_disk = json.loads((directory / "results.json").read_text())
    assert on_disk["attack"]["threat_model"] == "fine-tuning-api"
    for field in ("model", "defence", "attack", "seed", "data", "libraries", "compute", "config", "schema_version"):
        assert field in on_disk
    harm = on_disk["results"]["defended"]["post_attack"]["harmfulness"]
    assert harm["metrics"]["refusal-keywords"]["n"] == 4
    records = [json.loads(line) for line in (directory / harm["records"]).read_text().splitlines()]
    assert len(records) == 4 and {"prompt", "response", "scores"} <= set(records[0])
    assert on_disk["data"]["fingerprints"].keys() >= {"advbench", "beavertails-unsafe"}


def test_identical_run_is_served_from_cache_without_loading_a_model(first_run, monkeypatch):
    root, first, _ = first_run

    def no_loading(self, key):
        raise AssertionError("a fully cached run must not load weights")

    monkeypatch.setattr(Pipeline, "_load", no_loading)
    again, _ = execute(make_config(root))
    assert set(cached_flags(again).values()) == {True}
    assert again["results"]["defended"]["post_attack"]["harmfulness"]["metrics"] == \
        first["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]


def test_changing_an_attack_param_recomputes_only_the_attack_and_what_follows(first_run):
    root, first, _ = first_run
    changed, _ = execute(make_config(root, "attack.lr=3e-4"))
    assert cached_flags(changed) == {"defend": True, "pre_eval": True, "attack": False, "post_eval": False}
    assert changed["stages"]["attack"]["key"] != first["stages"]["attack"]["key"]
    assert changed["stages"]["defend"]["key"] == first["stages"]["defend"]["key"]


def test_changing_an_evaluation_param_keeps_the_models(first_run):
    root, first, _ = first_run
    changed, _ = execute(make_config(root, "evaluate.harmfulness.num_prompts=3"))
    assert cached_flags(changed) == {"defend": True, "pre_eval": False, "attack": True, "post_eval": False}


def test_lora_stage_saves_only_the_adapter_and_reloads_identically(first_run):
    root, results, _ = first_run
    config = make_config(root)
    pipeline = Pipeline(config)
    attack_dir = pipeline.store.path(results["stages"]["attack"]["key"]) / "model"
    names = {p.name for p in attack_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert "model.safetensors" not in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    reloaded = pipeline._load(results["stages"]["attack"]["key"])
    base = pipeline._load(pipeline.base_key())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        adapted = reloaded.model(input_ids=ids).logits
        plain = base.model(input_ids=ids).logits
    weights = {n: p for n, p in reloaded.model.named_parameters() if "lora_B" in n}
    assert weights and any(w.abs().sum() > 0 for w in weights.values())  # training moved lora_B off zero
    assert not torch.allclose(adapted, plain)


def test_corrupt_stage_is_detected_and_rebuilt(first_run):
    root, results, _ = first_run
    config = make_config(root)
    pipeline = Pipeline(config)
    key = results["results"]["defended"]["post_attack"]["harmfulness"]["key"]
    metrics = pipeline.store.path(key) / "metrics.json"
    metrics.write_text(metrics.read_text().replace("refusal", "REFUSAL"))  # same size, other bytes
    again, _ = execute(config)
    flags = cached_flags(again)
    assert flags["post_eval"] is False and flags["pre_eval"] is True and flags["attack"] is True
    assert "refusal-keywords" in json.loads(metrics.read_text())


def test_truncated_adapter_is_rebuilt(first_run):
    root, results, _ = first_run
    config = make_config(root)
    pipeline = Pipeline(config)
    adapter = pipeline.store.path(results["stages"]["attack"]["key"]) / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    again, _ = execute(config)
    assert again["stages"]["attack"]["cached"] is False


def test_kill_9_mid_attack_resumes_at_the_first_missing_stage(tmp_path):
    """A real SIGKILL while the attack trains; the rerun reuses finished stages only."""
    sets = [*TINY_SETS, "attack.num_samples=24", "attack.max_length=64", "attack.batch_size=2"]
    cmd = [sys.executable, "-m", "harness.cli", "run", "--model", "tiny-llama", "--attack", "full-ft",
           "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stages = tmp_path / "cache" / "stages"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            scratch = [p for p in stages.glob(".*.tmp-*")] if stages.exists() else []
            done = [p for p in stages.glob("*/stage.json")] if stages.exists() else []
            if len(done) >= 2 and scratch:  # defence + pre-attack eval done, attack being written
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list(stages.glob("*/stage.json"))) == 2
    config = build_config(flags={"model": {"ref": "tiny-llama"}, "attack": {"name": "full-ft"},
                                 "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")},
                          sets=sets)
    results, directory = execute(config)
    assert cached_flags(results) == {"defend": True, "pre_eval": True, "attack": False, "post_eval": False}
    assert not list(stages.glob(".*.tmp-*")), "scratch left by the killed run was swept"
    assert (directory / "results.json").exists()


def test_stage_directories_get_the_umask_mode_not_mkdtemps_0700(tmp_path):
    from harness.files.atomic import atomic_dir

    before = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "stage") as scratch:
            (scratch / "f").write_text("x")
    finally:
        os.umask(before)
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o755
