"""The example defence, as its author would test it: registered by its entry point, trained on the
tiny model, reporting what it did."""

from harness.api import defences


def test_registered_with_its_params():
    plugin = defences.get("refusal-anchor")
    params = plugin.parse_params({}, "defence.params")
    assert params.mask_prompt is True and params.lr == 2e-5 and params.epochs == 2


def test_ships_its_cpu_size_and_a_preset():
    from harness.api import build_config

    config = build_config(flags={"model": {"ref": "tiny-llama"}, "defence": {"name": "refusal-anchor@long"}},
                          profile="cpu")
    assert config.defence.params["num_pairs"] == 32 and config.defence.params["lr"] == 1e-4
    assert config.defence.params["epochs"] == 4 and config.defence.preset == "long"
