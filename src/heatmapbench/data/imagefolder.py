"""Images in class folders (ILSVRC2012 val, SUN397, Places365): ``root/<class>/<image>``.

Every file is checked when the folder is scanned, before any work: its header is read, its
mode must be one that converts to RGB without losing its meaning (:func:`read_rgb`), and it is
decoded in full, since damage inside a file (a JPEG corrupt in the middle, whose header and end
are whole) shows only when it is decoded. A truncated or undecodable image is named there (or left
out with ``skip_unreadable=True``), not found mid-run. Cost: one decode per image, JPEGs at
1/8 scale (libjpeg still reads and entropy-decodes the whole compressed stream, where damage is
found, but skips most of the inverse DCT), on several threads; ``benches/bench_image_scan.py``
measures it against the header-only check.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from heatmapbench.data.base import (IMAGENET_MEAN, IMAGENET_STD, DataArgumentError, DataNotFoundError, ImageDataModule,
                                    check_normalisation)
from heatmapbench.data.samples import eval_transform



#: Modes PIL converts to RGB with their meaning kept (8-bit channels, palettes, alpha dropped, CMYK, YCbCr).
RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr")
#: 16-bit grey modes: scaled by 255/65535 to 8 bits (PIL's own conversion clips them at 255: white).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(OSError):
    """An image file that cannot be decoded or converted to RGB; the message names it."""


def _mode_error(path: str | Path, mode: str) -> UnreadableImageError:
    return UnreadableImageError(f"{path} has the image mode {mode!r}, which has no defined RGB meaning here "
                                "(float or colour-space images); convert it to 8- or 16-bit RGB or grey")


def to_rgb(image: Image.Image, path: str | Path = "image") -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit grey scaled (``round(v * 255 / 65535)``), not clipped; modes
    without an RGB meaning (``F``, ``LAB``, ``HSV``, 32-bit integers above 16 bits) refused."""
    if image.mode in RGB_MODES:
        return image.convert("RGB")
    if image.mode not in WIDE_MODES:
        raise _mode_error(path, image.mode)
    wide = np.asarray(image, dtype=np.int64)  # (H, W)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise _mode_error(path, f"{image.mode} (values outside 0..65535)")
    grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round half up, exact integers
    return Image.fromarray(grey, mode="L").convert("RGB")


def read_rgb(path: str) -> Image.Image:
    """The ImageFolder loader: the file at ``path`` as RGB (:func:`to_rgb`); a decoding error names the file."""
    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            image.load()
            return to_rgb(image, path)
    except UnreadableImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot decode the image {path}: {err}") from err


def check_image(path: str) -> None:
    """Raise ``OSError`` (or ``ValueError``) unless the file at ``path`` decodes to an RGB image.

    The header and the mode are read, then the whole file is decoded: a header, or a file's end,
    cannot tell a file damaged in the middle. A JPEG is decoded at 1/8 scale (``draft``): every byte
    of its compressed stream is still read and decoded, only the inverse transform is smaller.
    """
    with Image.open(path) as image:
        if image.mode not in RGB_MODES + WIDE_MODES:
            raise _mode_error(path, image.mode)
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
        to_rgb(image, path)


def _unreadable(path: str) -> str | None:
    """Why the file at ``path`` cannot be used (:func:`check_image`), in one line without its name; None if it can."""
    try:
        check_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError: an OSError
        return " ".join(str(err).replace(path, "it").split()) or type(err).__name__
    return None


def check_val_fraction(val_fraction: float) -> None:
    """``ValueError`` unless ``val_fraction`` (the part of the training tree held out for validation) is in [0, 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid: must be in [0, 1)")


class ImageFolderDataModule(ImageDataModule):
    """An ImageFolder tree for evaluation; for training a second tree, ``train_path``.

    Images are resized (shorter side ``resize``), centre-cropped to ``image_size``, scaled to
    ``value_range`` and normalised with ``mean``/``std`` (ImageNet's on [0, 1] by default).

    ``path`` is the test split (and the evaluation subset). Validation images are ``val_path``
    when given, else a seeded part of ``train_path`` held out of training: ``val_size`` images,
    or when that is 0, ``val_fraction`` of them (at least one). Every tree must hold the same
    class folders, since class indices follow the sorted folder names.

    Parameters
    ----------
    path
        The evaluation tree, ``<path>/<class>/<image>``.
    train_path, val_path
        A training tree; a validation tree (else ``val_size`` images, or a ``val_fraction`` of the
        training tree, are held out of training).
    image_size, resize, mean, std, value_range
        Preprocessing: shorter side to ``resize``, centre crop ``image_size``, pixels scaled to
        ``value_range``, then ``(px - mean) / std``.
    skip_unreadable
        Leave out files PIL cannot open (listed in the run) instead of failing before any work.
    channels
        3: the images are read as RGB.
    **kwargs
        The other arguments of :class:`~heatmapbench.data.base.ImageDataModule`.
    """

    name = "imagefolder"
    in_channels = 3

    def __init__(self, path: str, train_path: str | None = None, image_size: int = 224,
                 resize: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, value_range: Sequence[float] = (0.0, 1.0),
                 data_dir: str = "", val_size: int = 0, skip_unreadable: bool = False,
                 val_path: str | None = None, val_fraction: float = 0.2, channels: int = 3, **kwargs) -> None:
        super().__init__(data_dir=data_dir or path, val_size=val_size, **kwargs)
        self.skip_unreadable = skip_unreadable
        #: Files left out because PIL cannot read them (``skip_unreadable=true``), relative to their tree.
        self.skipped: list[str] = []
        if channels != 3:
            raise ValueError(f"imagefolder: images are read as RGB; channels={channels} is not supported")
        check_val_fraction(val_fraction)
        check_normalisation(mean, std, value_range)
        if val_path and val_size:
            raise ValueError(f"val_path={val_path} is invalid with val_size={val_size}: both choose the "
                             "validation images (imagefolder); set one of them")
        self.path = Path(path)
        self.train_path = Path(train_path) if train_path else None
        self.val_path = Path(val_path) if val_path else None
        self.val_fraction = float(val_fraction)
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.transform = eval_transform(image_size, resize, self.mean, self.std, self.value_range)
        for argument, folder in (("path", self.path), ("train_path", self.train_path), ("val_path", self.val_path)):
            if folder is not None:
                self.check_folder(folder, argument)
        self.classes = self._common_classes()
        self.num_classes = len(self.classes)

    def _common_classes(self) -> tuple[str, ...]:
        trees = [f for f in (self.train_path, self.val_path, self.path) if f is not None]
        found = []
        for folder in trees:
            try:
                found.append(tuple(find_classes(str(folder))[0]))
            except FileNotFoundError as err:  # no class folders in it
                raise DataNotFoundError(f"imagefolder: no images under {folder}; it must hold <class>/<image> files "
                                        f"(extensions {', '.join(IMG_EXTENSIONS)})") from err
        for folder, classes in zip(trees[1:], found[1:]):
            if classes != found[0]:
                only = sorted(set(found[0]) ^ set(classes))
                raise DataNotFoundError(
                    f"imagefolder: {folder} and {trees[0]} hold different class folders ({', '.join(only[:5])}"
                    f"{' ...' if len(only) > 5 else ''} in one only); the class indices would not match. "
                    "Give every tree the same class folders (an empty folder is fine)")
        return found[0]

    @staticmethod
    def check_folder(path: str | Path, argument: str = "path") -> None:
        """``DataNotFoundError`` naming ``argument`` unless ``path`` is a folder (its images are looked at later)."""
        if not Path(path).is_dir():
            raise DataNotFoundError(
                "imagefolder: no folder at {folder}. Set {%s} to a folder laid out as <folder>/<class_name>/"
                "<image>.jpg (e.g. ILSVRC2012 val sorted into class folders)." % argument, {argument: None}, folder=path)

    def load_split(self, train: bool) -> Dataset:
        root = self.train_path if (train and self.train_path is not None) else self.path
        return self._folder(root)

    def _folder(self, root: Path) -> Dataset:
        # allow_empty: a class may lack images in one tree; its index still follows the names
        ds = datasets.ImageFolder(str(root), transform=self.transform, loader=read_rgb, allow_empty=True)
        if len(ds) == 0:
            raise DataNotFoundError(f"imagefolder: no images under {root}; it must hold <class>/<image> files "
                                    f"(extensions {', '.join(IMG_EXTENSIONS)})")
        self._scan(ds, Path(root))
        self._report_empty_classes(ds, Path(root), training=root == self.train_path)
        return ds

    def _report_empty_classes(self, ds: datasets.ImageFolder, root: Path, training: bool) -> None:
        """Class folders without images: refused in a training tree (a class never seen), listed in the others
        (kept as classes, so that class indices follow the folder names across trees)."""
        counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
        empty = [name for name, n in zip(ds.classes, counts) if n == 0]
        if not empty:
            return
        listed = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        if training:
            raise DataNotFoundError(f"imagefolder: the training tree {root} has class folders with no images ({listed}); "
                                    "training cannot learn a class it never sees: add images or remove the folders "
                                    "from every tree")
        print(f"warning: imagefolder: {len(empty)} class folders under {root} hold no images ({listed}); they "
              "still count as classes (indices follow the folder names)", flush=True)

    def _scan(self, ds: datasets.ImageFolder, root: Path) -> None:
        """Check every file (:func:`check_image`); an unreadable one fails here, or is left out."""
        bad, reasons = [], []
        files = [file for file, _ in ds.samples]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            for file, reason in zip(files, pool.map(_unreadable, files)):
                if reason is not None:
                    bad.append(file)
                    reasons.append(reason)
        if not bad:
            return
        names = [str(Path(f).relative_to(root)) for f in bad]
        if not self.skip_unreadable:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DataNotFoundError("imagefolder: cannot read the image {file}{more}; remove or fix it, or pass "
                                    "{skip_unreadable} to leave unreadable files out (they are listed in the run). "
                                    "{name}: {reason}", {"skip_unreadable": True}, file=bad[0], more=more,
                                    name=Path(bad[0]).name, reason=reasons[0][:200])
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
            raise DataArgumentError("imagefolder: training needs {train_path}, a class-folder tree of training "
                                    "images ({path} holds the test images)", {"train_path": None, "path": None})
        if self.train_set is None and stage in (None, "fit", "validate") and self.train_path is not None:
            full = self.load_split(train=True)
            if self.val_path is not None:
                self.train_set, _ = self.split_train_val(full, 0)
                self.val_set = self._folder(self.val_path)
            else:
                val_size = self.val_size or (max(1, round(self.val_fraction * len(full))) if self.val_fraction else 0)
                self.train_set, self.val_set = self.split_train_val(full, val_size)
        super().setup(stage)

