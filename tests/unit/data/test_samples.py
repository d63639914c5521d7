"""The bundled ImageNet samples: files and labels, exact normalisation, clear errors."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.models import ResNet50_Weights

from heatmapbench.data import DataNotFoundError, ImageNetSamplesDataModule
from heatmapbench.data import samples as samples_mod
from heatmapbench.data.samples import eval_transform, foolbox_data_dir, sample_files

LITE0 = {"mean": (127.0,) * 3, "std": (128.0,) * 3, "value_range": (0.0, 255.0)}


@pytest.fixture(scope="module")
def lite0_samples():
    dm = ImageNetSamplesDataModule(**LITE0)
    return dm, dm.eval_subset()


def test_the_twenty_foolbox_images_and_their_labels():
    files = sample_files(foolbox_data_dir())
    assert [p.name.split("_")[1] for p, _ in files] == [f"{i:02d}" for i in range(20)]
    # The labels are the last field of the file name, as in foolbox.utils.samples.
    assert [label for _, label in files] == [int(p.stem.rsplit("_", 1)[1]) for p, _ in files]
    assert [label for _, label in files][:4] == [243, 559, 438, 990]
    assert all(0 <= label < 1000 for _, label in files)
    assert ImageNetSamplesDataModule.classes[243] == "bull mastiff"


def test_lite0_normalisation_is_exact(lite0_samples):
    dm, (x, y) = lite0_samples
    assert x.shape == (20, 3, 224, 224) and y.dtype == torch.long and y.shape == (20,)
    assert (dm.mean, dm.std, dm.value_range) == (LITE0["mean"], LITE0["std"], LITE0["value_range"])
    assert dm.normalization == {k: tuple(v) for k, v in LITE0.items()}
    px = dm.denormalize(x)  # back in pixel space: exactly the 8-bit values, (px - 127) / 128
    assert torch.allclose(px, px.round(), atol=1e-4)
    assert px.min() >= -1e-4 and px.max() <= 255 + 1e-4
    assert torch.equal(x, (px.round() - 127) / 128)
    assert px.amax() > 250 and px.amin() < 5  # real images span the range


def test_torchvision_preprocessing_matches_torchvisions_preset():
    """Default preprocessing == ``ResNet50_Weights.IMAGENET1K_V1.transforms()`` on every image."""
    dm = ImageNetSamplesDataModule(eval_subset_size=5)
    x, _ = dm.eval_subset()
    preset = ResNet50_Weights.IMAGENET1K_V1.transforms()
    ref = torch.stack([preset(Image.open(p).convert("RGB")) for p, _ in dm.files[:5]])
    assert dm.value_range == (0.0, 1.0)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)


def test_eval_subset_is_the_first_n_in_file_order(lite0_samples):
    dm, (x, y) = lite0_samples
    x5, y5 = dm.eval_subset(5)
    assert torch.equal(x5, x[:5]) and torch.equal(y5, y[:5])
    assert torch.equal(y, torch.tensor([label for _, label in dm.files]))
    dm.setup("test")
    xb, yb = next(iter(dm.test_dataloader()))
    assert torch.equal(xb, x) and torch.equal(yb, y)  # batch_size 20: one batch, same order


def test_resize_crop_and_scaling_on_a_synthetic_image(tmp_path):
    """A two-colour image: left/right halves survive resize + centre crop; values are exact."""
    img = Image.new("RGB", (300, 200), (10, 128, 250))
    img.paste((200, 0, 55), (150, 0, 300, 200))  # right half
    img.save(tmp_path / "imagenet_00_7.png")
    img.save(tmp_path / "imagenet_01_8.png")
    dm = ImageNetSamplesDataModule(data_dir=str(tmp_path), image_size=32, resize=40,
                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x, y = dm.eval_subset()
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [7, 8]
    left, right = x[0, :, :, 0], x[0, :, :, -1]  # (3, 32) columns far from the colour edge
    mean, std = torch.tensor(dm.mean)[:, None], torch.tensor(dm.std)[:, None]  # (3, 1)
    expect_left = ((torch.tensor([10.0, 128.0, 250.0])[:, None] / 255 - mean) / std).expand(3, 32)
    expect_right = ((torch.tensor([200.0, 0.0, 55.0])[:, None] / 255 - mean) / std).expand(3, 32)
    torch.testing.assert_close(left, expect_left, atol=1e-6, rtol=0)
    torch.testing.assert_close(right, expect_right, atol=1e-6, rtol=0)


def test_eval_transform_value_range():
    img = Image.new("RGB", (8, 8), (0, 51, 255))
    out = eval_transform(4, 4, mean=(0, 0, 0), std=(1, 1, 1), value_range=(-1.0, 1.0))(img)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([-1.0, -0.6, 1.0]))


def test_config_composes_and_instantiates(train_cfg):
    cfg = train_cfg("data=imagenet_samples", "data.eval_subset_size=3")
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageNetSamplesDataModule) and dm.num_classes == 1000
    assert dm.eval_subset()[0].shape == (3, 3, 224, 224)


def test_missing_foolbox_fails_clearly(monkeypatch):
    monkeypatch.setattr(samples_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotFoundError, match=r"pip install foolbox==3\.3\.4"):
        ImageNetSamplesDataModule()


def test_bad_folder_and_arguments_fail_clearly(tmp_path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nowhere")):
        ImageNetSamplesDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="no imagenet_<index>_<label>.jpg files"):
        ImageNetSamplesDataModule(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="value_range"):
        ImageNetSamplesDataModule(value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="3 values"):
        ImageNetSamplesDataModule(mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="cannot train"):
        ImageNetSamplesDataModule().setup("fit")
