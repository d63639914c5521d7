"""Typed config schemas (registered in Hydra's ConfigStore) and validation before any work."""

from heatmapbench.config.schema import ConfigError, EvaluationSettings, register_configs, validate

register_configs()

__all__ = ["ConfigError", "EvaluationSettings", "register_configs", "validate"]
