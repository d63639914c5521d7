"""Deprecated: layout and precision moved to :mod:`heatmapbench.accel.layout` and :mod:`heatmapbench.accel.precision`."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved(__name__, "heatmapbench.accel.layout", "heatmapbench.accel.precision")
