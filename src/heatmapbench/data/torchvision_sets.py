"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision's dataset classes, held in memory.

Offline, Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package: its IDX
``.gz`` files are unpacked into torchvision's ``raw/`` folder when that folder lacks them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset

from heatmapbench.data.base import DataNotFoundError, ImageDataModule

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class _TorchvisionDataModule(ImageDataModule):
    dataset_cls: type = torchvision.datasets.MNIST
    #: Folders holding ``<file>.gz`` IDX files to use when torchvision's raw files are missing.
    offline_sources: tuple[Path, ...] = ()
    how_to_get: str = ""

    def __init__(self, data_dir: str, download: bool = False, **kwargs) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        self.download = download

    @property
    def raw_folder(self) -> Path:
        return self.data_dir / self.dataset_cls.__name__ / "raw"

    def _have_raw(self) -> bool:
        return all((self.raw_folder / f).is_file() for f in _MNIST_FILES)

    def _unpack_offline(self) -> bool:
        for source in self.offline_sources:
            if all((source / f"{f}.gz").is_file() for f in _MNIST_FILES):
                self.raw_folder.mkdir(parents=True, exist_ok=True)
                for f in _MNIST_FILES:
                    # a private temporary name, then an atomic rename: parallel sweep jobs may
                    # unpack the same files at once, and none may see a half-written file
                    fd, tmp = tempfile.mkstemp(dir=self.raw_folder, prefix=f"{f}.", suffix=".partial")
                    with gzip.open(source / f"{f}.gz", "rb") as src, os.fdopen(fd, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, self.raw_folder / f)
                return True
        return False

    def prepare_data(self) -> None:
        if self._have_raw() or self._unpack_offline():
            return
        if self.download:
            for train in (True, False):
                self.dataset_cls(str(self.data_dir), train=train, download=True)
            return
        tried = [str(self.raw_folder)] + [str(s) for s in self.offline_sources]
        raise DataNotFoundError(
            f"{self.name}: dataset files not found. Paths tried: {', '.join(tried)}. "
            f"To provide it: run with data.download=true (needs internet){self.how_to_get}, "
            f"or place the four IDX files in {self.raw_folder}."
        )

    def load_split(self, train: bool) -> Dataset:
        self.prepare_data()
        ds = self.dataset_cls(str(self.data_dir), train=train, download=False)
        px = ds.data.to(torch.float32).div_(255.0).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
        return TensorDataset(self.normalize(px), ds.targets.clone().long())


class FashionMNISTDataModule(_TorchvisionDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 28×28 grey, 10 classes, 60k train / 10k test."""

    name = "fashion_mnist"
    dataset_cls = torchvision.datasets.FashionMNIST
    offline_sources = (DEBIAN_FASHION_MNIST,)
    how_to_get = ", or install Debian's package: apt-get install dataset-fashion-mnist"
    mean = (0.2860,)
    std = (0.3530,)
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST: 28×28 grey digits, 10 classes, 60k train / 10k test."""

    name = "mnist"
    dataset_cls = torchvision.datasets.MNIST
    mean = (0.1307,)
    std = (0.3081,)
    classes = tuple(str(i) for i in range(10))


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 32×32 RGB, 10 classes, 50k train / 10k test."""

    name = "cifar10"
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    classes = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")

    def __init__(self, data_dir: str, download: bool = False, **kwargs) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        self.download = download

    def prepare_data(self) -> None:
        folder = self.data_dir / "cifar-10-batches-py"
        if folder.is_dir():
            return
        if self.download:
            for train in (True, False):
                torchvision.datasets.CIFAR10(str(self.data_dir), train=train, download=True)
            return
        raise DataNotFoundError(
            f"cifar10: dataset files not found. Path tried: {folder}. To provide it: run with "
            f"data.download=true (needs internet), or unpack cifar-10-python.tar.gz into {self.data_dir}."
        )

    def load_split(self, train: bool) -> Dataset:
        self.prepare_data()
        ds = torchvision.datasets.CIFAR10(str(self.data_dir), train=train, download=False)
        px = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, 32, 32)
        return TensorDataset(self.normalize(px), torch.as_tensor(ds.targets).long())
