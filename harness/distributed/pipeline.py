"""The staged pipeline on one rank of a sharded run: every rank trains, rank 0 alone writes.

Rank 0 claims each stage in the cache, decides whether it is cached and tells the others (so all
ranks agree, even when rank 0 finishes writing before another rank looks); every rank then runs a
stage that is not cached (training is a collective), rank 0 saves it. Evaluations and results are
rank 0's: the others wait, and training inside an evaluation (trainability) runs on rank 0 alone.
Interrupted runs resume like single-process ones, since only complete stages are ever published.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager

from rich.console import Console

from harness.distributed.world import World, barrier, broadcast, solo
from harness.models.loading import LoadedModel
from harness.outcome import as_trained
from harness.registry import Plugin
from harness.run.config import PluginSpec, RunConfig
from harness.run.pipeline import Pipeline, StageRecord


class DistributedPipeline(Pipeline):
    def __init__(self, config: RunConfig, console: Console, world: World) -> None:
        super().__init__(config, console)
        self.world = world

    def _model_stage(self, kind: str, parent: str, spec: PluginSpec, registry: Any, label: str,
                     scope: Callable[[LoadedModel], ContextManager[Any]] | None = None) -> str:
        plugin = registry.get(spec.name)
        params = plugin.parse_params(spec.params, f"{kind}.params")
        key = self.stage_key(parent, kind, plugin, params)
        if self.world.is_writer:
            with self.store.claim(key):
                broadcast(self.store.has(key))
                self._build_model_stage(kind, parent, key, plugin, params, spec, label, scope)
        else:
            cached = broadcast(None)
            self._follow_model_stage(kind, parent, key, plugin, params, spec, label, scope, cached)
        barrier()  # the stage is published before any rank goes on
        return key

    def _follow_model_stage(self, kind: str, parent: str, key: str, plugin: Plugin, params: Any,
                            spec: PluginSpec, label: str,
                            scope: Callable[[LoadedModel], ContextManager[Any]] | None, cached: bool) -> None:
        """A non-writing rank's share of a stage: train with the others, keep the result in memory only."""
        if cached:
            manifest = self.store.manifest(key)
            self.stages[label] = StageRecord(kind, key, spec.name, params.model_dump(mode="json"), True,
                                             manifest.get("stats", {}), parent, manifest.get("info", {}))
            return
        model = self.model_for(parent)
        self._model_key = None
        with tempfile.TemporaryDirectory(prefix=f"harness-rank{self.world.rank}-") as workdir:
            ctx = self._context(Path(workdir))
            with scope(model) if scope else contextlib.nullcontext():
                trained = as_trained(plugin.fn(model, params, ctx))
        result = trained.model if trained.model is not None else model
        path = self.store.path(key) / "model"  # where rank 0 publishes it
        if trained.model is not None and hasattr(result.model, "peft_config"):
            result.adapter_path = path
        elif trained.model is not None:
            result.path, result.adapter_path = path, None
        self._model, self._model_key = result, key
        self.stages[label] = StageRecord(kind, key, spec.name, params.model_dump(mode="json"), False, ctx.stats,
                                         parent, trained.report)

    def _evaluate(self, model_key: str, label: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not self.world.is_writer:
            return {}
        with solo():
            return super()._evaluate(model_key, label, *args, **kwargs)

