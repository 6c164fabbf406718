"""Defences and attacks hand back what they report (harness.outcome.Trained); it reaches results.json."""

from __future__ import annotations

import pytest

from harness.outcome import Trained, as_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_bare_model_or_none_reports_nothing_and_anything_else_is_a_bug():
    assert as_trained(None) == Trained(None, {})
    marker = Trained(None, {"x": 1})
    assert as_trained(marker) is marker
    with pytest.raises(TypeError, match="must return harness.outcome.Trained, a LoadedModel or None, not dict"):
        as_trained({"model": None})


def test_the_reports_of_a_defence_and_an_attack_reach_results_json(tiny_run_config):
    from harness.run.runner import execute

    config = tiny_run_config("defence.num_pairs=4", "defence.batch_size=4", "defence.max_length=32",
                             defence={"name": "safety-sft"}, compare_undefended=False)
    results, _ = execute(config)
    defend = results["stages"]["defend"]["info"]["safety_sft_training"]
    assert defend["pairs"] == 4 and defend["steps"] == 1
    assert results["stages"]["attack"]["info"]["attack_training"]["steps"] >= 1
