"""A run directory → the cached model stages it names, loadable one at a time.

results.json records every stage key (base, defended, attacked, and the undefended reference's attack);
the models are read from the stage cache through the pipeline's own loader, so aliases (a defence that
changed nothing) and LoRA adapters (loaded on their parent, then merged) resolve exactly as in a run.
Every requested stage is checked before any work; a missing one is named with the command that rebuilds it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from harness.errors import HarnessError
from harness.models.loading import LoadedModel
from harness.results.schema import loads_bounded
from harness.run.config import RunConfig
from harness.run.pipeline import Pipeline

STAGES = ("base", "defended", "attacked", "undefended-attacked")
DEFAULT_STAGES = ("base", "defended", "attacked")


def read_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise HarnessError(f"{run_dir} is not a run directory (no results.json in it). Give the directory "
                           "`harness run` printed, e.g. runs/<run name>.")
    try:
        results = loads_bounded(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise HarnessError(f"{path} is not UTF-8 text; is it a results.json written by `harness run`?") from None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict) \
            or not isinstance(results.get("results"), dict):
        raise HarnessError(f"{path} has no config and stage keys; it was not written by `harness run`.")
    return results


def stage_keys(results: dict[str, Any]) -> dict[str, str]:
    """Label → stage key for every model stage the run recorded."""
    branches = results.get("results", {})
    keys = {"base": results.get("stages", {}).get("defend", {}).get("parent")}
    defended = branches.get("defended", {})
    keys.update(defended=defended.get("defended_key"), attacked=defended.get("attacked_key"))
    keys["undefended-attacked"] = branches.get("undefended", {}).get("attacked_key")
    return {label: key for label, key in keys.items() if isinstance(key, str)}


def recreate_command(config: dict[str, Any], cache_dir: Path) -> str:
    """The `harness run` line that rebuilds this run's model stages under the same keys."""
    words = ["harness", "run", "--model", config["model"]["ref"], "--defence", config["defence"]["name"],
             "--attack", config["attack"]["name"], "--seed", str(config["seed"]), "--profile", config["profile"],
             "--cache-dir", str(cache_dir)]
    sets = [f"data.{k}={json.dumps(config['data'][k])}" for k in ("eval_prompts", "prompt_format")]
    sets += [f"model.{k}={json.dumps(config['model'][k])}" for k in ("dtype", "revision") if config["model"].get(k)]
    for where in ("defence", "attack"):
        sets += [f"{where}.{k}={json.dumps(v)}" for k, v in sorted(config[where].get("params", {}).items())]
    for expr in sets:
        words += ["--set", expr]
    return shlex.join(words)


@dataclass
class RunStages:
    """The run's stages and a loader for them (one model in memory at a time)."""

    results: dict[str, Any]
    config: RunConfig
    pipeline: Pipeline
    keys: dict[str, str]

    def load(self, label: str) -> LoadedModel:
        """The model of a stage, LoRA adapters merged into their base (what the model computes with)."""
        loaded = self.pipeline.model_for(self.keys[label])
        if hasattr(loaded.model, "merge_and_unload"):
            loaded.model = loaded.model.merge_and_unload()
        loaded.model.eval()
        return loaded


def _missing(pipeline: Pipeline, key: str) -> str | None:
    """Why the model under ``key`` cannot be loaded from the cache (following aliases and adapters), or None."""
    if key == pipeline.base_key():
        return None
    if not pipeline.store.has(key):
        return f"stage {key} is not in the cache {pipeline.store.root.parent}"
    manifest = pipeline.store.manifest(key)
    if manifest.get("output") == "alias":
        return _missing(pipeline, manifest["alias_of"])
    if manifest.get("output") == "adapter":
        return _missing(pipeline, manifest["parent"])
    return None


def open_run(run_dir: Path, labels: tuple[str, ...], cache_dir: Path | None, console: Console) -> RunStages:
    """Resolve ``labels`` of the run in ``run_dir`` to cached stages; every one is checked before returning."""
    unknown = [label for label in labels if label not in STAGES]
    if unknown:
        raise HarnessError(f"Unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}.")
    results = read_results(run_dir)
    raw = dict(results["config"])
    if cache_dir is not None:
        raw["cache_dir"] = str(cache_dir)
    try:
        config = RunConfig.model_validate(raw)
    except ValueError as exc:
        raise HarnessError(f"{run_dir}/results.json: its config does not validate ({exc}).") from None
    pipeline = Pipeline(config, console)
    keys = stage_keys(results)
    command = recreate_command(results["config"], Path(config.cache_dir))
    for label in labels:
        if label not in keys:
            raise HarnessError(f"The run in {run_dir} has no {label} stage (it ran without the undefended reference?)."
                               f" Recreate the run with it: {command}")
        if label == "base" and keys["base"] != pipeline.base_key():
            raise HarnessError(f"The base model {config.model.ref!r} is not the one this run used (its fingerprint "
                               f"changed), so no stage of the run can be loaded as it was. Re-run: {command}")
        problem = _missing(pipeline, keys[label])
        if problem:
            raise HarnessError(f"The {label} model of {run_dir} is missing: {problem}. Recreate it (cached stages "
                               f"are reused) with: {command}")
    return RunStages(results, config, pipeline, keys)
