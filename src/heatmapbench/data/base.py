"""Common base of the data modules: normalisation, pixel range, splits, the seeded eval subset."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from heatmapbench.errors import ArgumentError


#: ImageNet statistics of torchvision's pretrained models (pixels in [0, 1]).
#: The ImageNet channel statistics (torchvision's), the one copy: data modules and the model zoo read it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_loader_args(batch_size: int, num_workers: int, val_size: int, eval_subset_size: int,
                      train_size: int | None) -> None:
    """The ranges of the arguments every data module takes; ``ValueError`` naming the first one out of range.

    The data modules check their arguments with it, and the commands' schemas with the same
    function, before any data is read.
    """
    for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                            ("val_size", val_size, 0), ("eval_subset_size", eval_subset_size, 0)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{key}={value!r} is invalid: must be an integer >= {low}")
    if train_size is not None and (not _is_int(train_size) or train_size < 1):
        raise ValueError(f"train_size={train_size!r} is invalid: must be an integer >= 1 or null (all training images)")


def check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None,
                        value_range: Sequence[float] | None) -> None:
    """``mean`` and ``std`` of the same length (one value per channel), ``std`` > 0, ``value_range``
    ``[low, high]`` with low < high; None: not given. ``ValueError`` naming the argument otherwise."""
    if mean is not None and std is not None and len(mean) != len(std):
        raise ValueError(f"mean={list(mean)} is invalid: it needs one value per channel, like std={list(std)}")
    if std is not None and any(not v > 0 for v in std):
        raise ValueError(f"std={list(std)} is invalid: every value must be > 0")
    if value_range is not None and (len(value_range) != 2 or not value_range[0] < value_range[1]):
        raise ValueError(f"value_range={list(value_range)} is invalid: it must be [low, high] with low < high")


class DataError(ArgumentError):
    """An error of a data module whose fix is one of its arguments, which the message names
    (:class:`~heatmapbench.errors.ArgumentError`: ``pass download=True``); a command that builds the
    module from its ``data`` config raises ``in_group("data")``, which names the ``data`` keys."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset is not on disk, cannot be downloaded or cannot be read; the message says how to provide it."""


class DataArgumentError(DataError, ValueError):
    """The data module's arguments cannot give what is asked of it (training without ``train_path``)."""


class ImageDataModule(pl.LightningDataModule):
    """Base of every image data module.

    Model inputs are ``(px - mean) / std`` per channel, with ``px`` in pixel space
    ``value_range``. Perturbations draw values in pixel space and map them into model space
    with exactly these numbers (``heatmapbench.perturbation``).

    Parameters
    ----------
    data_dir
        Root folder of the dataset files.
    batch_size, num_workers
        DataLoader settings.
    val_size
        Images held out of the training set for validation (seeded split, disjoint from the
        images trained on).
    train_size
        Keep only this many of the remaining training images (seeded); ``None``: all of them.
    eval_subset_size
        Size of the fixed, seeded evaluation subset of the test set (``eval_subset()``),
        used by the AOPC callback and ``evaluate``.
    seed
        Seed of the validation split and of the evaluation subset.
    """

    #: Subclasses set these.
    name: str = "dataset"
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    value_range: tuple[float, float] = (0.0, 1.0)
    classes: Sequence[str] = ()

    def __init__(self, data_dir: str, batch_size: int = 128, num_workers: int = 0,
                 val_size: int = 5000, eval_subset_size: int = 256, seed: int = 0,
                 pin_memory: bool = False, train_size: int | None = None) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, val_size, eval_subset_size, train_size)
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.train_size = train_size
        self.eval_subset_size = eval_subset_size
        self.seed = seed
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- subclasses implement -------------------------------------------------------------
    def load_split(self, train: bool) -> Dataset:
        """Return the train or test split as a dataset of ``(x_model_space, label)``."""
        raise NotImplementedError

    # -- normalisation --------------------------------------------------------------------
    def normalize(self, px: torch.Tensor) -> torch.Tensor:
        """Map pixel space ``(B, C, H, W)`` into model space."""
        mean = torch.tensor(self.mean, dtype=px.dtype, device=px.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=px.dtype, device=px.device).view(1, -1, 1, 1)
        return (px - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map model space ``(B, C, H, W)`` back into pixel space."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    @property
    def normalization(self) -> dict:
        """``mean``, ``std`` and ``value_range``: the keyword arguments of the perturbation engine."""
        return {"mean": tuple(self.mean), "std": tuple(self.std), "value_range": tuple(self.value_range)}

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate"):
            self.train_set, self.val_set = self.split_train_val(self.load_split(train=True), self.val_size)
        if self.test_set is None and stage in (None, "test", "predict", "fit", "validate"):
            self.test_set = self.load_split(train=False)

    def split_train_val(self, full: Dataset, val_size: int) -> tuple[Subset, Subset]:
        """Seeded, disjoint ``(train, val)`` subsets of ``full``: ``val_size`` images for validation,
        the rest (at most ``train_size``) for training."""
        n = len(full)
        if val_size >= n:
            raise DataArgumentError("{val_size} is invalid: must be below the {n} training images",
                                    {"val_size": val_size}, n=n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        train = perm[val_size:] if self.train_size is None else perm[val_size:val_size + self.train_size]
        return Subset(full, train), Subset(full, perm[:val_size])

    def has_validation(self) -> bool:
        """Whether there are labelled held-out images (``setup("fit")`` must have run)."""
        return self.val_set is not None and len(self.val_set) > 0

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    # -- evaluation subset ----------------------------------------------------------------
    def eval_subset(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed, seeded evaluation subset of the test split: ``(x (N, C, H, W), y (N,))``.

        The same ``seed`` and ``size`` give the same images on every call and every run.
        """
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        size = self.eval_subset_size if size is None else size
        n = len(self.test_set)
        size = min(size, n)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1))[:size]
        if isinstance(self.test_set, TensorDataset):
            x, y = self.test_set.tensors
            return x[idx].clone(), y[idx].clone()
        items = [self.test_set[int(i)] for i in idx]
        return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])
