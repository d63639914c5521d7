"""Classifiers: the project's small nets and the Lightning wrapper for any classifier."""

from heatmapbench.models.classifier import ClassifierModule
from heatmapbench.models.nets import SmallCNN, SmallViT, VGGSmall
from heatmapbench.models.zoo import Preprocessing, WeightsNotFoundError, preprocessing_of

__all__ = ["ClassifierModule", "Preprocessing", "SmallCNN", "SmallViT", "VGGSmall", "WeightsNotFoundError",
           "preprocessing_of"]
