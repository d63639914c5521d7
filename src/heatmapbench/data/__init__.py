"""LightningDataModules; each exposes ``mean``, ``std``, ``value_range`` and ``eval_subset()``."""

from heatmapbench.data.base import DataArgumentError, DataError, DataNotFoundError, ImageDataModule
from heatmapbench.data.imagefolder import ImageFolderDataModule
from heatmapbench.data.samples import ImageNetSamplesDataModule
from heatmapbench.data.torchvision_sets import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)

__all__ = ["CIFAR10DataModule", "DataArgumentError", "DataError", "DataNotFoundError", "FashionMNISTDataModule",
           "ImageDataModule", "ImageFolderDataModule", "ImageNetSamplesDataModule", "MNISTDataModule"]
