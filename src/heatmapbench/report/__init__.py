"""Deprecated: moved to :mod:`heatmapbench.app.report` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.report", "heatmapbench.app.report")
