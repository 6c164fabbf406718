"""`harness leaderboard verify` runs only what the board's rules allow: a recorded config that would
load model code, run another interpreter, load a model nobody allowed or name an unknown plugin is
refused before any work; the re-run always lands in --output-dir under a name made here; the header
says what will run. The pipeline is replaced by a recorder, so these checks cost no training."""

import json
from pathlib import Path

import leaderboard_fixtures as lf
import pytest
from conftest import flat
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory):
    return lf.grid(tmp_path_factory)


@pytest.fixture
def executed(monkeypatch):
    """(configs the pipeline was called with, [results file it answers with]): no training happens."""
    calls, answer = [], []

    def execute(config, console):
        calls.append(config)
        return json.loads(answer[0].read_text()), config.output_dir / config.run_name

    monkeypatch.setattr("harness.run.runner.execute", execute)
    return calls, answer


def run_with(grid_runs, tmp_path, mutate) -> Path:
    """A copy of the none/lora/seed-1 run with its recorded results edited (no intake in between)."""
    return lf.copy_run(lf.find_run(grid_runs, "none", "lora", 1), tmp_path / "submitted", mutate)


def verify(path, tmp_path, *extra):
    return runner.invoke(app, ["leaderboard", "verify", str(path), "--cache-dir", str(tmp_path / "cache"),
                               "--output-dir", str(tmp_path / "out"), *extra], env=WIDE)


def _config(edit):
    return lambda obj: edit(obj["config"])


def _judge(name, params=None):
    return _config(lambda c: c["evaluate"]["harmfulness"].update(judges=[{"name": name, "params": params or {}}]))


REFUSED = {  # name: (edit of the results, words of the refusal)
    "trust_remote_code": (_config(lambda c: c["model"].update(trust_remote_code=True)),
                          ["model.trust_remote_code is true", "never runs model code"]),
    "a model with custom code": (_config(lambda c: c["model"].update(ref="someone/custom-code-model")),
                                 ["model.ref is 'someone/custom-code-model'", "--allow-model"]),
    "a local model directory": (_config(lambda c: c["model"].update(ref="/tmp/their-model")),
                                ["model.ref is '/tmp/their-model'", "not an embedded model"]),
    "a judge's default hub model": (_judge("hf-classifier"),
                                    ["evaluate.harmfulness.judges.0.params.model is 'domenicrosati/"]),
    "a judge with remote code": (_judge("llm-judge", {"trust_remote_code": True}),
                                 ["judges.0.params.trust_remote_code is true"]),
    "another interpreter": (_config(lambda c: c["evaluate"]["harmfulness"].update(
        backend_params={"python": "/tmp/evil/python"})), ["backend_params.python is '/tmp/evil/python'"]),
    "an unregistered evaluator": (_config(lambda c: c["evaluate"].update({"steal-secrets": {}})),
                                  ["steal-secrets"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_verify_refuses_before_any_work(grid_runs, tmp_path, executed, case):
    edit, words = REFUSED[case]
    result = verify(run_with(grid_runs, tmp_path, edit), tmp_path)
    out = flat(result.output)
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in out, out
    assert executed[0] == [] and not (tmp_path / "out").exists() and "Re-running" not in out
    assert "Traceback" not in result.output


def test_an_allowed_model_runs_and_the_header_says_what_runs(grid_runs, tmp_path, executed):
    def edit(obj):
        obj["config"]["model"]["ref"] = "someone/model"
        obj["model"]["ref"] = "smollm2-135m-instruct"  # the record claims another model than the config runs

    path = run_with(grid_runs, tmp_path, edit)
    executed[1].append(path)
    result = verify(path, tmp_path, "--allow-model", "someone/model", "--allow-model", "other/one")
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "none / lora / seed 1 on someone/model" in out and "on smollm2-135m-instruct" not in out
    (config,) = executed[0]
    assert config.model.ref == "someone/model"


@pytest.mark.parametrize("name", ["/tmp/escape", "../../escape", "ok-name"])
def test_the_rerun_always_lands_in_the_output_dir_under_a_safe_name(grid_runs, tmp_path, executed, name):
    def edit(obj):
        obj["config"].update(run_name=name, output_dir="/tmp/theirs", cache_dir="/tmp/theirs-cache")

    path = run_with(grid_runs, tmp_path, edit)
    executed[1].append(path)
    result = verify(path, tmp_path)
    assert result.exit_code == 0, result.output
    (config,) = executed[0]
    out_dir = (tmp_path / "out").resolve()
    assert config.output_dir == out_dir and config.cache_dir == (tmp_path / "cache").resolve()
    assert config.run_name == "verify-none-lora-seed1"
    assert (config.output_dir / config.run_name).resolve().parent == out_dir
    assert f"into {out_dir}/verify-none-lora-seed1" in flat(result.output)
