"""Deprecated: fusion moved to :mod:`heatmapbench.accel.fusion`, its fx helpers to :mod:`heatmapbench.fxgraph`."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved(__name__, "heatmapbench.accel.fusion", "heatmapbench.fxgraph",
                             "heatmapbench.explain.canonize.layers")
