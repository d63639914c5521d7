"""Classifiers: the project's small nets and the Lightning wrapper for any classifier."""

from heatmapbench.models.classifier import ClassifierModule
from heatmapbench.models.nets import SmallCNN, VGGSmall

__all__ = ["ClassifierModule", "SmallCNN", "VGGSmall"]
