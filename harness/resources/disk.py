"""How much disk a sweep will write into the stage cache, and whether the file system can hold it.

Counted per stage that is not stored yet, from the model's shape (no weights load): a defended model is one
full set of weights (shared by every attack of its row; the ``none`` defence is an alias and costs nothing),
an attacked model is full weights or a LoRA adapter, an evaluation a few megabytes of generations and metrics.
Attacked weights are dropped after their evaluations unless ``resources.keep_attacked_weights``: then only
the attacked models of cells running at the same time are on disk at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from harness.errors import HarnessError
from harness.resources.memory import ALL_LINEAR, ModelShape, gib, shape_for_ref, weight_bytes_for
from harness.resources.sizes import free_bytes, tree_size  # noqa: F401  (part of this module's surface)

EVALUATION_BYTES = 4 * 2**20  # generations, records and metrics of one evaluation stage (measured: < 1 MiB)
TOKENIZER_BYTES = 8 * 2**20  # every saved model or adapter carries its tokenizer (SmolLM2's: 3.5 MB)
HEADROOM = 1.05


@dataclass
class DiskNeed:
    """Bytes a sweep will add to the cache: kept for good, and held only while a cell runs."""

    defended: int = 0
    attacked_kept: int = 0
    attacked_transient: int = 0
    evaluations: int = 0
    stages: list[str] = field(default_factory=list)  # keys counted (each once)

    @property
    def total(self) -> int:
        return self.defended + self.attacked_kept + self.attacked_transient + self.evaluations

    def describe(self) -> str:
        parts = [("defended models", self.defended), ("attacked models kept", self.attacked_kept),
                 ("attacked models held until evaluated", self.attacked_transient),
                 ("evaluations", self.evaluations)]
        return ", ".join(f"{name} {gib(value)}" for name, value in parts if value) or "nothing new"


def model_output_bytes(shape: ModelShape, params: dict[str, Any], weight_bytes: int) -> int:
    """What a weight-changing stage saves: a LoRA adapter (float32) or a full model in the weight dtype, and
    the tokenizer."""
    rank = params.get("rank") if "targets" in params else None
    if rank and not params.get("merge", False):
        return shape.lora_params(int(rank), tuple(params.get("targets") or ALL_LINEAR)) * 4 + TOKENIZER_BYTES
    return shape.params * weight_bytes + TOKENIZER_BYTES


def sweep_disk_need(configs: Iterable[Any], concurrency: int = 1) -> DiskNeed:
    """Disk the runs of ``configs`` (RunConfig) add to their cache, counting each new stage once."""
    from harness.registry import attacks, defences, evaluators
    from harness.run.config import NO_DEFENCE
    from harness.run.pipeline import Pipeline
    from harness.run.store import MANIFEST

    need = DiskNeed()
    seen: set[str] = set()
    transient: list[int] = []
    for config in configs:
        shape = shape_for_ref(config.model.ref)
        if shape is None:
            continue  # a hub model whose config is not cached here: nothing to count from
        wb = weight_bytes_for(config.model.dtype, config.model.device)
        try:
            pipeline = Pipeline(config)
        except HarnessError:  # a cell that cannot start (bad data filter, ...) fails on its own and writes nothing
            continue
        store = pipeline.store
        base = pipeline.base_key()
        branches = [config.defence] + ([NO_DEFENCE] if config.compare_undefended
                                       and config.defence.name != NO_DEFENCE.name else [])
        for defence in branches:
            defended = _key(pipeline, "defend", base, defence, defences)
            new_defence = defended not in seen and not (store.path(defended) / MANIFEST).exists()
            if new_defence:
                seen.add(defended)
                need.stages.append(defended)
                if defence.name != NO_DEFENCE.name:
                    need.defended += model_output_bytes(shape, {}, wb)
            attacked = _key(pipeline, "attack", defended, config.attack, attacks)
            for key in (defended, attacked):
                for name, values in config.evaluate.items():
                    plugin = evaluators.get(name)
                    evaluation = pipeline.stage_key(key, "evaluate", plugin, plugin.parse_params(values, name))
                    if evaluation not in seen and not (store.path(evaluation) / MANIFEST).exists():
                        seen.add(evaluation)
                        need.evaluations += EVALUATION_BYTES
            if attacked in seen or (store.path(attacked) / MANIFEST).exists():
                continue
            seen.add(attacked)
            need.stages.append(attacked)
            size = model_output_bytes(shape, config.attack.params, wb)
            if config.resources.keep_attacked_weights:
                need.attacked_kept += size
            else:
                transient.append(size)
    need.attacked_transient = sum(sorted(transient, reverse=True)[:max(1, concurrency)])
    return need


def _key(pipeline: Any, kind: str, parent: str, spec: Any, registry: Any) -> str:
    plugin = registry.get(spec.name)
    return pipeline.stage_key(parent, kind, plugin, plugin.parse_params(spec.params, f"{kind}.params"))


def check_disk(need: DiskNeed, cache_dir: Path, budget_gb: float | None = None, what: str = "This sweep") -> int:
    """Refuse (HarnessError) unless ``need`` fits in the free space (and the budget); returns the bytes available."""
    free = free_bytes(cache_dir)
    available = min(free, int(budget_gb * 2**30)) if budget_gb is not None else free
    if need.total * HEADROOM > available:
        limit = f"the disk budget of {budget_gb:g} GiB" if budget_gb is not None and available < free else \
            f"{gib(free)} free on the file system of {cache_dir}"
        raise HarnessError(
            f"{what} needs about {gib(need.total)} in the stage cache ({need.describe()}; plus "
            f"{HEADROOM - 1:.0%} headroom) but there is only {gib(available)} ({limit}). Free space with "
            "`harness cache prune` (e.g. --kind attack --older-than 7d), leave resources.keep_attacked_weights "
            "off, or put the cache on a bigger disk (--set base.cache_dir=PATH)."
        )
    return available
