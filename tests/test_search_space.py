"""Search files: every mistake is a clear ConfigError before any trial runs (no model is loaded here)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import flat
from typer.testing import CliRunner

from harness.errors import ConfigError
from harness.search.space import field_kind, load_search, parse_search, trial_config

SPACE = {
    "name": "space",
    "base": {"model": {"ref": "tiny-llama"}},
    "attacks": {"full-ft": {"fixed": {"num_samples": 4}, "search": {"lr": {"low": "1e-5", "high": 1e-3, "log": True},
                                                                     "epochs": {"low": 1, "high": 3}}},
                "lora": {"search": {"rank": {"choices": [2, 4]}, "targets": {"choices": [["q_proj"], ["v_proj"]]}}}},
    "budget": {"trials": 2},
}


def with_(path: str, value, base=SPACE) -> dict:
    data = copy.deepcopy(base)
    *head, last = path.split(".")
    node = data
    for key in head:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


def error(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_search(data)
    return flat(str(caught.value))


def test_a_valid_space_builds_trial_configs_like_a_run():
    spec = parse_search(copy.deepcopy(SPACE))
    assert spec.attacks["full-ft"].search["lr"].low == 1e-5  # "1e-5" (YAML 1.1 string) read as a number
    config = trial_config(spec, "lora", {"rank": 4, "targets": ["v_proj"]}, Path("out"))
    assert config.attack.params["rank"] == 4 and config.attack.params["targets"] == ["v_proj"]
    assert config.attack.params["num_samples"] == 48  # the cpu profile's size, under the search's own values
    assert config.compare_undefended is False and "perplexity" in config.evaluate  # a default constraint's evaluator
    assert config.evaluate["perplexity"]["num_texts"] == 100  # with the evaluator's cpu profile
    assert field_kind(int | None) == "int" and field_kind(float) == "float" and field_kind(bool) == "other"


def test_unknown_parameter_names_the_attack_and_suggests():
    message = error(with_("attacks.full-ft.search.lrr", {"low": 1e-5, "high": 1e-4}))
    assert "'lrr' is not a parameter of attack 'full-ft'" in message and "Did you mean 'lr'?" in message
    assert "'colour' is not a parameter" in error(with_("attacks.lora.fixed", {"colour": 1}))
    assert "Unknown attack 'ful-ft'" in error(with_("attacks", {"ful-ft": {"search": {"lr": {"low": 1, "high": 2}}}}))


def test_empty_ranges_and_choices_are_refused():
    assert "empty range: low 0.001 is above high 1e-05" in error(
        with_("attacks.full-ft.search.lr", {"low": 1e-3, "high": 1e-5}))
    assert "empty range: low and high are both" in error(with_("attacks.full-ft.search.epochs", {"low": 2, "high": 2}))
    assert "empty choices" in error(with_("attacks.lora.search.rank", {"choices": []}))
    assert "log: true needs low > 0" in error(with_("attacks.full-ft.search.lr", {"low": 0, "high": 1, "log": True}))
    assert "a single value belongs under fixed" in error(with_("attacks.full-ft.search.lr", 3e-5))


def test_values_the_attack_refuses_and_wrong_types():
    message = error(with_("attacks.full-ft.search.lr", {"low": -1, "high": 1e-3}))
    assert "attacks.full-ft.search.lr = -1.0 is not a valid value" in message and "greater than 0" in message
    assert "integer; give integer bounds" in error(with_("attacks.full-ft.search.epochs", {"low": 1, "high": 2.5}))
    assert "not a number; use {choices" in error(with_("attacks.full-ft.search.dataset", {"low": 1, "high": 2}))
    assert "both fixed and searched" in error(with_("attacks.full-ft.fixed", {"lr": 1e-4}))


def test_budget_zero_and_other_bad_settings():
    assert "a budget of 0 trials runs nothing" in error(with_("budget.trials", 0))
    assert "a budget of 0 training tokens runs nothing" in error(with_("budget.train_tokens", 0))
    assert "budget: Field required" in error(with_("budget", KeyError))
    assert "base must not set attack" in error(with_("base.attack", {"name": "lora"}))
    assert "exactly one of max_increase or max_decrease" in error(
        with_("constraints", [{"evaluator": "perplexity", "metric": "perplexity"}]))
    assert "Unknown evaluator 'perplexty'" in error(
        with_("constraints", [{"evaluator": "perplexty", "metric": "perplexity", "max_increase": 1}]))
    assert "outside the searched range" in error(with_("start_with", [{"attack": "lora", "rank": 3,
                                                                       "targets": ["q_proj"]}]))
    assert "missing ['epochs']" in error(with_("start_with", [{"attack": "full-ft", "lr": 1e-4}]))


def test_cli_refuses_budget_zero_before_any_work(tmp_path):
    from harness.cli import app

    data = with_("base.output_dir", str(tmp_path / "runs"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["search", str(path), "--trials", "0"])
    assert result.exit_code == 2 and "a budget of 0 trials runs nothing" in flat(result.output)
    assert not (tmp_path / "runs").exists()  # nothing was created
    assert load_search(path, defence="repnoise").defence == {"name": "repnoise"}
    result = CliRunner().invoke(app, ["search", str(path), "--dry-run"])
    assert result.exit_code == 0 and "is valid" in flat(result.output)
