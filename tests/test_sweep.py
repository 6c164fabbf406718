"""Sweeps on the tiny model: grid expansion, shared stages, the matrix, failures, Ray = local."""

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from harness.errors import ConfigError, HarnessError
from harness.results.stats import t_interval
from harness.run.store import StageStore
from harness.run.sweep import expand, load_sweep, run_sweep

TINY_BASE = {
    "model": {"ref": "tiny-llama"},
    "evaluate": {"harmfulness": {"num_prompts": 4, "generation": {"max_new_tokens": 6},
                                 "judges": [{"name": "refusal-keywords"}]}},
}
ATTACK_PARAMS = {"num_samples": 8, "max_length": 48}


def write_sweep(root: Path, **overrides) -> Path:
    sweep = {
        "name": "tiny",
        "base": {**TINY_BASE, "cache_dir": str(root / "cache"), "output_dir": str(root / "runs")},
        "defences": ["none", {"name": "repnoise", "params": {"num_pairs": 8, "max_length": 48}}],
        "attacks": [{"name": "full-ft", "params": ATTACK_PARAMS, "label": "full"},
                    {"name": "lora", "params": ATTACK_PARAMS, "label": "lora"}],
        "seeds": [1, 2],
        "threads_per_cell": 1,
        **overrides,
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_expand_orders_cells_defence_first_and_resolves_presets(tmp_path):
    path = write_sweep(tmp_path, attacks=["full-ft@cpu-8e-5-128", {"name": "lora", "label": "weak lora"}], seeds=[3])
    cells = expand(load_sweep(path))
    assert [(c.defence, c.attack, c.seed) for c in cells] == [
        ("none", "full-ft@cpu-8e-5-128", 3), ("none", "weak lora", 3),
        ("repnoise", "full-ft@cpu-8e-5-128", 3), ("repnoise", "weak lora", 3),
    ]
    assert cells[0].config.attack.params["lr"] == 8e-5 and cells[0].config.model.ref == "tiny-llama"
    assert cells[2].config.defence.params["num_pairs"] == 8


def test_sweep_file_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="base must not set attack"):
        load_sweep(write_sweep(tmp_path, base={"attack": {"name": "lora"}}))
    with pytest.raises(ConfigError, match=r"defences: List should have at least 1 item"):
        load_sweep(write_sweep(tmp_path, defences=[]))
    negative_lr = [{"name": "full-ft", "params": {"lr": -1}, "label": "full"}]
    with pytest.raises(ConfigError, match=r"sweep cell none × full × seed 1: .*attack.params.lr"):
        expand(load_sweep(write_sweep(tmp_path, attacks=negative_lr)))


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    directory = run_sweep(load_sweep(write_sweep(root)), Console(stderr=True, quiet=True))
    return root, directory


def _cells(directory: Path) -> list[dict]:
    return json.loads((directory / "sweep.json").read_text())["cells"]


def _post_harm(run_dir: str) -> float:
    results = json.loads((Path(run_dir) / "results.json").read_text())
    metrics = results["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]
    return metrics[metrics["primary_judge"]]["mean"]


def test_every_cell_ran_and_the_defended_model_was_built_once_per_seed(local_sweep):
    root, directory = local_sweep
    cells = _cells(directory)
    assert len(cells) == 8 and {c["status"] for c in cells} == {"ok"}
    manifests = [json.loads(p.read_text()) for p in (root / "cache" / "stages").glob("*/stage.json")]
    defends = [m for m in manifests if m["kind"] == "defend"]
    attacks = [m for m in manifests if m["kind"] == "attack"]
    assert sorted(m["plugin"] for m in defends) == ["none", "none", "repnoise", "repnoise"]  # 2 seeds each
    assert len(attacks) == 8  # (none, repnoise) × (full, lora) × 2 seeds; references are shared


def test_matrix_cells_are_the_seed_means_of_the_runs(local_sweep):
    _, directory = local_sweep
    matrix = json.loads((directory / "matrix.json").read_text())
    assert matrix["columns"] == ["pre-attack", "full", "lora"]
    for defence in ("none", "repnoise"):
        for attack in ("full", "lora"):
            runs = [c["run_dir"] for c in _cells(directory) if (c["defence"], c["attack"]) == (defence, attack)]
            values = [_post_harm(r) for r in runs]
            cell = matrix["cells"][defence][attack]["harm"]
            mean, lo, hi = t_interval(values)
            assert cell["mean"] == pytest.approx(mean) and cell["ci95"] == pytest.approx([lo, hi])
            assert cell["n_seeds"] == 2
    markdown = (directory / "matrix.md").read_text()
    assert "| defence | pre-attack | full | lora |" in markdown and markdown.count("\n| ") == 3


def test_rerunning_a_sweep_is_served_from_the_cache(local_sweep, monkeypatch):
    root, _ = local_sweep
    from harness.run.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "_load", lambda self, key: (_ for _ in ()).throw(AssertionError("loaded weights")))
    run_sweep(load_sweep(write_sweep(root)), Console(stderr=True, quiet=True))


def test_a_failed_cell_is_recorded_and_the_others_finish(tmp_path):
    bad = {"name": "full-ft", "params": {**ATTACK_PARAMS, "dataset": "jbb-harmful-qa[Piracy]"}, "label": "bad"}
    good = {"name": "full-ft", "params": ATTACK_PARAMS, "label": "good"}
    path = write_sweep(tmp_path, defences=["none"], attacks=[bad, good], seeds=[1])
    with pytest.raises(HarnessError, match=r"1 of 2 sweep cells failed \(none × bad × seed 1\).*retry"):
        run_sweep(load_sweep(path), Console(stderr=True, quiet=True))
    cells = _cells(tmp_path / "runs" / "sweeps" / "tiny")
    assert [c["status"] for c in cells] == ["failed", "ok"]
    assert "unknown category 'Piracy'" in cells[0]["error"]


def test_store_claim_makes_a_second_builder_wait(tmp_path):
    store = StageStore(tmp_path)
    events = []

    def builder(name: str, hold: float) -> None:
        with store.claim("k"):
            events.append(f"{name} in")
            time.sleep(hold)
            events.append(f"{name} out")

    first = threading.Thread(target=builder, args=("a", 0.3))
    first.start()
    time.sleep(0.1)
    builder("b", 0)
    first.join()
    assert events == ["a in", "a out", "b in", "b out"]


def test_ray_executor_gives_the_same_results_as_local(local_sweep, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'harmful-ft-harness[ray]')")
    _, local_dir = local_sweep
    path = write_sweep(tmp_path, executor="ray", ray={"num_cpus_per_cell": 1})  # fresh cache: real work
    ray_dir = run_sweep(load_sweep(path), Console(stderr=True, quiet=True))
    local = {(c["defence"], c["attack"], c["seed"]): _post_harm(c["run_dir"]) for c in _cells(local_dir)}
    remote = {(c["defence"], c["attack"], c["seed"]): _post_harm(c["run_dir"]) for c in _cells(ray_dir)}
    assert remote == local

    def responses(d):
        return sorted(p.read_text() for p in Path(d).parent.parent.glob("*/records/*harmfulness.jsonl"))

    assert responses(ray_dir) == responses(local_dir)


def test_a_new_store_sweeps_dead_scratch_but_not_a_live_writers(tmp_path):
    store = StageStore(tmp_path)
    dead = store.root / ".deadkey.tmp-abc"
    live = store.root / ".livekey.tmp-def"
    dead.mkdir()
    live.mkdir()
    with store.claim("livekey"):
        StageStore(tmp_path)  # what a second run sharing the cache does on start
    assert live.exists() and not dead.exists()


def test_a_crashing_plugin_fails_its_cell_only(tmp_path, monkeypatch):
    import dataclasses

    from harness.registry import attacks

    lora = attacks.get("lora")

    def crash(model, params, ctx):
        raise RuntimeError("plugin bug")

    monkeypatch.setitem(attacks._plugins, "lora", dataclasses.replace(lora, fn=crash))
    path = write_sweep(tmp_path, defences=["none"], seeds=[1])
    with pytest.raises(HarnessError, match=r"1 of 2 sweep cells failed \(none × lora × seed 1\)"):
        run_sweep(load_sweep(path), Console(stderr=True, quiet=True))
    cells = _cells(tmp_path / "runs" / "sweeps" / "tiny")
    assert [c["status"] for c in cells] == ["ok", "failed"] and "RuntimeError: plugin bug" in cells[1]["error"]
