"""Data modules: offline Fashion-MNIST, normalisation, the seeded evaluation subset, clear errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from heatmapbench.data import (CIFAR10DataModule, DataError, DataNotFoundError, FashionMNISTDataModule,
                               ImageFolderDataModule, ImageNetSamplesDataModule, MNISTDataModule)
from tests.helpers import make_images, needs_fmnist


@needs_fmnist
def test_fashion_mnist_offline_splits_and_normalisation(data_dir):
    dm = FashionMNISTDataModule(str(data_dir), val_size=5000, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    x, y = dm.test_set.tensors
    px = dm.denormalize(x)
    assert px.min() >= 0 and px.max() <= 1 and px.max() > 0.99
    # the published per-channel statistics of the training images
    train_px = dm.denormalize(dm.train_set.dataset.tensors[0])
    assert train_px.mean().item() == pytest.approx(dm.mean[0], abs=2e-3)
    assert train_px.std().item() == pytest.approx(dm.std[0], abs=2e-3)
    assert set(y.unique().tolist()) == set(range(10))
    # the split is disjoint and seeded
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)


@needs_fmnist
def test_eval_subset_is_fixed_and_seeded(data_dir):
    a = FashionMNISTDataModule(str(data_dir), eval_subset_size=32, seed=1)
    b = FashionMNISTDataModule(str(data_dir), eval_subset_size=32, seed=1)
    c = FashionMNISTDataModule(str(data_dir), eval_subset_size=32, seed=2)
    xa, ya = a.eval_subset()
    xb, yb = b.eval_subset()
    xc, _ = c.eval_subset()
    assert xa.shape == (32, 1, 28, 28) and ya.shape == (32,)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    assert torch.equal(a.eval_subset()[0], xa)


def test_missing_data_names_dataset_paths_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "offline_sources", (tmp_path / "debian",))
    dm = FashionMNISTDataModule(str(tmp_path / "data"), download=False)
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    text = str(err.value)
    assert "fashion_mnist" in text and str(tmp_path / "data") in text and str(tmp_path / "debian") in text
    assert "pass download=True" in text and "dataset-fashion-mnist" in text
    with pytest.raises(DataNotFoundError, match="mnist"):
        MNISTDataModule(str(tmp_path / "data")).prepare_data()


def test_bad_batch_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"^batch_size=0 is invalid: must be an integer >= 1"):  # plain: the library's own argument
        FashionMNISTDataModule(str(tmp_path), batch_size=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"channels": 2}, r"channels=2 is invalid: the fashion_mnist images have 1 channel"),
    ({"resize": 40}, r"resize=40 is invalid without image_size"),
    ({"image_size": 32, "resize": 20}, r"resize=20 is invalid: must be >= image_size=32"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, r"mean=\[0.5, 0.5\] is invalid: mean and std need 1 values each"),
])
def test_data_errors_name_the_argument_and_the_command_adds_the_group(tmp_path, kwargs, message):
    from omegaconf import OmegaConf

    from heatmapbench.app.plumbing import instantiate_data
    from heatmapbench.app.schema import ConfigError

    with pytest.raises(ValueError, match="^" + message):  # the library's own argument
        FashionMNISTDataModule(str(tmp_path), **kwargs)
    cfg = OmegaConf.create({"_target_": "heatmapbench.data.FashionMNISTDataModule", "data_dir": str(tmp_path), **kwargs})
    with pytest.raises(ConfigError, match="^data." + message):  # the command's key
        instantiate_data(cfg)


def _read_errors(tmp_path: Path) -> dict[str, tuple[Callable[[], object], dict[str, str]]]:
    """Data read or looked for, each wrong in one way: what raises, and how the library and the commands
    spell each argument its message names."""
    images = make_images(tmp_path / "images", per_class=2, size=8)
    broken = make_images(tmp_path / "broken", per_class=2, size=8)
    (broken / "class1" / "9.png").write_bytes(b"not an image")
    empty, nowhere = tmp_path / "empty", tmp_path / "nowhere"
    empty.mkdir()
    small = {"image_size": 8, "resize": 8}
    return {
        "mnist files": (lambda: MNISTDataModule(str(empty)).prepare_data(), {"download=True": "data.download=true"}),
        "cifar10 files": (lambda: CIFAR10DataModule(str(empty)).prepare_data(), {"download=True": "data.download=true"}),
        "unreadable image": (lambda: ImageFolderDataModule(str(broken), **small).setup("test"),
                             {"skip_unreadable=True": "data.skip_unreadable=true"}),
        "no path folder": (lambda: ImageFolderDataModule(str(nowhere)), {"Set path": "Set data.path"}),
        "no train_path folder": (lambda: ImageFolderDataModule(str(images), train_path=str(nowhere)),
                                 {"Set train_path": "Set data.train_path"}),
        "training without train_path": (lambda: ImageFolderDataModule(str(images), **small).setup("fit"),
                                        {"needs train_path": "needs data.train_path", "(path": "(data.path"}),
        "val_size of every image": (
            lambda: ImageFolderDataModule(str(images), train_path=str(images), val_size=6, **small).setup("fit"),
            {"val_size=6 is invalid": "data.val_size=6 is invalid"}),
        "no samples": (lambda: ImageNetSamplesDataModule(str(empty)), {"Leave data_dir": "Leave data.data_dir"}),
    }


@pytest.mark.parametrize("case", ["mnist files", "cifar10 files", "unreadable image", "no path folder",
                                  "no train_path folder", "training without train_path", "val_size of every image",
                                  "no samples"])
def test_data_read_errors_name_arguments_and_the_commands_name_data_keys(tmp_path, case):
    """The library's message names the module's arguments, never a config key; a command reads the same
    message with the ``data.`` keys (``data_keys`` wraps its data reading), and nothing else changed."""
    import pickle

    make, spelled = _read_errors(tmp_path)[case]
    with pytest.raises(DataError) as lib:
        make()
    text = str(lib.value)
    assert all(python in text for python in spelled) and not re.search(r"\bdata\.[a-z]", text), text

    from heatmapbench.app.plumbing import data_keys

    with pytest.raises(type(lib.value)) as cli, data_keys():
        make()
    expected = text
    for python, key in spelled.items():
        expected = expected.replace(python, key)
    assert str(cli.value) == expected != text
    assert str(pickle.loads(pickle.dumps(lib.value)).in_group("data")) == expected  # a sweep's worker pickles it


def test_training_without_train_path_is_still_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"^imagefolder: training needs train_path, a class-folder tree"):
        ImageFolderDataModule(str(make_images(tmp_path / "images")), image_size=8, resize=8).setup("fit")


def test_imagefolder_val_path_and_val_size_are_one_choice(tmp_path):
    root = make_images(tmp_path / "images")
    with pytest.raises(ValueError, match=r"^val_path=.* is invalid with val_size=3: both choose"):
        ImageFolderDataModule(str(root), val_path=str(root), val_size=3)


def test_imagefolder_reads_class_folders(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=24, resize=24, eval_subset_size=4)
    dm.setup("test")
    x, y = dm.eval_subset()
    assert x.shape == (4, 3, 24, 24)
    assert dm.num_classes == 2 and dm.classes == ("cat", "dog")
    px = dm.denormalize(x)
    red = px[y == 0][:, 0].mean() if (y == 0).any() else px[y == 1][:, 2].mean()
    assert red.item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DataNotFoundError, match="Set path to a folder"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
