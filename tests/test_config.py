"""Config loading: big_vision-style file:variant specs with typed, nested overrides."""
import pytest

from jaxboost.config import load_config, resolve_config_path


def test_load_config_applies_typed_nested_overrides():
    c = load_config("configs/unet_phantom.py:tiny", ["total_steps=7", "optim.lr=0.5", "data.corpus=/x"])
    assert c.total_steps == 7 and isinstance(c.total_steps, int)
    assert c.optim.lr == 0.5 and c.data.corpus == "/x"
    assert load_config("unet_phantom:full").total_steps == 20_000


def test_unknown_variant_and_file_are_named():
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        load_config("configs/unet_phantom.py:huge")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        resolve_config_path("configs/nope.py:tiny")


def test_unknown_override_key_is_rejected():
    with pytest.raises(Exception, match="no_such_field"):
        load_config("configs/unet_phantom.py:tiny", ["no_such_field=1"])


def test_override_config_types_values_as_train_and_names_the_source():
    import json

    from ml_collections import ConfigDict

    from jaxboost.config import ConfigError, override_config
    saved = ConfigDict(json.loads(json.dumps(load_config("configs/clipseg.py:tiny").to_dict())))  # W/config.json
    got = override_config(saved, ["--config.threshold=0.25", "data.prompt=5", "data.eval_prompts=(1, 2)"],
                          "W/config.json")
    assert (got.threshold, got.data.prompt, got.data.eval_prompts) == (0.25, 5, (1, 2))
    assert isinstance(got.data.prompt, int) and saved.threshold == 0.5  # the input is left as it was
    with pytest.raises(ConfigError, match=r"W/config.json: unknown config field 'treshold' \(did you mean threshold"):
        override_config(saved, ["treshold=1"], "W/config.json")
    with pytest.raises(ConfigError, match=r"W/config.json: --config.data.prompt='x': .* expects an integer"):
        override_config(saved, ["data.prompt=x"], "W/config.json")
