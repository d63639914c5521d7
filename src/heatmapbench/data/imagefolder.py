"""Images in class folders (ILSVRC2012 val, SUN397, Places365): ``root/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset
from torchvision import datasets

from heatmapbench.data.base import IMAGENET_MEAN, IMAGENET_STD, DataNotFoundError, ImageDataModule
from heatmapbench.data.samples import eval_transform



class ImageFolderDataModule(ImageDataModule):
    """An ImageFolder tree for evaluation; every split is the same folder unless ``train_path`` is set.

    Images are resized (shorter side ``resize``), centre-cropped to ``image_size``, scaled to
    ``value_range`` and normalised with ``mean``/``std`` (ImageNet's on [0, 1] by default).
    """

    name = "imagefolder"
    in_channels = 3

    def __init__(self, path: str, train_path: str | None = None, image_size: int = 224,
                 resize: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, value_range: Sequence[float] = (0.0, 1.0),
                 data_dir: str = "", val_size: int = 0, **kwargs) -> None:
        super().__init__(data_dir=data_dir or path, val_size=val_size, **kwargs)
        self.path = Path(path)
        self.train_path = Path(train_path) if train_path else None
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.transform = eval_transform(image_size, resize, self.mean, self.std, self.value_range)
        self._check(self.path)
        if self.train_path is not None:
            self._check(self.train_path)

    @staticmethod
    def _check(path: Path) -> None:
        if not path.is_dir():
            raise DataNotFoundError(
                f"imagefolder: no folder at {path}. Set data.path to a folder laid out as "
                "<path>/<class_name>/<image>.jpg (e.g. ILSVRC2012 val sorted into class folders).")

    def load_split(self, train: bool) -> Dataset:
        root = self.train_path if (train and self.train_path is not None) else self.path
        ds = datasets.ImageFolder(str(root), transform=self.transform)
        self.num_classes = len(ds.classes)
        self.classes = tuple(ds.classes)
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate") and self.train_path is None:
            raise ValueError("imagefolder: training needs data.train_path (a second class-folder tree)")
        super().setup(stage)

