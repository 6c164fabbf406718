"""`harness probe` as a user runs it: a tiny RepNoise + LoRA run probed end to end, cached, shown on the site;
and the errors for a run whose stages are missing, a layer out of range and bad options."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_SETS, flat
from typer.testing import CliRunner

from harness.cli import app
from harness.run.pipeline import Pipeline

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["--set", "num_prompts=12", "--set", "num_pairs=4", "--set", "seeds=2", "--set", "max_length=48",
         "--set", "batch_size=4"]


def test_missing_stages_name_the_stage_and_the_command_that_rebuilds_it(tmp_path, tiny_run_config):
    config = tiny_run_config(defence={"name": "repnoise"}, attack={"name": "lora"})
    run = tmp_path / "runs" / "handmade"
    run.mkdir(parents=True)
    results = {"run_name": "handmade", "config": config.model_dump(mode="json"),
               "stages": {"defend": {"parent": Pipeline(config).base_key()}},
               "results": {"defended": {"defended_key": "0" * 16, "attacked_key": "1" * 16}}}
    (run / "results.json").write_text(json.dumps(results))
    result = runner.invoke(app, ["probe", str(run)])
    out = flat(result.output)
    assert result.exit_code == 2 and "Traceback" not in out
    assert f"The defended model of {run} is missing: stage {'0' * 16} is not in the cache" in out
    assert "harness run --model tiny-llama --defence repnoise --attack lora --seed 42 --profile cpu" in out
    assert "--set defence.alpha=1.0" in out
    result = runner.invoke(app, ["probe", str(run), "--stages", "base,undefended-attacked"])
    assert result.exit_code == 2 and "has no undefended-attacked stage" in flat(result.output)
    result = runner.invoke(app, ["probe", str(run), "--stages", "bse"])
    assert result.exit_code == 2 and "Unknown stage 'bse'; choose from base, defended" in flat(result.output)
    result = runner.invoke(app, ["probe", str(tmp_path)])
    assert result.exit_code == 2 and "no results.json" in flat(result.output)
    result = runner.invoke(app, ["probe", str(run), "--layers", "1,x"])
    assert result.exit_code == 2 and "--layers '1,x': give comma-separated integers" in flat(result.output)
    result = runner.invoke(app, ["probe", str(run), "--set", "test_fraction=1.5"])
    assert result.exit_code == 2 and "probe.test_fraction" in flat(result.output)


def test_probe_a_tiny_repnoise_lora_run_end_to_end(tmp_path):
    args = ["run", "--model", "tiny-llama", "--defence", "repnoise", "--attack", "lora", "--no-reference",
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs"),
            "--set", "defence.num_pairs=4", "--set", "defence.batch_size=2"]
    for s in TINY_SETS:
        args += ["--set", s]
    assert (result := runner.invoke(app, args)).exit_code == 0, result.output
    (run,) = list((tmp_path / "runs").iterdir())

    result = runner.invoke(app, ["probe", str(run), "--layers", "0,3", *SMALL])
    assert result.exit_code == 2 and "Layer index 3 is out of range" in flat(result.output)
    result = runner.invoke(app, ["probe", str(run), "--set", "num_prompts=3"])
    assert result.exit_code == 2 and "Too few examples for a train/test split" in flat(result.output)

    result = runner.invoke(app, ["probe", str(run), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "probe.json").read_text())
    assert report["layers"] == [0, 1, 2] and list(report["stages"]) == ["base", "defended", "attacked"]
    for block in report["stages"].values():
        assert not block["cached"] and len(block["probe_accuracy"]["per_seed"][0]) == 2
        assert all(0 <= a <= 1 for a in block["probe_accuracy"]["mean"])
        assert all(v < 0 for v in block["lens_logprob"]["harmful"]) and block["mmd_noise"]["mean"][0] is None
    changes = report["weight_change"]
    assert all(v > 0 for v in changes["defended vs base"]["absolute"])  # RepNoise trains every weight
    lora = changes["attacked vs defended"]["absolute"]
    assert lora[0] == 0 and lora[1] > 0 and lora[2] > 0  # LoRA leaves the embeddings, moves the layers
    assert changes["attacked vs base"]["absolute"][0] == pytest.approx(changes["defended vs base"]["absolute"][0])
    assert [t["claim"] for t in report["tests"]] == ["the defence lowers probe accuracy",
                                                     "the attack brings probe accuracy back"]
    assert all(0 < t["p_value"] <= 1 for t in report["tests"])
    assert "Linear-probe accuracy" in result.output and "p =" in flat(result.output)

    again = runner.invoke(app, ["probe", str(run), *SMALL, "--layers", "2"])
    assert again.exit_code == 0, again.output
    cached = json.loads((run / "probe.json").read_text())
    assert all(block["cached"] for block in cached["stages"].values()) and cached["layers"] == [2]
    assert cached["stages"]["base"]["probe_accuracy"]["mean"] == [report["stages"]["base"]["probe_accuracy"]["mean"][2]]

    cached["run_name"] = "<script>alert(1)</script>"
    cached["stages"]["base"]["lens_logprob"]["harmful"] = ["<b>", None]
    (run / "probe.json").write_text(json.dumps(cached))
    site = tmp_path / "site"
    assert (result := runner.invoke(app, ["leaderboard", "build", str(tmp_path / "runs"), "--out", str(site)])) \
        .exit_code == 0, result.output
    (page,) = list(site.glob("probe-*.html"))
    html = page.read_text()
    assert "<svg" in html and "Linear-probe accuracy" in html and "the defence lowers probe accuracy" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>" not in html
    assert page.name in (site / "index.html").read_text()
