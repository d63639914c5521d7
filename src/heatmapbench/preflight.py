"""Deprecated: moved to :mod:`heatmapbench.app.preflight` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.preflight", "heatmapbench.app.preflight")
