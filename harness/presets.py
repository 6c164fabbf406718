"""Named plugin settings (``full-ft@paper-6e-5-10k``): the paper's attack grid by name.

A preset is a partial params dict stored in ``harness/presets/<kind>.yaml``. It fills the
plugin's params above the profile and below anything the user sets.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources
from typing import Any

import yaml

from harness.errors import ConfigError

SEPARATOR = "@"


@cache
def presets_of(kind: str) -> dict[str, dict[str, dict[str, Any]]]:
    """{plugin name: {preset name: params}} for ``kind`` ("attacks" or "defences")."""
    path = resources.files("harness").joinpath("presets", f"{kind}.yaml")
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def split_reference(reference: str) -> tuple[str, str | None]:
    """``full-ft@cpu-3e-5-32`` → ("full-ft", "cpu-3e-5-32"); a plain name has no preset."""
    name, _, preset = reference.partition(SEPARATOR)
    return name.strip(), (preset.strip() or None) if SEPARATOR in reference else None


def preset_params(kind: str, plugin: str, preset: str) -> dict[str, Any]:
    """The params of one preset, or an error listing the presets that exist for the plugin."""
    available = presets_of(kind).get(plugin, {})
    if preset not in available:
        close = difflib.get_close_matches(preset, list(available), n=1)
        hint = f" Did you mean {plugin}{SEPARATOR}{close[0]}?" if close else ""
        known = ", ".join(available) or "(none)"
        raise ConfigError(f"Unknown preset {preset!r} for {kind[:-1]} {plugin!r}.{hint} Known: {known}.")
    return dict(available[preset])
