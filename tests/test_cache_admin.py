"""`harness cache ls | du | prune` on a real tiny-run cache; dropped attacked weights and their recreation;
a stage held by a live process is never touched."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import flat
from rich.console import Console
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import ConfigError
from harness.resources.cache_admin import is_held, list_stages, parse_age, parse_size, prune, usage
from harness.run.runner import execute

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = Console(quiet=True)


@pytest.fixture
def cached_run(tiny_run_config, tmp_path):
    config = tiny_run_config("compare_undefended=false", "resources.keep_attacked_weights=true",
                             "defence.name=repnoise", "defence.num_pairs=4", "defence.max_length=32")
    results, _ = execute(config, QUIET)
    return config, results, tmp_path / "cache"


def _by_kind(cache):
    return {entry.kind: entry for entry in list_stages(cache)}


def test_ls_and_du_describe_the_cache(cached_run):
    config, results, cache = cached_run
    stages = list_stages(cache)
    assert {e.kind for e in stages} == {"defend", "attack", "evaluate"}
    attack = _by_kind(cache)["attack"]
    assert attack.key == results["results"]["defended"]["attacked_key"]
    assert attack.weights == "kept" and attack.size > 1_000_000 and not attack.held
    totals = usage(cache)
    assert totals["stages/attack"] == attack.size
    out = CliRunner().invoke(app, ["cache", "du", "--cache-dir", str(cache)])
    assert out.exit_code == 0 and "stages/defend" in out.output
    out = CliRunner().invoke(app, ["cache", "ls", "--cache-dir", str(cache)])
    assert out.exit_code == 0 and attack.key in out.output


def test_prune_keeps_defended_models_and_says_so(cached_run):
    _, _, cache = cached_run
    defended = _by_kind(cache)["defend"]
    report = prune(cache, older_than=0)
    assert report.kept_defended == 1 and (cache / "stages" / defended.key / "stage.json").exists()
    assert {e.kind for e in report.removed} == {"attack", "evaluate"}
    assert report.freed == sum(e.size for e in report.removed)
    assert [e.kind for e in list_stages(cache)] == ["defend"]
    prune(cache, kinds=("defend",), include_defended=True)
    assert list_stages(cache) == []


def test_weights_only_prune_then_a_new_evaluation_recreates_them(cached_run, tiny_run_config):
    config, _, cache = cached_run
    attack = _by_kind(cache)["attack"]
    report = prune(cache, kinds=("attack",), weights_only=True)
    assert [e.key for e in report.dropped] == [attack.key] and report.freed > 1_000_000
    manifest = json.loads((cache / "stages" / attack.key / "stage.json").read_text())
    assert manifest["weights"] == "dropped" and not (cache / "stages" / attack.key / "model").exists()
    assert manifest["stats"]["train_steps"] > 0  # stats and history kept
    # The same run, fully cached: the attacked weights are not needed, nothing is rebuilt.
    assert execute(config, QUIET)[0]["stages"]["attack"]["cached"] is True
    assert json.loads((cache / "stages" / attack.key / "stage.json").read_text())["weights"] == "dropped"
    # A new evaluation of the attacked model needs its weights: they are recreated under the same key.
    more = tiny_run_config("compare_undefended=false", "resources.keep_attacked_weights=true",
                           "defence.name=repnoise", "defence.num_pairs=4", "defence.max_length=32",
                           "evaluate.harmfulness.num_prompts=5")
    execute(more, QUIET)
    recreated = json.loads((cache / "stages" / attack.key / "stage.json").read_text())
    assert "weights" not in recreated and (cache / "stages" / attack.key / "model").is_dir()
    assert recreated["info"]["attack_training"]["last_loss"] == manifest["info"]["attack_training"]["last_loss"]


def test_default_run_drops_attacked_weights_after_evaluation(tiny_run_config, tmp_path):
    execute(tiny_run_config("compare_undefended=false"), QUIET)
    attack = _by_kind(tmp_path / "cache")["attack"]
    assert attack.weights == "dropped" and attack.size < 100_000


def test_a_stage_held_by_a_live_process_is_not_touched(cached_run):
    _, _, cache = cached_run
    attack = _by_kind(cache)["attack"]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom harness.run.store import StageStore\n"
         f"store = StageStore({str(cache)!r})\n"
         f"with store.claim({attack.key!r}):\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(cache, attack.key)
        assert next(e for e in list_stages(cache) if e.key == attack.key).held
        for weights_only in (True, False):
            report = prune(cache, kinds=("attack",), weights_only=weights_only)
            assert [e.key for e in report.held] == [attack.key] and not report.removed and not report.dropped
        assert (cache / "stages" / attack.key / "model").is_dir()
        out = CliRunner().invoke(app, ["cache", "prune", "--kind", "attack", "--cache-dir", str(cache)])
        assert "a live process holds it" in flat(out.output)
    finally:
        holder.kill()  # the lock dies with its holder
        holder.wait()
    deadline = time.time() + 10
    while is_held(cache, attack.key) and time.time() < deadline:
        time.sleep(0.05)
    report = prune(cache, kinds=("attack",))
    assert [e.key for e in report.removed] == [attack.key]
    assert not (cache / "stages" / attack.key).exists()


def test_bad_prune_input_is_refused():
    with pytest.raises(ConfigError, match="say what to prune"):
        prune("/nonexistent")
    with pytest.raises(ConfigError, match="choose from defend, attack, evaluate"):
        prune("/nonexistent", kinds=("attacks",))
    with pytest.raises(ConfigError, match="12h, 7d"):
        parse_age("7 days")
    with pytest.raises(ConfigError, match="500MB"):
        parse_size("lots")
    assert parse_age("2d") == 172800 and parse_age("90s") == 90
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("500MB") == 500 * 2**20 and parse_size("10") == 10


def test_harness_cache_dir_is_the_default_for_runs_and_cache_commands(cached_run, monkeypatch, tmp_path):
    """$HARNESS_CACHE_DIR names the cache wherever --cache-dir / cache_dir is not given."""
    from harness.run.config import RunConfig

    _, _, cache = cached_run
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache))
    assert RunConfig.model_validate({}).cache_dir == cache
    assert RunConfig.model_validate({"cache_dir": str(tmp_path / "x")}).cache_dir == tmp_path / "x"
    out = CliRunner().invoke(app, ["cache", "ls"])
    assert out.exit_code == 0 and _by_kind(cache)["attack"].key in out.output
    monkeypatch.delenv("HARNESS_CACHE_DIR")
    assert str(RunConfig.model_validate({}).cache_dir) == ".harness-cache"
