"""Experiment configs: the typed schema, checks that import no model code, YAML and dotted
overrides. `load_config` is the way in; the rest is reachable by its module."""

from kdscale.config.loading import (
    config_from_dict,
    load_config,
    parse_overrides,
    read_yaml,
    set_dotted,
    to_dict,
)
from kdscale.config.schema import (
    AugmentConfig,
    CacheConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = ["AugmentConfig", "CacheConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "LossConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "config_from_dict",
           "load_config", "parse_overrides", "read_yaml", "set_dotted", "to_dict"]
