"""Deprecated: split into :mod:`heatmapbench.evaluation.writer`, ``.figures``, ``.markdown``, ``.correlation`` and ``.style`` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved(__name__, "heatmapbench.evaluation.writer", "heatmapbench.evaluation.figures",
                             "heatmapbench.evaluation.markdown", "heatmapbench.evaluation.correlation",
                             "heatmapbench.evaluation.style", "heatmapbench.evaluation.reliability")
