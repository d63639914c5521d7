"""Deprecated: moved to :mod:`heatmapbench.app.tracking`, :mod:`heatmapbench.app.store` and :mod:`heatmapbench.app.provenance` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.tracking", "heatmapbench.app.tracking", "heatmapbench.app.store",
                             "heatmapbench.app.provenance")
