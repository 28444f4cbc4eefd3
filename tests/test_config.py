"""Config: YAML + overrides, typed coercion, unknown keys named with the closest valid one."""

import pytest
import yaml

from vlp.config import Config, ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 7}, "data": {"batch_size": 4}}))
    config = load_config(path, ["train.steps=9", "optim.lr=1e-3", "model.lock_text=true"])
    assert config.train.steps == 9
    assert config.data.batch_size == 4
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.model.lock_text is True


def test_list_and_none_values():
    config = load_config(None, ['eval.classnames=["a b", "c"]', "model.pretrained=none"])
    assert config.eval.classnames == ["a b", "c"]
    assert config.model.pretrained is None


def test_unknown_key_names_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*'steps'"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.steps=3"])


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["train.steps=11", "objective.clip.smoothing=0.1"])
    config.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert isinstance(again, Config)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 3\n data: [\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"config file '{path}' is not valid YAML" in message and "line 3" in message
    assert "\n" not in message and "<unicode string>" not in message
    with pytest.raises(ConfigError, match=r"override 'eval.classnames=\[a' is not valid YAML"):
        load_config(None, ["eval.classnames=[a"])


def test_type_errors_use_the_right_article():
    with pytest.raises(ConfigError, match="'train.steps' needs an int, got 'abc'"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="'optim.lr' needs a float"):
        load_config(None, ["optim.lr=fast"])


def test_objective_sections_are_typed_and_resolved_into_config_yaml(tmp_path):
    config = load_config(None, ["objective.name=siglip", "objective.clip.smoothing=0.1"])
    assert config.objective.section() == config.objective.settings["siglip"]
    config.save(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["objective"]
    assert saved == {
        "name": "siglip",
        "clip": {"weights": [0.5, 0.5], "smoothing": 0.1},
        "siglip": {},
    }
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "objective.clip.smoothin=0.1",
            "unknown config key 'objective.clip.smoothin'; did you mean 'smoothing'",
        ),
        (
            "objective.clipp.smoothing=0.1",
            "objective.clipp.*unknown objective 'clipp'; did you mean 'clip'",
        ),
        ("objective.name=sigclip", "objective.name.*did you mean 'siglip'"),
        ("objective.clip.smoothing=high", "'objective.clip.smoothing' needs a float"),
        ("objective.clip=3", "'objective.clip' is a section"),
    ],
)
def test_bad_objective_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
