"""Deprecated: moved to :mod:`heatmapbench.app.report.command` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.report.cli", "heatmapbench.app.report.command")
