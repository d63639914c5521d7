"""The 20 labelled ImageNet images shipped in the ``foolbox`` wheel, for offline evaluation.

The files are ``foolbox/data/imagenet_<index>_<label>.jpg`` (``label`` an ImageNet class
index 0–999). They are read from the installed package's folder; foolbox is never imported.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from heatmapbench.data.base import IMAGENET_MEAN, IMAGENET_STD, DataNotFoundError, ImageDataModule, check_normalisation

#: The 1000 ImageNet class names, in index order (torchvision's metadata, no download).
IMAGENET_CLASSES: tuple[str, ...] = tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])

_SAMPLE_NAME = re.compile(r"^imagenet_(\d+)_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_HOW_TO_GET = "pip install foolbox==3.3.4 (or pip install -e '.[zoo]')"


class _ToRange:
    """8-bit image tensor → float pixels in ``[lo, hi]`` (a class, not a lambda: picklable)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.scale = lo, (hi - lo) / 255.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.float().mul_(self.scale).add_(self.lo)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lo={self.lo}, scale={self.scale})"


def eval_transform(image_size: int = 224, resize: int = 256,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   value_range: Sequence[float] = (0.0, 1.0)) -> transforms.Compose:
    """PIL image → model-space tensor ``(3, image_size, image_size)``.

    Resize (shorter side ``resize``, bilinear), centre-crop ``image_size``, scale the 8-bit
    pixels into ``value_range`` (``px = lo + (hi - lo) * byte / 255``), then ``(px - mean) / std``.
    """
    lo, hi = (float(v) for v in value_range)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),                                  # (3, H, W) uint8
        _ToRange(lo, hi),                                          # (3, H, W) float in [lo, hi]
        transforms.Normalize(tuple(mean), tuple(std)),
    ])


def foolbox_data_dir() -> Path:
    """The ``data/`` folder of the installed foolbox package (found without importing foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "data"
        if folder.is_dir():
            return folder
    raise DataNotFoundError(
        "imagenet_samples: the sample images come from the foolbox wheel's data/ folder, but "
        "foolbox is not installed. {how}, or pass {data_dir}, a folder of imagenet_<index>_<label>.jpg files.",
        {"data_dir": None}, how=_HOW_TO_GET)


def sample_files(folder: Path) -> list[tuple[Path, int]]:
    """``(path, label)`` of the ``imagenet_<index>_<label>.<ext>`` files in ``folder``, by index."""
    found = []
    for path in folder.iterdir():
        match = _SAMPLE_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path, int(match.group(2))))
    return [(path, label) for _, path, label in sorted(found)]


class ImageNetSamplesDataModule(ImageDataModule):
    """The 20 ImageNet validation images bundled with foolbox, preprocessed for one model.

    Evaluation only: the test (and validation) split is the images in file order, and
    ``eval_subset(n)`` is the first ``n`` of them. Pass the model's preprocessing
    (``heatmapbench.models.zoo.Preprocessing.data_kwargs()``); ``mean``, ``std`` and
    ``value_range`` are then exactly what the images were normalised with.

    Parameters
    ----------
    data_dir
        Folder of ``imagenet_<index>_<label>.jpg`` files; default: foolbox's ``data/`` folder.
    image_size, resize
        Centre-crop size and shorter-side resize.
    mean, std, value_range
        Normalisation ``(px - mean) / std`` with ``px`` in ``value_range`` (pixel space).
    eval_subset_size
        Images returned by ``eval_subset()`` (at most the 20 there are).
    """

    name = "imagenet_samples"
    num_classes = 1000
    in_channels = 3
    classes = IMAGENET_CLASSES

    def __init__(self, data_dir: str | None = None, image_size: int = 224, resize: int = 256,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 value_range: Sequence[float] = (0.0, 1.0), batch_size: int = 20,
                 eval_subset_size: int = 20, channels: int = 3, **kwargs) -> None:
        if channels != 3:
            raise ValueError(f"channels={channels} is invalid: the imagenet_samples images are RGB; use 3")
        folder = Path(data_dir).expanduser() if data_dir else foolbox_data_dir()
        super().__init__(data_dir=str(folder), batch_size=batch_size, val_size=0,
                         eval_subset_size=eval_subset_size, **kwargs)
        check_normalisation(mean, std, value_range)
        if len(mean) != 3:
            raise ValueError(f"mean={list(mean)} is invalid: mean and std need 3 values each (one per channel of the "
                             f"imagenet_samples images, RGB), got std={list(std)}")
        if resize < image_size:
            raise ValueError(f"resize={resize} is invalid: must be >= image_size={image_size} (imagenet_samples)")
        self.image_size = int(image_size)
        self.resize = int(resize)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.transform = eval_transform(self.image_size, self.resize, self.mean, self.std, self.value_range)
        self._dataset: TensorDataset | None = None
        self.files = self._find(folder)

    @staticmethod
    def _find(folder: Path) -> list[tuple[Path, int]]:
        if not folder.is_dir():
            raise DataNotFoundError("imagenet_samples: no folder at {folder}. Leave {data_dir} unset to use "
                                    "foolbox's samples ({how}).", {"data_dir": None}, folder=folder, how=_HOW_TO_GET)
        files = sample_files(folder)
        if not files:
            raise DataNotFoundError("imagenet_samples: no imagenet_<index>_<label>.jpg files in {folder}. Leave "
                                    "{data_dir} unset to use foolbox's samples ({how}).", {"data_dir": None},
                                    folder=folder, how=_HOW_TO_GET)
        return files

    def load_split(self, train: bool) -> Dataset:
        """All sample images ``(N, 3, image_size, image_size)`` in model space, with their labels."""
        if self._dataset is None:
            x = torch.stack([self.transform(Image.open(p).convert("RGB")) for p, _ in self.files])
            y = torch.tensor([label for _, label in self.files], dtype=torch.long)
            self._dataset = TensorDataset(x, y)
        return self._dataset

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            raise ValueError("imagenet_samples holds 20 evaluation images; it cannot train a model")
        if self.test_set is None:
            self.test_set = self.val_set = self.load_split(train=False)

    def eval_subset(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``size`` images (default ``eval_subset_size``) in file order: ``(x, y)``."""
        if self.test_set is None:
            self.setup("test")
        x, y = self.load_split(train=False).tensors
        size = self.eval_subset_size if size is None else size
        return x[:size].clone(), y[:size].clone()
