"""Lightning callbacks."""

from heatmapbench.callbacks.aopc import AOPCCallback

__all__ = ["AOPCCallback"]
