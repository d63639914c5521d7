"""Deprecated: moved to :mod:`heatmapbench.app.schema` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.config.schema", "heatmapbench.app.schema")
