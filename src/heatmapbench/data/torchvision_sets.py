"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision's dataset classes, held in memory.

Offline, Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package: its IDX
``.gz`` files are unpacked into torchvision's ``raw/`` folder when that folder lacks them.

By default the images keep their size, channels and the dataset's own normalisation. For a
pretrained network they take its preprocessing instead (``image_size``, ``resize``,
``channels``, ``mean``, ``std``, ``value_range``, e.g. ``Preprocessing.data_kwargs()`` of a zoo
model): grey images are repeated to 3 channels and resized image by image when read, so a
60 000-image set at 96² is never held in memory at once.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from heatmapbench.data.base import DataNotFoundError, ImageDataModule, check_normalisation

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class _ResizedImages(Dataset):
    """8-bit images ``(N, C, H, W)`` mapped into model space when read, one at a time.

    Per image: pixels to [0, 1], resize the shorter side to ``resize`` (bilinear, antialiased),
    centre-crop ``image_size``, repeat a single channel to ``channels``, scale to
    ``value_range``, then ``(px - mean) / std``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, resize: int,
                 channels: int, mean: Sequence[float], std: Sequence[float],
                 value_range: tuple[float, float]) -> None:
        self.images, self.labels = images, labels
        self.image_size, self.resize, self.channels = image_size, resize, channels
        self.lo, self.scale = value_range[0], value_range[1] - value_range[0]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        px = self.images[i].to(torch.float32).div_(255.0)  # (C, H, W) in [0, 1]
        if px.shape[-2:] != (self.image_size, self.image_size) or self.resize != self.image_size:
            px = TF.resize(px, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
            px = TF.center_crop(px, [self.image_size, self.image_size])
        px = px.expand(self.channels, -1, -1) * self.scale + self.lo  # (channels, S, S)
        return (px - self.mean) / self.std, self.labels[i]


class _InMemoryDataModule(ImageDataModule):
    """A data module over 8-bit images held in memory, with optional model preprocessing.

    Parameters
    ----------
    image_size, resize
        Resize the shorter side to ``resize`` and centre-crop ``image_size`` (``resize`` defaults
        to ``image_size``); ``None``: the native size.
    channels
        Input channels; a grey set repeats its channel (``3`` for ImageNet networks).
    mean, std, value_range
        Model input ``(px - mean) / std`` with ``px`` in ``value_range``; ``None``: the set's own
        statistics on [0, 1].
    """

    def __init__(self, data_dir: str, image_size: int | None = None, resize: int | None = None,
                 channels: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, value_range: Sequence[float] | None = None,
                 **kwargs) -> None:
        super().__init__(data_dir=data_dir, **kwargs)
        native_channels = self.in_channels
        if channels is not None and channels not in (native_channels, 3):
            raise ValueError(f"channels={channels} is invalid: the {self.name} images have "
                             f"{native_channels} channel(s); use {native_channels} or 3 (repeated grey)")
        self.in_channels = channels or native_channels
        if resize is not None and image_size is None:
            raise ValueError(f"resize={resize} is invalid without image_size (the crop of {self.name} images)")
        if image_size is not None and (resize or image_size) < image_size:
            raise ValueError(f"resize={resize} is invalid: must be >= image_size={image_size} ({self.name})")
        self.resize = resize or image_size
        self.image_size = image_size or self.image_size
        self._native_size = image_size is None
        check_normalisation(mean, std, value_range)
        if mean is not None or std is not None:
            if mean is None or std is None or len(mean) != self.in_channels or len(std) != self.in_channels:
                raise ValueError(f"mean={mean} is invalid: mean and std need {self.in_channels} values each "
                                 f"(one per channel of the {self.name} images), got std={std}")
            self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        elif self.in_channels != native_channels:
            self.mean, self.std = self.mean * self.in_channels, self.std * self.in_channels
        if value_range is not None:
            self.value_range = (float(value_range[0]), float(value_range[1]))

    def images_dataset(self, images: torch.Tensor, labels: torch.Tensor) -> Dataset:
        """8-bit ``images (N, C, H, W)`` and labels as a dataset of model-space inputs."""
        labels = labels.clone().long()
        if self._native_size and images.shape[1] == self.in_channels and self.value_range == (0.0, 1.0):
            px = images.to(torch.float32).div_(255.0)  # (N, C, H, W) in [0, 1], held whole
            return TensorDataset(self.normalize(px), labels)
        return _ResizedImages(images, labels, self.image_size, self.resize or self.image_size,
                              self.in_channels, self.mean, self.std, self.value_range)


class _TorchvisionDataModule(_InMemoryDataModule):
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
            "{name}: dataset files not found. Paths tried: {tried}. To provide it: pass {download} (needs "
            "internet){how_to_get}, or place the four IDX files in {raw}.", {"download": True},
            name=self.name, tried=", ".join(tried), how_to_get=self.how_to_get, raw=self.raw_folder)

    def load_split(self, train: bool) -> Dataset:
        self.prepare_data()
        ds = self.dataset_cls(str(self.data_dir), train=train, download=False)
        return self.images_dataset(ds.data.unsqueeze(1), ds.targets)  # (N, 1, 28, 28) uint8


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


class CIFAR10DataModule(_InMemoryDataModule):
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
            "cifar10: dataset files not found. Path tried: {folder}. To provide it: pass {download} (needs "
            "internet), or unpack cifar-10-python.tar.gz into {data_dir}.", {"download": True},
            folder=folder, data_dir=self.data_dir)

    def load_split(self, train: bool) -> Dataset:
        self.prepare_data()
        ds = torchvision.datasets.CIFAR10(str(self.data_dir), train=train, download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
        return self.images_dataset(images, torch.as_tensor(ds.targets))
