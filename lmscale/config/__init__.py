"""The typed config tree: YAML recipe + dotted `key=value` overrides, validated once at start-up.

Every key has a default (the defaults are the embedded CPU recipe, `configs/tiny-cpu.yaml`) and a
one-line description; an unknown key, a wrong type or an out-of-range value is a `ConfigError` that
names every offending key at once.
"""

from lmscale.config.data import DataConfig, SourceConfig, whole_record_problems
from lmscale.config.finetune import (
    DpoConfig,
    FinetuneConfig,
    GrpoConfig,
    KtoConfig,
    LoraConfig,
    OrpoConfig,
    RewardConfig,
    SimpoConfig,
    UnfreezeConfig,
)
from lmscale.config.loading import (
    MOVED_KEYS,
    apply_overrides,
    build_config,
    config_to_yaml,
    dotted_keys,
    flatten,
    load_config,
    parse_override,
    read_yaml,
    saved_config,
)
from lmscale.config.model import ModelConfig
from lmscale.config.parallel import ParallelConfig
from lmscale.config.reporting import EvalConfig, LoggingConfig, MetricsConfig, WandbConfig
from lmscale.config.run import Config
from lmscale.config.section import Section
from lmscale.config.training import (
    CheckpointConfig,
    EarlyStoppingConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    ZeroConfig,
)

__all__ = [
    "MOVED_KEYS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DpoConfig",
    "GrpoConfig",
    "KtoConfig",
    "OrpoConfig",
    "RewardConfig",
    "SimpoConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LoggingConfig",
    "LoraConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "Section",
    "SourceConfig",
    "TrainConfig",
    "UnfreezeConfig",
    "WandbConfig",
    "ZeroConfig",
    "apply_overrides",
    "build_config",
    "config_to_yaml",
    "dotted_keys",
    "flatten",
    "load_config",
    "parse_override",
    "read_yaml",
    "saved_config",
    "whole_record_problems",
]
