"""Real tiny-llama results for the leaderboard tests, built once per session, plus helpers that
copy a run and set chosen numbers in it (the tiny random model scores 1.0 everywhere, so the
aggregation formulas need controlled values to be checked against)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

GRID_SETS = [
    "attack.num_samples=8",
    "attack.max_length=48",
    "evaluate.harmfulness.num_prompts=8",
    "evaluate.harmfulness.generation.max_new_tokens=8",
    "evaluate.harmfulness.judges=[{name: refusal-keywords}]",  # the trained default judge costs minutes
    "evaluate.harmfulness.fluency.reference_perplexity=false",  # one model load less per evaluation
]
DEFENCES = {"none": [], "repnoise": ["defence.num_pairs=8", "defence.max_length=48"]}
ATTACKS = ("full-ft", "lora")
SEEDS = (1, 2)

_built: dict[str, Path] = {}


def grid(tmp_path_factory) -> Path:
    """Runs directory of none/repnoise × full-ft/lora × seeds 1, 2 on tiny-llama (built once)."""
    if "runs" not in _built:
        import torch

        from harness.config import build_config
        from harness.runner import execute
        from rich.console import Console

        root = tmp_path_factory.mktemp("leaderboard-grid")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for defence, extra in DEFENCES.items():
                for attack in ATTACKS:
                    for seed in SEEDS:
                        flags = {"model": {"ref": "tiny-llama"}, "defence": {"name": defence},
                                 "attack": {"name": attack}, "seed": seed,
                                 "cache_dir": str(root / "cache"), "output_dir": str(root / "runs")}
                        execute(build_config(flags=flags, sets=[*GRID_SETS, *extra]), Console(quiet=True))
        finally:
            torch.set_num_threads(threads)
        _built["runs"] = root / "runs"
        _built["cache"] = root / "cache"
    return _built["runs"]


def grid_cache() -> Path:
    return _built["cache"]


def results_files(runs: Path) -> list[Path]:
    return sorted(runs.glob("*/results.json"))


def find_run(runs: Path, defence: str, attack: str, seed: int) -> Path:
    for path in results_files(runs):
        r = json.loads(path.read_text())
        if (r["defence"]["name"], r["attack"]["name"], r["seed"]) == (defence, attack, seed):
            return path
    raise AssertionError(f"no run {defence}/{attack}/{seed} under {runs}")


def refresh(obj: dict[str, Any]) -> dict[str, Any]:
    """Recompute the derived v2 blocks after editing ``results`` (so the file stays valid)."""
    from harness.results_summary import derived_blocks

    obj.update(derived_blocks(obj))
    return obj


def copy_run(source: Path, target_root: Path, mutate: Callable[[dict[str, Any]], None] | None = None,
             name: str | None = None) -> Path:
    """Copy a run directory (results + records) under ``target_root``, editing its results."""
    target = target_root / (name or source.parent.name)
    shutil.copytree(source.parent, target)
    obj = json.loads((target / "results.json").read_text())
    if mutate:
        mutate(obj)
        refresh(obj)
    (target / "results.json").write_text(json.dumps(obj, indent=2))
    return target / "results.json"


def set_harm(obj: dict[str, Any], mean: float, branch: str = "defended", phase: str = "post_attack",
             ci: tuple[float, float] | None = None) -> None:
    metrics = obj["results"][branch][phase]["harmfulness"]["metrics"]
    scores = metrics[metrics["primary_judge"]]
    scores["mean"] = mean
    scores["mean_ci95"] = list(ci) if ci else [max(0.0, mean - 0.1), min(1.0, mean + 0.1)]


def add_evaluation(obj: dict[str, Any], name: str, metrics: dict[str, Any], branch: str = "defended",
                   phase: str = "pre_attack") -> None:
    """An extra evaluator entry (capability, fluency) pointing at an existing records file."""
    records = obj["results"][branch][phase]["harmfulness"]["records"]
    obj["results"][branch][phase][name] = {"key": "test", "params": {}, "metrics": copy.deepcopy(metrics),
                                           "info": {}, "records": records}


def rename_defence(obj: dict[str, Any], name: str) -> None:
    obj["defence"]["name"] = name
    obj["config"]["defence"]["name"] = name
    obj["results"]["defended"]["defence"] = name


def set_fluency(obj: dict[str, Any], degenerate: bool | None, branch: str | None = None) -> None:
    """Set (or, with None, remove) the fluency verdict of the harmfulness evaluations (of one branch)."""
    for name, content in obj["results"].items():
        if branch and name != branch:
            continue
        for phase in ("pre_attack", "post_attack"):
            metrics = content[phase]["harmfulness"]["metrics"]
            if degenerate is None:
                metrics.pop("fluency", None)
            else:
                metrics.setdefault("fluency", {})["degenerate"] = degenerate


def controlled_board(grid_runs: Path, root: Path, harm: dict[tuple[str, str, int], float],
                     edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Copies of the grid's runs named in ``harm`` ((defence, attack, seed) -> post-attack harm of
    the defended model), fluency guard not fired, plus any further ``edit``."""
    for (defence, attack, seed), value in harm.items():
        def mutate(obj: dict[str, Any], value: float = value) -> None:
            set_harm(obj, value)
            set_fluency(obj, False)
            if edit:
                edit(obj)

        copy_run(find_run(grid_runs, defence, attack, seed), root, mutate)
    return root
