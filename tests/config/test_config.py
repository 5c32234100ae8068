from pathlib import Path

import pytest
import yaml

from lmscale.config import Config, apply_overrides, build_config, config_to_yaml, load_config
from lmscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_tiny_cpu_recipe_equals_builtin_defaults():
    config, _ = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert config == Config()


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")))
def test_every_recipe_validates(recipe):
    load_config(recipe)


def test_overrides_parse_values_as_yaml():
    config, explicit = load_config(None, ["optim.lr=3e-4", "zero.stage=2", "data.path=/x", "model.path=null"])
    assert config.optim.lr == 3e-4
    assert config.zero.stage == 2
    assert config.data.path == "/x"
    assert config.model.path is None
    assert {"optim.lr", "zero.stage", "data.path"} <= explicit


def test_override_without_equals_names_the_fix():
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["optim.lr"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(None, ["train.learning_rate=1"])


def test_every_problem_is_reported_at_once_on_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zero.stage=5", "train.micro_batch_size=0", "precision=fp8", "typo=1"])
    message = str(err.value)
    assert "\n" not in message
    for key in ("zero.stage", "train.micro_batch_size", "precision", "typo"):
        assert key in message


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_steps='many'"):
        load_config(None, ["train.max_steps=many"])


def test_inconsistent_schedule_and_offload_are_errors():
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, ["schedule.warmup_steps=500", "train.max_steps=100"])
    with pytest.raises(ConfigError, match="zero.offload=cpu needs zero.stage 2 or 3"):
        load_config(None, ["zero.offload=cpu", "zero.stage=1"])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_yaml_round_trips():
    config, _ = load_config(None, ["optim.lr=1e-3", "zero.stage=3"])
    assert build_config(yaml.safe_load(config_to_yaml(config))) == config


def test_a_saved_config_from_before_the_sections_still_loads():
    from lmscale.config import saved_config

    old = {
        "train": {"lr": 1e-3, "scheduler": "wsd", "save_every": 7, "max_steps": 30},
        "model": {"preset": "tiny-gpt2"},
    }
    config = saved_config(old)
    assert (config.optim.lr, config.schedule.name, config.checkpoint.save_every) == (1e-3, "wsd", 7)
    assert config.train.max_steps == 30 and old["train"]["lr"] == 1e-3  # the caller's dict is untouched
