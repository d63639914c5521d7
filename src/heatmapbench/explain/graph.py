"""Deprecated: LRP's fx canonization moved to :mod:`heatmapbench.explain.canonize`."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved(__name__, "heatmapbench.explain.canonize", "heatmapbench.explain.canonize.rewriter",
                             "heatmapbench.explain.canonize.ops", "heatmapbench.explain.canonize.layers",
                             "heatmapbench.explain.canonize.tracing")
