"""Deprecated: moved to :mod:`heatmapbench.metrics.names` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.metric_names", "heatmapbench.metrics.names")
