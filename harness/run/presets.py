"""Named plugin settings (``full-ft@paper-6e-5-10k``) and per-profile sizes, both carried by the plugin.

A plugin registers ``presets={name: params}`` (partial params, e.g. the paper's attack grid) and
``profiles={"cpu": params, "paper": params}`` (its sizes for each profile) beside its recipe, so
an outside package ships them exactly as the built-ins do. Layering, later winning: the plugin's
defaults < its profile sizes < a preset < the user's settings.
"""

from __future__ import annotations

import difflib
from typing import Any

from harness.errors import ConfigError

SEPARATOR = "@"


def presets_of(kind: str) -> dict[str, dict[str, dict[str, Any]]]:
    """{plugin name: {preset name: params}} for ``kind`` ("attacks" or "defences")."""
    from harness.registry import HOOKS, registry_for

    registry = registry_for(kind)
    if "presets" not in HOOKS.get(registry.kind, {}):  # evaluators, judges, ... have none
        return {}
    return {p.name: dict(p.hook("presets")) for p in registry.plugins() if p.hook("presets")}


def split_reference(reference: str) -> tuple[str, str | None]:
    """``full-ft@cpu-3e-5-32`` → ("full-ft", "cpu-3e-5-32"); a plain name has no preset."""
    name, _, preset = reference.partition(SEPARATOR)
    return name.strip(), (preset.strip() or None) if SEPARATOR in reference else None


def preset_params(kind: str, plugin: str, preset: str) -> dict[str, Any]:
    """The params of one preset, or an error listing the presets that exist for the plugin."""
    from harness.registry import registry_for

    available = registry_for(kind).get(plugin).hook("presets") or {}
    if preset not in available:
        close = difflib.get_close_matches(preset, list(available), n=1)
        hint = f" Did you mean {plugin}{SEPARATOR}{close[0]}?" if close else ""
        known = ", ".join(available) or "(none)"
        raise ConfigError(f"Unknown preset {preset!r} for {kind[:-1]} {plugin!r}.{hint} Known: {known}.")
    return dict(available[preset])


def profile_params(kind: str, plugin: str, profile: str) -> dict[str, Any] | None:
    """The plugin's sizes for ``profile``, or None when it brings none (it then runs at its defaults)."""
    from harness.registry import registry_for

    sizes = registry_for(kind).get(plugin).hook("profiles") or {}
    return dict(sizes[profile]) if profile in sizes else None


def unsized(kind: str, plugin: str, profile: str) -> bool:
    """True for a plugin with params of its own but no sizes for ``profile``: on the CPU profile it runs
    at its (paper-sized) defaults while sized plugins run small, which makes comparisons unequal."""
    from harness.registry import registry_for

    found = registry_for(kind).get(plugin)
    return bool(found.params_model.model_fields) and profile_params(kind, plugin, profile) is None
