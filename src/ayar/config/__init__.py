"""Typed configs: dataclasses per stage, loaded from YAML with dotted overrides, validated strictly."""

from ayar.config.loader import apply_overrides, config_to_dict, load_config
from ayar.config.schema import (
    DataConfig,
    DistributedConfig,
    EvalConfig,
    GenerationConfig,
    HpoConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RlaifConfig,
    TrainConfig,
    TrainingConfig,
)

__all__ = [
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "GenerationConfig",
    "HpoConfig",
    "JudgeConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "RlaifConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
]
