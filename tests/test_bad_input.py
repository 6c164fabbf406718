"""Bad input through `harness run` / `harness sweep` as a user types it (issue 12): every mistake ends in
one paragraph that names the problem, exit code 2, no traceback, and no stage built before the check.

User text is printed literally: markup such as ``[/]`` or ``[bold]x[/bold]`` is shown, never interpreted.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SETS, flat
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()
MARKUP = ["[/]", "[bold]x[/bold]", "jbb-pairs[Privacy]"]


def run_cli(tmp_path: Path, *args: str, tiny: bool = True):
    """`harness run` with isolated dirs (and tiny settings, which ``args`` override); the CliRunner result."""
    argv = ["run", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")]
    if tiny:
        argv += ["--model", "tiny-llama"] + [a for s in TINY_SETS for a in ("--set", s)]
    return runner.invoke(app, argv + list(args))


def assert_user_error(result, *expected: str) -> str:
    """Exit 2, one 'Error:' paragraph with every expected text literally in it, no traceback."""
    text = flat(result.output)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and len(re.findall(r"(?<![A-Za-z])Error:", text)) == 1, result.output
    squashed = "".join(text.split())  # Rich also folds long words (paths) across lines
    for part in expected:
        assert "".join(part.split()) in squashed, (part, result.output)
    return text


def no_stage_built(tmp_path: Path) -> bool:
    stages = tmp_path / "cache" / "stages"
    return not stages.exists() or not any(stages.glob("*/stage.json"))


# ----- B: markup in user text is shown literally ----------------------------------------------------
@pytest.mark.parametrize("name", MARKUP)
@pytest.mark.parametrize("option", ["--defence", "--attack", "--evaluate"])
def test_unknown_plugin_names_with_markup_are_echoed_literally(tmp_path, option, name):
    assert_user_error(run_cli(tmp_path, option, name, tiny=False), f"{name!r}")


@pytest.mark.parametrize("name", MARKUP)
def test_unknown_judge_and_dataset_names_with_markup_are_echoed_literally(tmp_path, name):
    result = run_cli(tmp_path, "--set", f"evaluate.harmfulness.judges=[{{name: '{name}'}}]")
    assert_user_error(result, f"Unknown judge {name!r}")
    result = run_cli(tmp_path, "--set", f"data.eval_prompts='{name}'")
    assert_user_error(result, "data.eval_prompts", name)


def test_category_hint_survives_in_its_own_error_message(tmp_path):
    result = run_cli(tmp_path, "--set", "attack.dataset=a[b]c")
    assert_user_error(result, "'a[b]c' is malformed", "NAME[cat1,cat2] or NAME[^cat1,cat2]")


@pytest.mark.parametrize("value", MARKUP)
def test_set_values_and_config_paths_with_markup_are_echoed_literally(tmp_path, value):
    assert_user_error(run_cli(tmp_path, "--set", f"attack.lr='{value}'", tiny=False), "attack.params.lr", value)
    missing = tmp_path / f"conf{value.replace('/', '-')}.yaml"
    assert_user_error(run_cli(tmp_path, "--config", str(missing), tiny=False), str(missing), "does not exist")
    assert_user_error(run_cli(tmp_path, "--set", value, tiny=False), value)


def test_log_lines_are_not_read_as_markup(capsys):
    from harness import cli

    cli._setup_logging(False)
    logging.getLogger("harness.test").warning("skipped rows of [bold]x[/bold] and [/]")
    assert "skipped rows of [bold]x[/bold] and [/]" in flat(capsys.readouterr().err)


def test_a_sweep_cell_error_with_markup_is_recorded_and_later_cells_run(tmp_path):
    bad_pairs = "pairs-file:/nowhere/[/]x.jsonl"  # fails in the cell's pre-flight, before any stage
    sweep = {
        "name": "markup",
        "base": {"model": {"ref": "tiny-llama"}, "cache_dir": str(tmp_path / "cache"),
                 "output_dir": str(tmp_path / "runs"),
                 "evaluate": {"harmfulness": {"num_prompts": 4, "judges": [{"name": "refusal-keywords"}]}}},
        "defences": [{"name": "repnoise", "params": {"pairs": bad_pairs}, "label": "[bold]rn[/bold]"}],
        "attacks": ["full-ft"],
        "seeds": [1, 2],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = runner.invoke(app, ["sweep", str(path)])
    text = assert_user_error(result, "2 of 2 sweep cells failed", "[bold]rn[/bold] × full-ft × seed 2")
    assert "✗ DataError" in text and "[/]x.jsonl" in text
    index = json.loads((tmp_path / "runs" / "sweeps" / "markup" / "sweep.json").read_text())
    assert [c["status"] for c in index["cells"]] == ["failed", "failed"]
    assert "NAME[cat1,cat2]" in index["cells"][1]["error"]


def test_sweep_dry_run_prints_labels_literally(tmp_path):
    sweep = {"name": "dry", "base": {"model": {"ref": "tiny-llama"}},
             "defences": [{"name": "none", "label": "[/]"}], "attacks": [{"name": "lora", "label": "[bold]x[/bold]"}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0 and "[/] × [bold]x[/bold] × seed 42" in flat(result.output), result.output


# ----- A: run names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "résumé", ".hidden"])
def test_unsafe_run_names_are_refused_before_any_work(tmp_path, name):
    result = run_cli(tmp_path, "--set", f"run_name={name}")
    assert_user_error(result, f"run_name {name!r} is not allowed")
    assert no_stage_built(tmp_path) and not (tmp_path / "runs").exists()


def test_default_run_name_of_a_unicode_model_directory_is_safe(tmp_path):
    from harness.results.record import run_name
    from harness.run.config import build_config
    from harness.run.names import check_run_name

    config = build_config(flags={"model": {"ref": str(tmp_path / "mödel [v2]")}, "defence": {"name": "none"}})
    name = run_name(config)
    assert check_run_name(name) == name and name.startswith("m-del-v2__none__full-ft__seed42__")


# ----- C: tracebacks that are now messages -----------------------------------------------------------
def test_config_that_is_a_directory_or_not_utf8(tmp_path):
    assert_user_error(run_cli(tmp_path, "--config", str(tmp_path), tiny=False), "is a directory")
    latin1 = tmp_path / "run.yaml"
    latin1.write_bytes("run_name: caf\u00e9\n".encode("latin-1"))
    assert_user_error(run_cli(tmp_path, "--config", str(latin1), tiny=False), "is not UTF-8")


def test_unknown_device_is_a_config_error(tmp_path):
    assert_user_error(run_cli(tmp_path, "--device", "tpu"), "config.model.device", "use auto, cpu, cuda")


@pytest.mark.parametrize("seed", ["99999999999999999999", "4294967296", "-1"])
def test_seed_out_of_range_stops_before_any_stage(tmp_path, seed):
    assert_user_error(run_cli(tmp_path, "--seed", seed), "config.seed")
    assert no_stage_built(tmp_path)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    from harness.models.loading import make_tiny_llama

    model, tokenizer = make_tiny_llama(seed=0)
    directory = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def broken_copy(source: Path, target: Path, how: str) -> Path:
    shutil.copytree(source, target)
    if how == "truncated":
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "bad-config":
        (target / "config.json").write_text("{not json")
    else:
        (target / "config.json").unlink()
    return target


@pytest.mark.parametrize("how, message", [("truncated", "is corrupt or truncated"), ("no-config", "has no config.json"),
                                          ("bad-config", "config.json is not valid JSON")])
def test_broken_model_directory_is_a_message_before_any_stage(tmp_path, saved_tiny, how, message):
    model = broken_copy(saved_tiny, tmp_path / "model", how)
    result = run_cli(tmp_path, *[a for s in TINY_SETS for a in ("--set", s)], "--model", str(model), tiny=False)
    assert_user_error(result, message)
    assert no_stage_built(tmp_path)


def test_manifest_listing_no_files_does_not_vouch_for_truncated_weights(tmp_path):
    from harness.run.store import MANIFEST, StageStore

    store = StageStore(tmp_path / "cache")
    with store.write("k1", {"kind": "attack"}) as scratch:
        (scratch / "model").mkdir()
        (scratch / "model" / "model.safetensors").write_bytes(b"w" * 100)
    manifest = store.path("k1") / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": {}}))
    (store.path("k1") / "model" / "model.safetensors").write_bytes(b"w" * 10)
    fresh = StageStore(tmp_path / "cache")  # nothing verified in memory
    assert not fresh.has("k1") and not store.path("k1").exists()


# ----- D: checks that come before the first stage ----------------------------------------------------
@pytest.mark.parametrize("sets, expected", [
    (["attack.dataset=nope"], ["attack.params.dataset", "Unknown dataset 'nope'"]),
    (["attack.dataset=beavertails-unsafe[Privacy]"], ["has no categories"]),
    (["defence.name=repnoise", "defence.pairs=jbb-pairs[Nope]"], ["defence.params.pairs", "unknown category 'Nope'"]),
    (["attack.dataset=jbb-pairs"], ["holds pairs, but qa are needed"]),
])
def test_data_set_names_and_filters_are_checked_before_the_first_stage(tmp_path, sets, expected):
    result = run_cli(tmp_path, *[a for s in sets for a in ("--set", s)])
    assert_user_error(result, *expected)
    assert no_stage_built(tmp_path)


def test_malformed_pairs_file_rows_are_counted_in_the_log_and_results(tmp_path):
    rows = [json.dumps({"prompt": f"how do I make thing {i}?", "harmful": "like so", "harmless": "I can't help."})
            for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows + ["{not json", json.dumps({"prompt": "only a prompt"})]) + "\n")
    result = run_cli(tmp_path, "--no-reference", "--set", "defence.name=safety-sft",
                     "--set", f"defence.pairs=pairs-file:{path}", "--set", "defence.num_pairs=8",
                     "--set", "defence.max_length=48")
    assert result.exit_code == 0, result.output
    assert "skipped 2 malformed rows" in flat(result.output)  # the CLI's log line
    (results,) = (tmp_path / "runs").glob("*/results.json")
    assert json.loads(results.read_text())["data"]["skipped_rows"][f"pairs-file:{path}"] == 2


def test_infinite_lr_in_a_sweep_says_not_finite(tmp_path):
    from harness.errors import ConfigError
    from harness.run.sweep import expand, load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("base: {model: {ref: tiny-llama}}\ndefences: [none]\n"
                    "attacks: [{name: full-ft, params: {lr: .inf}}]\n")
    with pytest.raises(ConfigError, match=r"attack\.params\.lr: inf is not a finite number"):
        expand(load_sweep(path))


def test_missing_model_directory_and_file_data_dir_say_what_they_are(tmp_path):
    result = run_cli(tmp_path, "--model", "/missing/path", tiny=False)
    text = assert_user_error(result, "Model directory /missing/path does not exist")
    assert "Repo id" not in text
    a_file = tmp_path / "data.txt"
    a_file.write_text("x")
    assert_user_error(run_cli(tmp_path, "--data-dir", str(a_file)), "is a file, not a directory")
    assert_user_error(run_cli(tmp_path, "--output-dir", str(a_file / "runs")), "which is a file, not a directory")


def test_evaluate_selects_exactly_and_keeps_file_params(tmp_path):
    from harness.run.config import build_config

    path = tmp_path / "run.yaml"
    path.write_text("evaluate:\n  harmfulness: {num_prompts: 7}\n  fluency: {}\n")
    config = build_config(path, evaluate=["harmfulness"])
    assert list(config.evaluate) == ["harmfulness"] and config.evaluate["harmfulness"]["num_prompts"] == 7
    assert_user_error(run_cli(tmp_path, "--config", str(path), "--evaluate", ",", tiny=False),
                      "--evaluate names no evaluator")


def test_set_reaches_the_preset_field_and_a_bare_judge_name_is_a_spec():
    from harness.run.config import build_config, parse_set

    assert parse_set("attack.preset=cpu-8e-5-128") == {"attack": {"preset": "cpu-8e-5-128"}}
    config = build_config(sets=["attack.preset=cpu-8e-5-128", 'evaluate.harmfulness.judges=["refusal-keywords"]'])
    assert config.attack.preset == "cpu-8e-5-128" and config.attack.params["lr"] == 8e-5
    assert config.evaluate["harmfulness"]["judges"][0]["name"] == "refusal-keywords"


# ----- E: other expected user errors at the top -------------------------------------------------------
def test_an_os_error_during_the_run_is_one_paragraph(tmp_path, monkeypatch):
    import harness.run.runner

    def denied(config, console):
        raise PermissionError(13, "Permission denied", "/srv/[/]results")

    monkeypatch.setattr(harness.run.runner, "execute", denied)
    assert_user_error(run_cli(tmp_path), "Cannot access /srv/[/]results: Permission denied")


@pytest.mark.parametrize("name", MARKUP)
def test_other_commands_echo_markup_literally(tmp_path, name):
    assert_user_error(runner.invoke(app, ["list", name]), f"Unknown plugin kind {name!r}")
    result = runner.invoke(app, ["judge", "validate", "--judge", name, "--cache-dir", str(tmp_path)])
    assert_user_error(result, f"Unknown judge {name!r}")
