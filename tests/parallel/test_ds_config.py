import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from lmscale.config import load_config
from lmscale.errors import ConfigError
from lmscale.parallel.ds_config import deepspeed_config, resolve

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def deepspeed_accepts(ds: dict) -> DeepSpeedConfig:
    """DeepSpeed's own parser; with no process group it assumes one rank, so check a 1-rank copy."""
    one_rank = {
        **ds,
        "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"],
    }
    return DeepSpeedConfig(one_rank)


def resolved(overrides, world_size=2, has_gpu=False):
    config, explicit = load_config(None, overrides)
    return resolve(config, explicit, world_size, has_gpu)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_generated_config_matches_keys(stage, precision):
    _, ds = resolved(
        [
            f"zero.stage={stage}",
            f"precision={precision}",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=3",
        ]
    )
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is False
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_accumulation_steps"] == 3
    deepspeed_accepts(ds)


def test_fp16_gets_dynamic_loss_scaling_on_gpu():
    _, ds = resolved(["precision=fp16"], has_gpu=True)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert ds["bf16"]["enabled"] is False
    parsed = deepspeed_accepts(ds)
    fp16 = parsed.float16_config
    assert fp16.enabled and fp16.loss_scale == 0  # 0 = dynamic loss scaling
    assert fp16.initial_scale_power == 16 and fp16.loss_scale_window == 1000


def test_fp16_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="precision=fp16 needs a GPU.*use precision=bf16"):
        resolved(["precision=fp16"], has_gpu=False)


def test_cpu_offload_sections():
    _, ds = resolved(["zero.stage=3", "zero.offload=cpu"])
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    _, ds = resolved(["zero.stage=2", "zero.offload=cpu"])
    assert "offload_param" not in ds["zero_optimization"]


def test_global_batch_size_must_equal_the_product():
    resolved(["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=16"])
    with pytest.raises(
        ConfigError, match=r"global_batch_size=10 but micro_batch_size 4 x grad_accum_steps 2 x 2 rank"
    ):
        resolved(["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=10"])


def test_global_batch_size_sets_the_accumulation_for_the_ranks_there_are():
    """An elastic job that goes on with fewer ranks keeps its batch: the accumulation makes up the rest."""
    for world_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        config, ds = resolved(
            ["train.micro_batch_size=4", "train.global_batch_size=16"], world_size=world_size
        )
        assert config.train.grad_accum_steps == accumulation
        assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == accumulation


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_json_is_valid_deepspeed_and_adopted(path):
    raw = json.loads(path.read_text())
    DeepSpeedConfig(raw)  # usable as it is by any DeepSpeed script
    has_gpu = "fp16" in path.name  # fp16 is GPU-only; generation is still checked here
    config, ds = resolved([f"deepspeed_config={path}"], world_size=1, has_gpu=has_gpu)
    assert config.zero.stage == raw["zero_optimization"]["stage"]
    assert config.precision == ("fp16" if "fp16" in raw else "bf16")
    assert config.zero.offload == ("cpu" if "offload" in path.name else "none")
    assert ds["zero_optimization"] == raw["zero_optimization"]
    deepspeed_accepts(ds)


def test_json_disagreeing_with_a_set_key_names_both():
    with pytest.raises(ConfigError) as err:
        resolved(["deepspeed_config=ds_configs/zero2_bf16.json", "zero.stage=3", "train.micro_batch_size=4"])
    message = str(err.value)
    assert "zero.stage=3 but ds_configs/zero2_bf16.json says 2" in message
    assert "train.micro_batch_size=4" in message


def test_auto_values_are_filled_from_lmscale(tmp_path):
    path = tmp_path / "hf_style.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "gradient_clipping": "auto",
                "bf16": {"enabled": "auto"},
                "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
            }
        )
    )
    config, ds = resolved(
        [f"deepspeed_config={path}", "train.micro_batch_size=2", "train.grad_accum_steps=4"]
    )
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 16
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    deepspeed_accepts(ds)


def test_json_with_optimizer_section_is_refused(tmp_path):
    path = tmp_path / "opt.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}, "train_micro_batch_size_per_gpu": 1}))
    with pytest.raises(ConfigError, match="sets optimizer: remove it"):
        resolved([f"deepspeed_config={path}"])


def test_bad_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}')
    with pytest.raises(ConfigError, match="line 4 is not valid JSON"):
        resolved([f"deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolved(["deepspeed_config=ds_configs/nope.json"])


def test_generation_is_pure():
    config, _ = load_config(None, ["zero.stage=2"])
    assert deepspeed_config(config, 4) == deepspeed_config(config, 4)
