"""End to end on the real embedded SmolLM2-135M (slow: run with -m slow; CI runs it)."""

import json

import pytest

from harness.run.config import build_config
from harness.run.pipeline import Pipeline
from harness.run.runner import execute

pytestmark = pytest.mark.slow


def test_embedded_model_attack_and_cached_rerun(tmp_path, monkeypatch):
    flags = {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")}
    sets = ["attack.num_samples=16", "evaluate.harmfulness.num_prompts=8",
            "evaluate.harmfulness.generation.max_new_tokens=24"]
    config = build_config(flags=flags, sets=sets)
    assert config.model.ref == "smollm2-135m-instruct" and config.attack.name == "full-ft"
    results, directory = execute(config)
    branch = results["results"]["defended"]
    before = branch["pre_attack"]["harmfulness"]["metrics"]["refusal-keywords"]
    after = branch["post_attack"]["harmfulness"]["metrics"]["refusal-keywords"]
    assert before["n"] == after["n"] == 8
    # The default primary judge is the trained classifier, with its measured accuracy in the results.
    harm = branch["post_attack"]["harmfulness"]
    assert harm["metrics"]["primary_judge"] == "minilm-harm" and harm["metrics"]["minilm-harm"]["n"] == 8
    judge = harm["info"]["judges"]["minilm-harm"]
    assert judge["version"] and 0.5 < judge["roc_auc"] <= 1.0 and "xstest" in judge["validation"]
    assert 0.0 <= before["mean"] <= 1.0 and 0.0 <= after["mean"] <= 1.0
    training = results["stages"]["attack"]["stats"]
    assert training["train_steps"] == 4 and training["train_tokens"] > 0
    records = (directory / branch["post_attack"]["harmfulness"]["records"]).read_text().splitlines()
    responses = [json.loads(line)["response"] for line in records]
    assert sum(bool(r.strip()) for r in responses) >= 6, "the real model should answer most prompts"

    monkeypatch.setattr(Pipeline, "_load", lambda self, key: pytest.fail("cached rerun loaded a model"))
    again, _ = execute(config)
    assert all(stage["cached"] for stage in again["stages"].values())
