from pathlib import Path

import pytest
import yaml

from medseg.config import Config, apply_override, config_hash, deep_merge, load_config, preset_names, save_config
from medseg.errors import ConfigError, InputError


def test_base_yaml_alone_is_a_complete_config():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.model.name == "unet" and cfg.tracking.uri is None


def test_presets_are_listed_and_merge_over_base():
    assert {"demo", "smoke"} <= set(preset_names())
    smoke = load_config("smoke")
    base = load_config(None)
    assert smoke.model.channels == (4, 8)  # from smoke.yaml
    assert smoke.loss == base.loss  # untouched sections come from base.yaml


def test_unknown_key_names_key_valid_keys_and_suggestion(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.code == "CONFIG_UNKNOWN_KEY"
    assert "train.epoch" in err.message and "epochs" in err.message
    assert err.hint == "did you mean 'train.epochs'?"


def test_unknown_top_level_section(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("trian: {epochs: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.code == "CONFIG_UNKNOWN_KEY" and "'train'" in info.value.hint


def test_malformed_yaml_reports_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\nmodel: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.code == "CONFIG_YAML_INVALID"
    assert "line" in info.value.message


def test_non_mapping_yaml_rejected(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_invalid_value_names_key_and_found_value():
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["train.epochs=0"])
    assert info.value.code == "CONFIG_INVALID_VALUE"
    assert "train.epochs" in info.value.message and "0" in info.value.message


def test_missing_config_lists_presets():
    with pytest.raises(InputError) as info:
        load_config("no_such_preset")
    assert info.value.code == "PATH_NOT_FOUND" and "smoke" in info.value.hint


def test_overrides_parse_yaml_values():
    cfg = load_config("smoke", ["train.epochs=7", "data.patch_size=[32, 32, 16]", "tracking.uri=null"])
    assert cfg.train.epochs == 7 and cfg.data.patch_size == (32, 32, 16) and cfg.tracking.uri is None


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "a..b=1"])
def test_bad_override_syntax(bad: str):
    with pytest.raises(ConfigError) as info:
        apply_override({}, bad)
    assert info.value.code == "CONFIG_BAD_OVERRIDE"


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config("smoke", ["model.chanels=[1,2]"])
    assert info.value.code == "CONFIG_UNKNOWN_KEY" and info.value.hint == "did you mean 'model.channels'?"


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 5}})
    assert out == {"a": {"b": 5, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def test_saved_config_round_trips(tmp_path: Path):
    cfg = load_config("demo", ["seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 3
