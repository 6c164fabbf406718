"""The staged pipeline: base → defend → evaluate → attack → evaluate, every stage cached by content.

A stage's key hashes its parent's key, the stage kind, the plugin (name, version, params),
the fingerprints of the data sets it can see, the seed, the prompt format and the library
versions. Identical work is therefore found again; a changed parameter changes that stage's
key and every key below it, and nothing else. Models are loaded lazily: a fully cached run
reads a few JSON files and loads no weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from rich.console import Console

import harness
from harness.context import StageContext
from harness.data.readers import PAIRS_FILE, DataAccess
from harness.data.triggers import Trigger
from harness.errors import HarnessError
from harness.evaluation import EvalResult
from harness.files.atomic import write_json
from harness.files.hashing import cached_file_sha256, stable_hash
from harness.files.paths import check_output_dir, resolve_data_dir
from harness.models.loading import (
    LoadedModel,
    check_model_ref,
    load_model,
    load_saved,
    model_fingerprint,
    resolve_device,
    save_model,
)
from harness.outcome import as_trained
from harness.registry import Plugin, attacks, datasets, defences, evaluators
from harness.resources.memory import check_run_memory
from harness.run.config import NO_DEFENCE, PluginSpec, RunConfig, validate_plugins
from harness.run.store import StageStore
from harness.terminal import plain


def library_versions() -> dict[str, str]:
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)  # installed versions do not change while a process runs (a sweep builds many)
def _library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version(), "harness": harness.__version__, "torch": torch.__version__}
    for name in ("transformers", "peft", "lm_eval", "datasets", "rouge_score", "vllm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # e.g. the optional vllm extra
            continue
    return versions


def _keyed_versions(versions: dict[str, str]) -> dict[str, str]:
    """Versions that can change a trained model or a score (vllm only matters when used)."""
    return {k: v for k, v in versions.items()
            if k in ("harness", "torch", "transformers", "peft", "lm_eval", "rouge_score")}


def _names_a_dataset(value: str, known: set[str]) -> bool:
    """True for a registered data set name, with or without a category filter (``jbb-pairs[^Privacy]``)."""
    return value.split("[", 1)[0].strip() in known or value.startswith(PAIRS_FILE)


# plugin params that name a data set, and its record kind
DATA_FIELDS = {"dataset": "qa", "harmful_dataset": "qa", "pairs": "pairs",
               "harmful_prompts": "prompts", "harmless_prompts": "prompts"}


def data_fields(value: Any, where: str) -> list[tuple[str, str, str]]:
    """(field path, data set reference, kind) of every ``dataset``/``pairs`` string in a params dump."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}.{key}"
        if key in DATA_FIELDS and isinstance(item, str):
            found.append((path, item, DATA_FIELDS[key]))
        else:
            found.extend(data_fields(item, path))
    return found


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class StageRecord:
    """What results.json says about one stage."""

    kind: str
    key: str
    plugin: str | None
    params: dict[str, Any]
    cached: bool
    stats: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what the plugin reported (e.g. loss history)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "key": self.key, "plugin": self.plugin, "params": self.params,
            "cached": self.cached, "parent": self.parent, "stats": self.stats, "info": self.info,
        }


class Pipeline:
    """Runs one configured cell (defence × attack × seed), plus the undefended reference."""

    def __init__(self, config: RunConfig, console: Console | None = None) -> None:
        """Every check that needs no stage runs here (plugins, model reference, device, directories, data
        set names and category filters), so a typo never costs a trained model."""
        self.config = config
        self.console = console or Console(stderr=True)
        self.params = validate_plugins(config)
        check_model_ref(config.model.ref)
        resolve_device(config.model.device)
        check_output_dir(config.cache_dir, "cache_dir")
        check_output_dir(config.output_dir, "output_dir")
        self.data_dir = resolve_data_dir(config.data.dir)
        self.data = DataAccess(self.data_dir, config.data.eval_prompts, config.seed)
        self._check_data()
        self.store = StageStore(config.cache_dir)
        self.versions = library_versions()
        self._model: LoadedModel | None = None
        self._model_key: str | None = None
        self.stages: dict[str, StageRecord] = {}
        self.data_fingerprints: dict[str, str] = {}  # every data fingerprint that went into a key

    def _check_data(self) -> None:
        """Read every data set any stage will read (names, category filters, kinds) before the first stage."""
        self.data.check(self.config.data.eval_prompts, "prompts", "data.eval_prompts")
        for where, params in self.params.items():
            field = where if where.startswith("evaluate.") else f"{where}.params"
            for path, ref, kind in data_fields(params.model_dump(mode="json"), field):
                self.data.check(ref, kind, path)

    # ----- keys -------------------------------------------------------------------------
    def _data_fingerprints(self, params: Any, plugin: Plugin | None = None) -> dict[str, str]:
        """Fingerprints of every data set a stage can read: those named in its params, and the
        evaluation set (training sets are filtered against it)."""
        names = {self.config.data.eval_prompts}
        known = set(datasets.names())

        def collect(value: Any) -> None:
            if isinstance(value, str) and _names_a_dataset(value, known):
                names.add(value)
            elif isinstance(value, dict):
                for v in value.values():
                    collect(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    collect(v)

        collect(params.model_dump(mode="json") if hasattr(params, "model_dump") else params)
        fingerprints = {name: self.data.fingerprint(name) for name in sorted(names)}
        if plugin is not None and plugin.hook("data_files") is not None:  # files a plugin reads directly
            for relative in sorted(plugin.hook("data_files")(params)):
                path = self.data_dir / relative
                fingerprints[f"file:{relative}"] = cached_file_sha256(path) if path.exists() else "missing"
        self.data_fingerprints.update(fingerprints)
        return fingerprints

    def base_key(self) -> str:
        model = self.config.model
        return stable_hash({
            "stage": "base", "ref": model.ref, "revision": model.revision,
            "fingerprint": model_fingerprint(model.ref, model.revision), "dtype": model.dtype,
        })

    def stage_key(self, parent: str, kind: str, plugin: Plugin, params: Any) -> str:
        """``depends_on`` (plugin info) names what else shapes the output, e.g. a judge's version."""
        depends_on = plugin.hook("depends_on")(params) if plugin.hook("depends_on") is not None else None
        return stable_hash({
            "parent": parent, "stage": kind, "plugin": plugin.name, "plugin_version": plugin.version,
            "params": params, "data": self._data_fingerprints(params, plugin), "seed": self.config.seed,
            "prompt_format": self.config.data.prompt_format, "versions": _keyed_versions(self.versions),
            **({"depends_on": depends_on} if depends_on is not None else {}),
        })

    # ----- models -----------------------------------------------------------------------
    def _context(self, workdir: Path) -> StageContext:
        return StageContext(
            seed=self.config.seed, device=self.config.model.device, dtype=self.config.model.dtype,
            data=self.data, cache_dir=Path(self.config.cache_dir), workdir=workdir,
            console=self.console, prompt_format=self.config.data.prompt_format, base_model=self.config.model.ref,
        )

    def model_for(self, key: str) -> LoadedModel:
        """The model a stage key stands for: in memory if it is the current one, else loaded."""
        if self._model is not None and self._model_key == key:
            return self._model
        model = self._load(key)
        self._model, self._model_key = model, key
        return model

    def _load(self, key: str) -> LoadedModel:
        m = self.config.model
        if key == self.base_key():
            with self.console.status(f"Loading {plain(m.ref)}…"):
                return load_model(m.ref, device=m.device, dtype=m.dtype, revision=m.revision,
                                  trust_remote_code=m.trust_remote_code)
        manifest = self.store.manifest(key)
        if manifest.get("weights") == "dropped":  # dropped after its evaluations (resources.keep_attacked_weights)
            return self._recreate(key, manifest)
        if manifest["output"] == "alias":
            return self._load(manifest["alias_of"])
        base = self._load(manifest["parent"]) if manifest["output"] == "adapter" else None
        with self.console.status(f"Loading stage {key}…"), self.store.claim(key):  # no prune or drop meanwhile
            if self.store.manifest(key).get("weights") != "dropped":  # else dropped since we read the manifest
                return load_saved(self.store.path(key) / "model", device=m.device, dtype=m.dtype, base=base)
        return self._recreate(key, self.store.manifest(key))

    def _recreate(self, key: str, manifest: dict[str, Any]) -> LoadedModel:
        """Rebuild a model stage whose weights were dropped, under its own key: the plugin runs again exactly
        as on a cache miss (same params, seed and data, so the same weights), and the stage is published anew."""
        kind, parent = manifest["kind"], manifest["parent"]
        spec = PluginSpec(name=manifest["plugin"], params=manifest["params"])
        plugin = {"defend": defences, "attack": attacks}[kind].get(spec.name)
        params = plugin.parse_params(spec.params, f"{kind}.params")
        if self.stage_key(parent, kind, plugin, params) != key:
            raise HarnessError(f"The weights of stage {key} were dropped after its evaluations, and this run's "
                               "settings (seed, data, library versions) would not rebuild the same stage. Re-run the "
                               "`harness run` that made it (its results.json has the config) to recreate them.")
        scope = None
        if kind == "attack":
            defended = self.store.manifest(parent)
            scope = self._attack_scope(PluginSpec(name=defended["plugin"], params=defended["params"]), parent)
        label = f"recreate {kind} {key}"
        with self.store.claim(key):
            if self.store.manifest(key).get("weights") == "dropped":  # else another process recreated it
                self.console.print(f"[yellow]↻[/] {kind} {key}: its weights were dropped; recreating them")
                self._build_model_stage(kind, parent, key, plugin, params, spec, label, scope, rebuild=True)
                self.stages.pop(label, None)  # the run's record keeps the stage as first built
                return self._model  # type: ignore[return-value]
        return self._load(key)

    def _drop_attacked_weights(self, key: str) -> None:
        """After its evaluations an attacked model's weights go, unless resources.keep_attacked_weights: its
        manifest (stats, key), results and generations stay; a stage that needs the weights recreates them.
        Only the writing process drops (ranks of a sharded run that do not write return at once)."""
        world = getattr(self, "world", None)
        if self.config.resources.keep_attacked_weights or (world is not None and not world.is_writer):
            return
        from harness.resources.cache_admin import drop_weights

        with self.store.claim(key):
            freed = drop_weights(self.store.root.parent, key)
        if freed:
            if self._model_key == key:  # its path is gone: a later use reloads (recreates) it
                self._model, self._model_key = None, None
            self.console.print(f"[dim]dropped the attacked weights of {key} ({freed / 2**20:.1f} MiB) after their "
                               "evaluations; resources.keep_attacked_weights=true keeps them[/]")

    # ----- stages -----------------------------------------------------------------------
    def _model_stage(self, kind: str, parent: str, spec: PluginSpec, registry: Any, label: str,
                     scope: Callable[[LoadedModel], ContextManager[Any]] | None = None) -> str:
        """Run (or find cached) one weight-changing stage; ``scope`` wraps the plugin call (attack-time hooks)."""
        plugin = registry.get(spec.name)
        params = plugin.parse_params(spec.params, f"{kind}.params")
        key = self.stage_key(parent, kind, plugin, params)
        with self.store.claim(key):
            self._build_model_stage(kind, parent, key, plugin, params, spec, label, scope)
        return key

    def _build_model_stage(self, kind: str, parent: str, key: str, plugin: Plugin, params: Any,
                           spec: PluginSpec, label: str,
                           scope: Callable[[LoadedModel], ContextManager[Any]] | None, rebuild: bool = False) -> None:
        if not rebuild and self.store.has(key):
            manifest = self.store.manifest(key)
            self.stages[label] = StageRecord(kind, key, spec.name, params.model_dump(mode="json"), True,
                                             manifest.get("stats", {}), parent, manifest.get("info", {}))
            self.console.print(f"[green]✓[/] {label}: {plain(spec.name)} (cached {key})")
            return
        model = self.model_for(parent)
        self._model_key = None  # the plugin changes weights in place: never reuse them if it fails
        self.console.print(f"[bold]→ {label}[/]: {plain(spec.name)}")
        started = time.perf_counter()
        meta: dict[str, Any] = {"kind": kind, "plugin": spec.name, "params": params.model_dump(mode="json"),
                                "parent": parent}
        with self.store.write(key, meta) as scratch:
            ctx = self._context(scratch / "work")
            ctx.workdir.mkdir()
            with scope(model) if scope else contextlib.nullcontext():
                trained = as_trained(plugin.fn(model, params, ctx))
            result = trained.model
            ctx.stats["wall_seconds"] = round(time.perf_counter() - started, 2)
            ctx.stats["peak_memory_mb"] = round(peak_memory_mb(), 1)
            if model.device.type == "cuda":
                ctx.stats["gpu_seconds"] = ctx.stats["wall_seconds"]
            if result is None:  # weights unchanged: point at the parent instead of copying it
                meta.update(output="alias", alias_of=parent)
            else:
                is_adapter = hasattr(result.model, "peft_config")
                meta.update(output="adapter" if is_adapter else "model")
                save_model(result, scratch / "model")
                model = result
            meta["stats"] = ctx.stats
            meta["info"] = trained.report
            if not any(ctx.workdir.iterdir()):
                ctx.workdir.rmdir()
        if meta["output"] == "model":  # later stages (and vLLM) read the weights from their final home
            model.path, model.adapter_path = self.store.path(key) / "model", None
        elif meta["output"] == "adapter":
            model.adapter_path = self.store.path(key) / "model"
        self._model, self._model_key = model, key
        self.stages[label] = StageRecord(kind, key, spec.name, params.model_dump(mode="json"), False,
                                         ctx.stats, parent, meta["info"])

    def _evaluate(self, model_key: str, label: str, trigger: Trigger | None = None) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, values in self.config.evaluate.items():
            plugin = evaluators.get(name)
            params = plugin.parse_params(values, f"evaluate.{name}")
            key = self.stage_key(model_key, "evaluate", plugin, params)
            with self.store.claim(key):
                cached = self._build_evaluation(model_key, key, name, plugin, params, label, trigger)
            directory = self.store.path(key)
            stored = json.loads((directory / "info.json").read_text())
            results[name] = {
                "key": key, "cached": cached, "params": params.model_dump(mode="json"),
                "metrics": json.loads((directory / "metrics.json").read_text()),
                "info": stored["info"], "stats": stored["stats"],
                "records": str(directory / "records.jsonl"),
            }
        return results

    def _build_evaluation(self, model_key: str, key: str, name: str, plugin: Plugin, params: Any,
                          label: str, trigger: Trigger | None = None) -> bool:
        """Evaluate the model under ``model_key`` into stage ``key`` unless stored; True if it was stored."""
        if self.store.has(key):
            self.console.print(f"[green]✓[/] evaluate {label}: {plain(name)} (cached {key})")
            return True
        model = self.model_for(model_key)
        self.console.print(f"[bold]→ evaluate {label}[/]: {plain(name)}")
        started = time.perf_counter()
        with self.store.write(key, {"kind": "evaluate", "plugin": name, "parent": model_key}) as scratch:
            ctx = self._context(scratch)
            ctx.trigger = trigger  # set by a backdoor attack; part of the key through the attack stage (parent)
            outcome: EvalResult = plugin.fn(model, params, ctx)
            ctx.stats["wall_seconds"] = round(time.perf_counter() - started, 2)
            write_json(scratch / "metrics.json", outcome.metrics)
            write_json(scratch / "info.json", {"info": outcome.info, "stats": ctx.stats})
            with open(scratch / "records.jsonl", "w", encoding="utf-8") as fh:
                for record in outcome.records:
                    fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        return False

    def _attack_scope(self, defence: PluginSpec, defended: str) -> Callable[[LoadedModel], ContextManager[Any]] | None:
        """A defence's attack-time hook (e.g. security vectors kept active while the attacker trains),
        given the files the defence left in its stage; the attacked model is saved after it exits."""
        plugin = defences.get(defence.name)
        during_attack = plugin.hook("during_attack")
        if during_attack is None:
            return None
        params = plugin.parse_params(defence.params, "defence.params")
        artefacts = self.store.path(defended) / "work"
        return lambda model: during_attack(model, params, artefacts)

    def _branch(self, defence: PluginSpec, prefix: str) -> dict[str, Any]:
        base = self.base_key()
        defended = self._model_stage("defend", base, defence, defences, f"{prefix}defend")
        before = self._evaluate(defended, f"{prefix}defended")
        attacked = self._model_stage("attack", defended, self.config.attack, attacks, f"{prefix}attack",
                                     scope=self._attack_scope(defence, defended))
        after = self._evaluate(attacked, f"{prefix}attacked", Trigger.from_report(self.stages[f"{prefix}attack"].info))
        self._drop_attacked_weights(attacked)
        return {"defence": defence.name, "defended_key": defended, "attacked_key": attacked,
                "pre_attack": before, "post_attack": after}

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        check_run_memory(self)  # before the first stage: a stage that cannot fit is refused now
        branches = {"defended": self._branch(self.config.defence, "")}
        if self.config.compare_undefended and self.config.defence.name != NO_DEFENCE.name:
            branches["undefended"] = self._branch(NO_DEFENCE, "undefended ")
        return {
            "branches": branches,
            "stages": {label: s.as_dict() for label, s in self.stages.items()},
            "wall_seconds": round(time.perf_counter() - started, 2),
            "versions": self.versions,
            "data_dir": str(self.data_dir),
            "skipped_rows": self.data.skipped_rows(),
            "base_key": self.base_key(),
        }
