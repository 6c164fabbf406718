"""Plugins carry their own sizes per profile and their presets (registry hooks), layered under the
user's settings; a sweep that mixes plugins with and without sizes for its profile says so."""

from __future__ import annotations

import pytest

from harness.registry import Params, defences
from harness.run.config import build_config
from harness.run.sweep import SweepConfig, expand, unequal_sizes
from harness.train.sft import CPU_PAIR_SIZES


class ShieldParams(Params):
    strength: float = 1.0
    steps: int = 100


@pytest.fixture
def outside_defences():
    """Two throw-away defences: one sized for the CPU profile with a preset, one bare."""
    registered = []

    def add(name: str, **hooks):
        @defences.register(name, params=ShieldParams, **hooks)
        def shield(model, params, ctx):
            return None
        registered.append(name)

    add("sized-shield", profiles={"cpu": {"steps": 8}}, presets={"strong": {"strength": 3.0, "steps": 20}})
    add("bare-shield")
    yield
    for name in registered:
        defences._plugins.pop(name, None)


def config(defence: str, *sets: str, profile: str = "cpu"):
    return build_config(flags={"model": {"ref": "tiny-llama"}, "defence": {"name": defence}}, sets=list(sets),
                        profile=profile)


def test_defaults_then_profile_then_preset_then_the_user(outside_defences):
    assert config("sized-shield").defence.params == {"strength": 1.0, "steps": 8}  # the plugin's cpu size
    assert config("sized-shield", profile="paper").defence.params == {"strength": 1.0, "steps": 100}
    assert config("sized-shield@strong").defence.params == {"strength": 3.0, "steps": 20}  # preset over size
    assert config("sized-shield@strong", "defence.steps=5").defence.params["steps"] == 5  # the user over all
    assert config("bare-shield").defence.params == {"strength": 1.0, "steps": 100}


def test_builtin_sizes_are_beside_their_plugins():
    repnoise = config("repnoise").defence.params
    assert {k: repnoise[k] for k in CPU_PAIR_SIZES} == CPU_PAIR_SIZES and repnoise["lr"] == 1e-4
    attack = build_config(flags={"attack": {"name": "full-ft@paper-6e-5-1k"}}, profile="cpu").attack.params
    assert attack["lr"] == 6e-5 and attack["num_samples"] == 1000 and attack["max_length"] == 128


def test_a_misnamed_preset_lists_the_plugins_presets(outside_defences):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Unknown preset 'strnog' .*Did you mean sized-shield@strong\?"):
        config("sized-shield@strnog")


def test_a_sweep_mixing_sized_and_bare_plugins_says_so(outside_defences):
    def sweep(*names: str):
        return expand(SweepConfig(base={"model": {"ref": "tiny-llama"}}, defences=list(names), attacks=["full-ft"]))

    problems = unequal_sizes(sweep("none", "sized-shield", "bare-shield"))
    assert problems == ["defences bare-shield bring no cpu sizes and run at their defaults, while sized-shield "
                        "run at their cpu sizes"]
    assert unequal_sizes(sweep("none", "sized-shield", "repnoise")) == []  # `none` has no params to size
