"""The `harness` command as a user runs it: exit codes, messages, listing, a tiny end-to-end run."""

import json
import subprocess
import sys

from conftest import TINY_SETS, flat
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()


def test_list_shows_plugins_with_params():
    result = runner.invoke(app, ["list", "attacks"])
    assert result.exit_code == 0
    assert "full-ft" in result.output and "lora" in result.output and "num_samples" in result.output


def test_user_errors_exit_2_with_one_message_and_no_traceback(tmp_path):
    result = runner.invoke(app, ["run", "--attack", "ful-ft", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "Did you mean 'full-ft'?" in flat(result.output)
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["run", "--set", "attack.lr=-3", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "attack.params.lr" in flat(result.output)
    result = runner.invoke(app, ["run", "--data-dir", str(tmp_path / "nowhere"), "--model", "tiny-llama",
                                 "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in flat(result.output)


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "--debug", "run", "--attack", "nope",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_tiny_lora_run_end_to_end(tmp_path):
    args = ["run", "--model", "tiny-llama", "--defence", "none", "--attack", "lora",
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")]
    for s in TINY_SETS:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "results.json" in result.output
    (path,) = list((tmp_path / "runs").glob("*/results.json"))
    results = json.loads(path.read_text())
    assert results["attack"]["name"] == "lora" and results["model"]["ref"] == "tiny-llama"


def test_judge_validate_reports_metrics_on_human_labels(tmp_path):
    """The keyword judge is cheap, so the real command runs on the real held-out data here."""
    result = runner.invoke(app, ["judge", "validate", "--judge", "refusal-keywords", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    stored = list((tmp_path / "judges" / "validation").glob("refusal-keywords-*.json"))
    assert len(stored) == 1
    metrics = json.loads(stored[0].read_text())
    assert metrics["judge"] == "refusal-keywords"
    result = runner.invoke(app, ["judge", "validate", "--judge", "no-such-judge", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Unknown judge" in flat(result.output)
