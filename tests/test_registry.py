import sys
import textwrap

import pytest

from harness.errors import ConfigError, UnknownPluginError
from harness.registry import Params, Registry, attacks, defences, registry_for


def test_builtin_plugins_are_registered():
    assert {"none"} <= set(defences.names())
    assert {"full-ft", "lora"} <= set(attacks.names())
    assert registry_for("defence") is defences  # singular accepted


def test_unknown_name_lists_known_and_suggests_close_match():
    with pytest.raises(UnknownPluginError) as info:
        attacks.get("ful-ft")
    message = str(info.value)
    assert "Did you mean 'full-ft'?" in message
    assert "lora" in message and "harness list attacks" in message


def test_decorator_registers_typed_params_and_validates():
    registry = Registry("things")

    class P(Params):
        strength: float = 1.0

    @registry.register("thing", params=P, description="a thing")
    def thing(x):
        return x

    plugin = registry._plugins["thing"]
    assert plugin.fn is thing and plugin.description == "a thing"
    assert plugin.parse_params({"strength": 2}, "thing.params").strength == 2.0
    with pytest.raises(ConfigError, match=r"thing\.params\.strength"):
        plugin.parse_params({"strength": "strong"}, "thing.params")
    with pytest.raises(ConfigError, match=r"thing\.params\.colour: unknown field"):
        plugin.parse_params({"colour": "red"}, "thing.params")


def test_two_plugins_with_one_name_are_rejected():
    registry = Registry("things")

    def first():
        return 1

    def second():
        return 2

    registry.register("x")(first)
    with pytest.raises(Exception, match="Two things plugins are named 'x'"):
        registry.register("x")(second)


def test_outside_package_registers_through_entry_point(tmp_path, monkeypatch):
    """A throw-away installed distribution (dist-info with entry_points.txt) adds a defence
    without any core edit."""
    package = tmp_path / "site" / "outside_defence"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent('''
        from harness.registry import Params, defences

        class ShieldParams(Params):
            thickness: int = 3

        @defences.register("outside-shield", params=ShieldParams, description="from an outside package")
        def shield(model, params, ctx):
            return None
    '''))
    dist = tmp_path / "site" / "outside_defence-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-defence\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[harness.defences]\noutside-shield = outside_defence\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        defences.reload_entry_points()
        plugin = defences.get("outside-shield")
        assert plugin.description == "from an outside package"
        assert plugin.parse_params({}, "defence.params").thickness == 3
    finally:
        defences._plugins.pop("outside-shield", None)
        sys.modules.pop("outside_defence", None)


def test_broken_entry_point_does_not_break_the_registry(tmp_path, monkeypatch, caplog):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[harness.attacks]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    attacks.reload_entry_points()
    assert "full-ft" in attacks.names()
    assert any("broken" in r.getMessage() for r in caplog.records)


def test_a_misspelt_hook_is_refused_at_registration_naming_plugin_and_keyword():
    """`during_atack=` used to be kept as an unread extra, silently switching the hook off."""
    from harness.errors import HarnessError

    registry = Registry("defences")
    with pytest.raises(HarnessError, match=r"'shield' registers with unknown keyword 'during_atack'\. "
                                           r"Did you mean 'during_attack'\?"):
        registry.register("shield", during_atack=lambda model, params, artefacts: None)
    assert "shield" not in registry._plugins


def test_a_hook_of_the_wrong_type_is_refused():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=r"attacks plugin 'x': threat_model= must be a non-empty string"):
        Registry("attacks").register("x", threat_model=3)
    with pytest.raises(HarnessError, match=r"data_files= must be a function"):
        Registry("evaluators").register("x", data_files=["a.json"])
    with pytest.raises(HarnessError, match=r"'headline'"):  # a hook of another kind
        Registry("defences").register("x", headline="acc")


def test_hooks_are_read_by_declared_name_only():
    registry = Registry("attacks")

    @registry.register("x", threat_model="open-weight")
    def x(model, params, ctx):
        return model

    plugin = registry._plugins["x"]
    assert plugin.hook("threat_model") == "open-weight"
    assert plugin.hook("depends_on") is None
    with pytest.raises(KeyError, match="'threatmodel' is not a hook of attacks"):
        plugin.hook("threatmodel")


def test_every_builtin_plugin_uses_declared_hooks_only():
    from harness.registry import HOOKS, REGISTRIES, load_all

    load_all()
    for registry in REGISTRIES.values():
        for plugin in registry.plugins():
            assert set(plugin.info) <= set(HOOKS[registry.kind]), (registry.kind, plugin.name)
    assert defences.get("security-vectors").hook("during_attack") is not None
