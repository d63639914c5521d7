"""Deprecated: moved to :mod:`heatmapbench.app.tracking` and :mod:`heatmapbench.app.store` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.tracking", "heatmapbench.app.tracking", "heatmapbench.app.store")
