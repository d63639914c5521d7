"""Deprecated: inference-graph fusion moved to :mod:`heatmapbench.accel.fusion`."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved(__name__, "heatmapbench.accel.fusion")
