"""Run configuration: typed schema, YAML loading, ``key=value`` overrides and validation."""

from dist_unlearn.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from dist_unlearn.config.schema import (
    CheckpointConfig,
    ContrastiveConfig,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    JobConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    PrepareConfig,
    RayConfig,
    RunConfig,
    TrainConfig,
)
from dist_unlearn.config.validate import ConfigError, Registries, validate_config

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "ContrastiveConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "JobConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "PrepareConfig",
    "RayConfig",
    "Registries",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "validate_config",
]
