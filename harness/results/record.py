"""results.json: one self-describing record per run, and the summary table printed after it."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError
from harness.files.atomic import write_json
from harness.files.hashing import stable_hash
from harness.files.paths import REPO_ROOT
from harness.registry import attacks
from harness.results.schema import SCHEMA_VERSION, validate_results
from harness.results.summary import derived_blocks
from harness.run.config import RunConfig
from harness.run.names import check_run_name, safe_part
from harness.terminal import plain


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
    where = {"run_name", "output_dir", "cache_dir", "resources"}  # resources change no result: same directory
    digest = stable_hash(config.model_dump(mode="json", exclude=where), 8)
    model = Path(config.model.ref).name or config.model.ref
    parts = (safe_part(model, "model"), safe_part(config.defence.label, "defence"),
             safe_part(config.attack.label, "attack"))  # a unicode model directory must not make it unsubmittable
    return check_run_name("__".join(parts) + f"__seed{config.seed}__{digest}")


def build_results(config: RunConfig, outcome: dict[str, Any], data_fingerprints: dict[str, str],
                  model_fingerprint: str) -> dict[str, Any]:
    attack_plugin = attacks.get(config.attack.name)
    stages = outcome["stages"]
    evaluations = [entry for branch in outcome["branches"].values() for phase in ("pre_attack", "post_attack")
                   for entry in branch[phase].values()]
    compute = {
        "wall_seconds_this_run": outcome["wall_seconds"],
        "wall_seconds_all_stages": round(sum(s["stats"].get("wall_seconds", 0) for s in stages.values())
                                         + sum(e["stats"].get("wall_seconds", 0) for e in evaluations), 2),
        "train_tokens": sum(s["stats"].get("train_tokens", 0) for s in stages.values()),
        "peak_memory_mb": max((s["stats"].get("peak_memory_mb", 0) for s in stages.values()), default=0),
        "peak_memory_note": "CUDA: max allocated; CPU: process resident-set high-water mark",
        "gpu_hours": round(sum(s["stats"].get("gpu_seconds", 0) for s in stages.values()) / 3600, 4),
    }
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_name": run_name(config),
        "model": {"ref": config.model.ref, "revision": config.model.revision, "fingerprint": model_fingerprint,
                  "dtype": config.model.dtype, "device": config.model.device},
        "defence": {"name": config.defence.name, "preset": config.defence.preset, "params": stages["defend"]["params"]},
        "attack": {"name": config.attack.name, "preset": config.attack.preset, "params": stages["attack"]["params"],
                   "threat_model": attack_plugin.hook("threat_model") or "unspecified"},
        "seed": config.seed,
        "profile": config.profile,
        "data": {"dir": outcome["data_dir"], "eval_prompts": config.data.eval_prompts,
                 "prompt_format": config.data.prompt_format, "fingerprints": data_fingerprints,
                 "skipped_rows": outcome.get("skipped_rows", {})},  # malformed rows dropped per data set
        "results": outcome["branches"],
        "stages": stages,
        "compute": compute,
        "libraries": outcome["versions"],
        "code_version": code_version(),
        "config": config.model_dump(mode="json"),
    }
    results.update(derived_blocks(results))  # v2: the primary judge and a leaderboard summary
    return results


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
    validate_results(results, str(directory / "results.json"))
    write_json(directory / "results.json", results)
    return directory


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def _headline(evaluator: str, entry: dict[str, Any]) -> str:
    """One number per non-harm evaluator, named by its plugin's ``headline`` metric."""
    from harness.registry import evaluators

    try:
        metric = evaluators.get(evaluator).hook("headline")
    except HarnessError:
        metric = None
    return _fmt(entry["metrics"].get(metric)) if metric else "–"


def summary_table(results: dict[str, Any]) -> Table:
    """Harmfulness before/after the attack per branch, with intervals and the judge named, plus
    the headline number of every other evaluator that ran."""
    attack = results["attack"]["name"] + (f"@{results['attack']['preset']}" if results["attack"].get("preset") else "")
    table = Table(title=plain(f"{results['model']['ref']} · attack {attack} · seed {results['seed']}"))
    others = sorted({name for content in results["results"].values()
                     for phase in ("pre_attack", "post_attack") for name in content[phase] if name != "harmfulness"})
    columns = ["defence", "stage", "judge", "harm mean [95% CI]", "harm rate [95% CI]", "n", *others]
    for column in columns:
        table.add_column(column)
    for branch, content in results["results"].items():
        label = f"{content['defence']}" + (" (reference)" if branch == "undefended" else "")
        for phase, name in (("pre_attack", "before attack"), ("post_attack", "after attack")):
            harm = content[phase].get("harmfulness")
            cells = ["–"] * 4
            if harm:
                metrics = harm["metrics"]
                judge = metrics["primary_judge"]
                m = metrics[judge]
                cells = [
                    judge,
                    f"{_fmt(m['mean'])} [{_fmt(m['mean_ci95'][0])}, {_fmt(m['mean_ci95'][1])}]",
                    f"{_fmt(m['rate'])} [{_fmt(m['rate_ci95'][0])}, {_fmt(m['rate_ci95'][1])}]",
                    str(m["n"]),
                ]
            extra = [_headline(o, content[phase][o]) if o in content[phase] else "–" for o in others]
            table.add_row(plain(label), name, *map(plain, cells), *extra)
    return table


def print_summary(results: dict[str, Any], directory: Path, console: Console) -> None:
    console.print(summary_table(results))
    compute = results["compute"]
    console.print(
        f"Results: [bold]{plain(directory / 'results.json')}[/] · generations in {plain(directory / 'records')} · "
        f"this run {compute['wall_seconds_this_run']:.1f}s (all stages {compute['wall_seconds_all_stages']:.1f}s)"
    )
