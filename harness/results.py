"""results.json: one self-describing record per run, and the summary table printed after it."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.atomic import write_json
from harness.config import RunConfig
from harness.hashing import stable_hash
from harness.paths import REPO_ROOT
from harness.registry import attacks

SCHEMA_VERSION = 1


def code_version() -> str | None:
    """The git commit of the harness (with '-dirty' for uncommitted changes), when known."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_name(config: RunConfig) -> str:
    """Deterministic: the same config writes to the same run directory."""
    if config.run_name:
        return config.run_name
    digest = stable_hash(config.model_dump(mode="json", exclude={"run_name", "output_dir", "cache_dir"}), 8)
    model = Path(config.model.ref).name or config.model.ref
    return f"{model}__{config.defence.name}__{config.attack.name}__seed{config.seed}__{digest}"


def build_results(config: RunConfig, outcome: dict[str, Any], data_fingerprints: dict[str, str],
                  model_fingerprint: str) -> dict[str, Any]:
    attack_plugin = attacks.get(config.attack.name)
    stages = outcome["stages"]
    compute = {
        "wall_seconds_this_run": outcome["wall_seconds"],
        "wall_seconds_all_stages": round(sum(s["stats"].get("wall_seconds", 0) for s in stages.values()), 2),
        "train_tokens": sum(s["stats"].get("train_tokens", 0) for s in stages.values()),
        "peak_memory_mb": max((s["stats"].get("peak_memory_mb", 0) for s in stages.values()), default=0),
        "peak_memory_note": "CUDA: max allocated; CPU: process resident-set high-water mark",
        "gpu_hours": round(sum(s["stats"].get("gpu_seconds", 0) for s in stages.values()) / 3600, 4),
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_name": run_name(config),
        "model": {"ref": config.model.ref, "revision": config.model.revision, "fingerprint": model_fingerprint,
                  "dtype": config.model.dtype, "device": config.model.device},
        "defence": {"name": config.defence.name, "params": stages["defend"]["params"]},
        "attack": {"name": config.attack.name, "params": stages["attack"]["params"],
                   "threat_model": attack_plugin.info.get("threat_model", "unspecified")},
        "seed": config.seed,
        "profile": config.profile,
        "data": {"dir": outcome["data_dir"], "eval_prompts": config.data.eval_prompts,
                 "prompt_format": config.data.prompt_format, "fingerprints": data_fingerprints},
        "results": outcome["branches"],
        "stages": stages,
        "compute": compute,
        "libraries": outcome["versions"],
        "code_version": code_version(),
        "config": config.model_dump(mode="json"),
    }


def write_run(config: RunConfig, results: dict[str, Any]) -> Path:
    """results.json plus a copy of every evaluation's per-item records, in one run directory."""
    directory = Path(config.output_dir) / results["run_name"]
    records_dir = directory / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    for branch, content in results["results"].items():
        for phase in ("pre_attack", "post_attack"):
            for evaluator, entry in content[phase].items():
                source = Path(entry["records"])
                target = records_dir / f"{branch}-{phase}-{evaluator}.jsonl"
                shutil.copyfile(source, target)
                entry["records"] = str(target.relative_to(directory))
    write_json(directory / "results.json", results)
    return directory


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def summary_table(results: dict[str, Any]) -> Table:
    """Harmfulness before/after the attack, per branch, with intervals and the judge named."""
    table = Table(title=f"{results['model']['ref']} · attack {results['attack']['name']} · seed {results['seed']}")
    for column in ("model", "stage", "judge", "harm mean [95% CI]", "harm rate [95% CI]", "n"):
        table.add_column(column, justify="right" if column in ("n",) else "left")
    for branch, content in results["results"].items():
        label = f"{content['defence']}" + (" (reference)" if branch == "undefended" else "")
        for phase, name in (("pre_attack", "before attack"), ("post_attack", "after attack")):
            harm = content[phase].get("harmfulness")
            if not harm:
                continue
            metrics = harm["metrics"]
            judge = metrics["primary_judge"]
            m = metrics[judge]
            table.add_row(
                label, name, judge,
                f"{_fmt(m['mean'])} [{_fmt(m['mean_ci95'][0])}, {_fmt(m['mean_ci95'][1])}]",
                f"{_fmt(m['rate'])} [{_fmt(m['rate_ci95'][0])}, {_fmt(m['rate_ci95'][1])}]",
                str(m["n"]),
            )
    return table


def print_summary(results: dict[str, Any], directory: Path, console: Console) -> None:
    console.print(summary_table(results))
    compute = results["compute"]
    console.print(
        f"Results: [bold]{directory / 'results.json'}[/] · generations in {directory / 'records'} · "
        f"this run {compute['wall_seconds_this_run']:.1f}s (all stages {compute['wall_seconds_all_stages']:.1f}s)"
    )
