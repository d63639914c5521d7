"""Images in class folders (ILSVRC2012 val, SUN397, Places365): ``root/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

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
                 data_dir: str = "", val_size: int = 0, skip_unreadable: bool = False, **kwargs) -> None:
        super().__init__(data_dir=data_dir or path, val_size=val_size, **kwargs)
        self.skip_unreadable = skip_unreadable
        #: Files left out because PIL cannot read them (``skip_unreadable=true``), relative to their tree.
        self.skipped: list[str] = []
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
        try:
            ds = datasets.ImageFolder(str(root), transform=self.transform)
        except FileNotFoundError as err:  # no class folders, or no image files in them
            raise DataNotFoundError(f"imagefolder: no images under {root}; it must hold <class>/<image> files "
                                    f"(extensions {', '.join(IMG_EXTENSIONS)})") from err
        self._scan(ds, Path(root))
        self.num_classes = len(ds.classes)
        self.classes = tuple(ds.classes)
        return ds

    def _scan(self, ds: datasets.ImageFolder, root: Path) -> None:
        """Open every file's header (fast: no decoding); an unreadable one fails here, or is left out."""
        bad = []
        for file, _ in ds.samples:
            try:
                with Image.open(file):
                    pass
            except (OSError, ValueError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
                bad.append(file)
        if not bad:
            return
        names = [str(Path(f).relative_to(root)) for f in bad]
        if not self.skip_unreadable:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DataNotFoundError(f"imagefolder: cannot read the image {bad[0]}{more}; remove or fix it, or pass "
                                    "data.skip_unreadable=true to leave unreadable files out (they are listed in the run)")
        keep = [(f, t) for f, t in ds.samples if f not in set(bad)]
        if not keep:
            raise DataNotFoundError(f"imagefolder: none of the {len(bad)} files under {root} is a readable image")
        ds.samples = ds.imgs = keep
        ds.targets = [t for _, t in keep]
        self.skipped.extend(names)
        print(f"warning: imagefolder: left out {len(bad)} unreadable files under {root}: {', '.join(names[:5])}"
              + (" ..." if len(names) > 5 else ""), flush=True)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate") and self.train_path is None:
            raise ValueError("imagefolder: training needs data.train_path (a second class-folder tree)")
        super().setup(stage)

