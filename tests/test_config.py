import pytest

from harness.errors import ConfigError, UnknownPluginError
from harness.results.record import run_name
from harness.run.config import build_config, parse_set


def test_defaults_and_cpu_profile_apply_to_selected_plugins_only():
    config = build_config(flags={"attack": {"name": "lora"}})
    assert config.profile == "cpu"
    assert config.defence.name == "none" and config.attack.name == "lora"
    assert config.attack.params["num_samples"] == 48  # from the cpu profile's lora entry
    assert config.evaluate["harmfulness"]["num_prompts"] == 50


def test_paper_profile_uses_paper_sizes():
    config = build_config(profile="paper")
    assert config.attack.params["num_samples"] == 1000
    assert config.evaluate["harmfulness"]["num_prompts"] == 300


def test_yaml_then_flags_then_set_override_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 7\nattack:\n  name: full-ft\n  params:\n    lr: 1.0e-5\n    num_samples: 10\n")
    config = build_config(path, flags={"seed": 8}, sets=["attack.lr=6e-5", "defence.name=none"])
    assert config.seed == 8
    assert config.attack.params["lr"] == 6e-5  # --set wins over the file
    assert config.attack.params["num_samples"] == 10  # the file wins over the profile


def test_set_shortcut_puts_plugin_fields_under_params():
    assert parse_set("defence.beta=0.01") == {"defence": {"params": {"beta": 0.01}}}
    assert parse_set("attack.name=lora") == {"attack": {"name": "lora"}}
    assert parse_set("evaluate.harmfulness.generation.max_new_tokens=8") == {
        "evaluate": {"harmfulness": {"generation": {"max_new_tokens": 8}}}
    }
    assert parse_set("attack.targets=[q_proj, v_proj]")["attack"]["params"]["targets"] == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="expected path.to.field=value"):
        parse_set("attack.lr")


@pytest.mark.parametrize(
    "sets, field",
    [
        (["attack.lr=-1"], "attack.params.lr"),
        (["attack.lr=fast"], "attack.params.lr"),
        (["attack.no_such_knob=1"], "attack.params.no_such_knob"),
        (["seed=abc"], "config.seed"),
        (["model.dtype=float8"], "config.model.dtype"),
        (["evaluate.harmfulness.num_prompts=0"], "evaluate.harmfulness.num_prompts"),
        (["evaluate.harmfulness.judges=[{name: refusal-keywords, params: {window: 0}}]"],
         "evaluate.harmfulness.judges.0.params.window"),
    ],
)
def test_invalid_values_fail_before_work_naming_the_field(sets, field):
    with pytest.raises(ConfigError) as info:
        build_config(sets=sets)
    assert field in str(info.value)


def test_unknown_plugin_names_fail_at_config_time():
    with pytest.raises(UnknownPluginError, match="Did you mean 'lora'"):
        build_config(flags={"attack": {"name": "loraa"}})
    with pytest.raises(UnknownPluginError):
        build_config(flags={"evaluate": {"harmfulnes": {}}})


def test_bad_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")


def test_attack_preset_sits_above_profile_and_below_user_settings():
    config = build_config(flags={"attack": {"name": "full-ft@cpu-8e-5-128"}})
    assert (config.attack.name, config.attack.preset, config.attack.label) == (
        "full-ft", "cpu-8e-5-128", "full-ft@cpu-8e-5-128"
    )
    # preset beats profile's 48
    assert config.attack.params["lr"] == 8e-5 and config.attack.params["num_samples"] == 128
    assert config.attack.params["max_length"] == 128  # the profile still fills what the preset leaves
    config = build_config(flags={"attack": {"name": "full-ft@cpu-8e-5-128"}}, sets=["attack.lr=1e-5"])
    assert config.attack.params["lr"] == 1e-5 and config.attack.params["num_samples"] == 128
    paper = build_config(flags={"attack": {"name": "full-ft@paper-8e-5-10k-2ep"}})
    assert (paper.attack.params["epochs"], paper.attack.params["num_samples"]) == (2, 10000)
    assert "full-ft@cpu-8e-5-128" in run_name(build_config(flags={"attack": {"name": "full-ft@cpu-8e-5-128"}}))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        ConfigError,
        match=r"Unknown preset 'paper-6e-5-10' .*Did you mean full-ft@paper-6e-5-10k\?.*Known: paper-3e-5-1k",
    ):
        build_config(flags={"attack": {"name": "full-ft@paper-6e-5-10"}})
