"""Run configuration: typed schema, YAML loading, ``key=value`` overrides and validation."""

from dist_unlearn.config.loader import (
    ConfigError,
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
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]
