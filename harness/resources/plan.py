"""The model stages a run will build, by key, known before any of them runs (for the memory and disk checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from harness.run.store import MANIFEST


@dataclass(frozen=True)
class PlannedStage:
    kind: str  # "defend" or "attack"
    key: str
    parent: str
    plugin: str
    params: Any  # the plugin's validated params
    stored: bool  # a manifest exists under the key (its weights may have been dropped)


def planned_model_stages(pipeline: Any) -> Iterator[PlannedStage]:
    """Defend and attack stages of every branch of the run (the undefended reference included), in order."""
    from harness.registry import attacks, defences
    from harness.run.config import NO_DEFENCE

    config = pipeline.config
    branches = [config.defence]
    if config.compare_undefended and config.defence.name != NO_DEFENCE.name:
        branches.append(NO_DEFENCE)
    base = pipeline.base_key()
    for defence in branches:
        parent = base
        for kind, spec, registry in (("defend", defence, defences), ("attack", config.attack, attacks)):
            plugin = registry.get(spec.name)
            params = plugin.parse_params(spec.params, f"{kind}.params")
            key = pipeline.stage_key(parent, kind, plugin, params)
            yield PlannedStage(kind, key, parent, spec.name, params, (pipeline.store.path(key) / MANIFEST).exists())
            parent = key
