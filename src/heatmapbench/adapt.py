"""Deprecated: moved to :mod:`heatmapbench.app.adapt_model` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.adapt", "heatmapbench.app.adapt_model")
