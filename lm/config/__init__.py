"""Typed run configuration: the schema (`schema`), the rules its values obey together
(`checks`), and reading it from YAML files and `key.sub=value` overrides (`loading`)."""

from lm.config.checks import (
    check_finetuning,
    check_pretraining,
    check_training_mesh,
    mesh_shape,
    mixture_components,
    validate,
)
from lm.config.loading import build_config, from_dict, load_config, to_dict
from lm.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "build_config",
    "check_finetuning",
    "check_pretraining",
    "check_training_mesh",
    "from_dict",
    "load_config",
    "mesh_shape",
    "mixture_components",
    "to_dict",
    "validate",
]
