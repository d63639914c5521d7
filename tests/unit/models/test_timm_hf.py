"""timm and Hugging Face classifiers: offline weights, their own preprocessing, logits, heads, errors.

Every model is built here with random weights (timm ``pretrained=False``, transformers from a
config) and saved to a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from heatmapbench.app.plumbing import user_errors_exit
from heatmapbench.models.errors import ModelConfigError
from heatmapbench.data.samples import eval_transform
from heatmapbench.explain.gradient import Sensitivity
from heatmapbench.models import ClassifierModule, preprocessing_of
from heatmapbench.models.hf_models import HFClassifier, hf_model, hf_preprocessing
from heatmapbench.models.timm_models import timm_model
from heatmapbench.models.zoo import MissingExtraError, Preprocessing, WeightsNotFoundError
from heatmapbench.perturbation import region_perturbation
from heatmapbench.app.train import build_model_and_data
from tests.helpers import needs_fmnist

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, num_labels=5)


def _ramp(width: int, height: int) -> Image.Image:
    """An RGB image whose channels are linear in x, in y and constant: every resampling filter keeps it."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(255, 0, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 90)], -1).round().astype(np.uint8))


def _ours(pre: Preprocessing, image: Image.Image) -> torch.Tensor:
    return eval_transform(pre.image_size, pre.resize, pre.mean, pre.std, pre.value_range)(image)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A random transformers ViT classifier (5 labels, 32² input) and its image processor, saved."""
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT)).eval()
    folder = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A random timm ``test_vit`` (eval) and its state dict as .pth and .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("test_vit", pretrained=False).eval()
    folder = tmp_path_factory.mktemp("timm")
    torch.save(ref.state_dict(), folder / "test_vit.pth")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, folder / "test_vit.safetensors")
    return ref, folder


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """The Hugging Face hub cache and the torch hub folder pointed at empty folders."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf", tmp_path / "torch" / "hub" / "checkpoints"


def _into_hf_cache(cache, repo: str, file, name: str | None = None):
    """Put ``file`` into the Hugging Face hub cache as huggingface_hub lays out a download of ``repo``
    (as ``name``, by default ``model<suffix>``)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    target = snapshot / (name or "model" + file.suffix)
    target.symlink_to(file)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    return target


def _x(n=2, size=160, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- timm ---------------------------------------------------------------------------------------------
def _uint8_tolerance(pre: Preprocessing) -> float:
    """Two resamplings that each round to 8 bits differ by up to 2 levels, in model space."""
    return 2.5 * (pre.value_range[1] - pre.value_range[0]) / 255 / min(pre.std)


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet", "resnet10t"])
def test_timm_preprocessing_is_timms_own(name):
    net = timm_model(name, pretrained=False)
    pre = preprocessing_of(net)
    data = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    assert (pre.channels, pre.image_size, pre.image_size) == data["input_size"]
    assert pre.mean == data["mean"] and pre.std == data["std"] and pre.value_range == (0.0, 1.0)
    # the same image through timm's eval transform and through the data modules' transform
    image = _ramp(300, 240)
    theirs = timm.data.create_transform(**data)(image)
    assert theirs.shape == _ours(pre, image).shape
    atol = _uint8_tolerance(pre)
    torch.testing.assert_close(_ours(pre, image), theirs, rtol=0, atol=atol)
    # negative control: without the crop_pct resize the picture is another one
    assert (_ours(Preprocessing(pre.mean, pre.std, image_size=pre.image_size, resize=pre.image_size), image)
            - theirs).abs().max() > 2 * atol


def test_timm_weights_from_a_file_and_its_head(timm_file):
    ref, folder = timm_file
    x = _x()
    for path in (folder / "test_vit.pth", folder / "test_vit.safetensors"):
        net = timm_model("test_vit", weights_path=str(path))
        assert net.weights_source == str(path) and not net.training and net.head_name == "head"
        with torch.no_grad():
            assert torch.equal(net(x), ref(x))
    # a fresh 3-way head (reset_classifier) on every other pretrained weight
    net = timm_model("test_vit", weights_path=str(folder / "test_vit.pth"), num_classes=3)
    a, b = ref.state_dict(), net.state_dict()
    assert a.keys() == b.keys() and b["head.weight"].shape == (3, 64)
    for key in a:
        if not key.startswith("head."):
            assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        features = ref.forward_head(ref.forward_features(x), pre_logits=True)  # (2, 64)
        torch.testing.assert_close(net(x), features @ b["head.weight"].T + b["head.bias"])
    module = ClassifierModule(net, num_classes=None, freeze_backbone_epochs=1)
    assert module.num_classes == 3


def test_timm_weights_from_timms_caches_and_its_download(timm_file, empty_caches, monkeypatch):
    ref, folder = timm_file
    hf_cache, torch_hub = empty_caches
    x = _x()
    with pytest.raises(WeightsNotFoundError, match="pass allow_download=True") as info:
        timm_model("test_vit")
    assert "timm/test_vit.r160_in1k" in str(info.value) and not hf_cache.exists()
    # the Hugging Face hub cache, laid out as huggingface_hub writes it
    cached = _into_hf_cache(hf_cache, "timm/test_vit.r160_in1k", folder / "test_vit.safetensors")
    net = timm_model("test_vit")
    assert net.weights_source == str(cached)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    # a model whose URL file is JAX's .npz (timm's custom loader): its hub file, in timm's layout, loads too
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    assert timm.models.get_pretrained_cfg("vit_tiny_patch16_224").custom_load
    from safetensors.torch import save_file

    save_file(dict(vit.state_dict()), folder / "vit_tiny.safetensors")
    _into_hf_cache(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", folder / "vit_tiny.safetensors")
    with torch.no_grad():
        assert torch.equal(timm_model("vit_tiny_patch16_224")(_x(1, 224)), vit(_x(1, 224)))
    # a URL-hosted model: torch hub's checkpoints folder, the file name of timm's URL
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False).eval()
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    torch_hub.mkdir(parents=True)
    torch.save(resnet.state_dict(), torch_hub / cfg.url.rsplit("/", 1)[1])
    net = timm_model("resnet10t")
    with torch.no_grad():
        assert torch.equal(net(_x(1, 64)), resnet(_x(1, 64)))
    # allow_download: timm's own download route (its hub loader, replaced here: no network in tests)
    calls = []

    def fake_hf(model_id, *args, **kwargs):
        calls.append(model_id)
        return dict(ref.state_dict())

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", fake_hf)
    net = timm_model("test_vit.r160_in1k", allow_download=True, kwargs={"num_classes": 1000})
    assert calls == [] and net.weights_source.startswith(str(hf_cache))  # still the cached file first
    import shutil

    shutil.rmtree(hf_cache)
    net = timm_model("test_vit", allow_download=True)
    assert calls == ["timm/test_vit.r160_in1k"] and net.weights_source == "timm:timm/test_vit.r160_in1k"
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))


def test_timm_random_init_is_untrained_and_bad_names_fail_in_one_line(tmp_path):
    net = timm_model("test_vit", pretrained=False, kwargs={"img_size": 32})
    assert getattr(net, "weights_source", None) is None  # evaluate warns and tags weights=untrained
    assert preprocessing_of(net) == Preprocessing((0.5,) * 3, (0.5,) * 3, (0.0, 1.0), 32, 33, 3)
    assert net(_x(1, 32)).shape == (1, 1000)
    assert preprocessing_of(timm_model("test_vit", pretrained=False, kwargs={"img_size": [48, 48]})).image_size == 48
    with pytest.raises(ValueError, match="takes 32×48 inputs"):
        timm_model("test_vit", pretrained=False, kwargs={"img_size": [32, 48]})
    with pytest.raises(ModelConfigError, match=r"'vit_tiny_patch16_2244' is not a timm model; did you mean "
                                          r"vit_tiny_patch16_224"):
        timm_model("vit_tiny_patch16_2244")
    with pytest.raises(ModelConfigError, match="has no pretrained tag 'nope'; its tags: r160_in1k"):
        timm_model("test_vit.nope")
    with pytest.raises(ModelConfigError, match="weights_path"):
        timm_model("hf-hub:timm/test_vit.r160_in1k")
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "none.pth")):
        timm_model("test_vit", weights_path=str(tmp_path / "none.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), wrong)
    with pytest.raises(ValueError, match="do not fit the model"):
        timm_model("test_vit", weights_path=str(wrong))


# -- Hugging Face -------------------------------------------------------------------------------------
def test_hf_model_returns_the_logits_of_the_saved_model(vit_folder):
    ref, folder = vit_folder
    net = hf_model(str(folder))
    assert isinstance(net, HFClassifier) and not net.training
    assert net.weights_source == str(folder.resolve()) and net.head_name == "model.classifier"
    x = _x(3, 32)
    with torch.no_grad():
        out = net(x)
        assert type(out) is torch.Tensor and torch.equal(out, ref(pixel_values=x).logits)
    assert ClassifierModule(net, num_classes=None).num_classes == 5


def test_hf_preprocessing_is_the_saved_image_processors(vit_folder, tmp_path):
    _, folder = vit_folder
    pre = preprocessing_of(hf_model(str(folder)))
    assert pre == Preprocessing((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), (0.0, 1.0), 32, 32, 3)
    processors = [
        (transformers.AutoImageProcessor.from_pretrained(folder, use_fast=False), _ramp(90, 90)),
        # shorter side to 64 / 0.875, centre crop 64 (ConvNeXt's and ResNet's processor)
        (transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875), _ramp(120, 90)),
        # 256² then the centre 224 (DeiT's), rescaled by 1/127.5 into [0, 2]
        (transformers.DeiTImageProcessor(rescale_factor=1 / 127.5), _ramp(300, 300)),
    ]
    from heatmapbench.models.hf_models import processor_preprocessing

    for processor, image in processors:
        pre = processor_preprocessing(processor)
        theirs = processor(images=image, return_tensors="pt").pixel_values[0]
        assert pre.mean == tuple(processor.image_mean) and pre.std == tuple(processor.image_std)
        torch.testing.assert_close(_ours(pre, image), theirs, rtol=0, atol=_uint8_tolerance(pre))
    assert processor_preprocessing(processors[1][0]).resize == 73
    assert processor_preprocessing(processors[2][0]).value_range == (0.0, 2.0)
    # no processor saved: the model type's defaults at the config's size, and a warning
    bare = tmp_path / "bare"
    transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT)).save_pretrained(bare)
    with pytest.warns(UserWarning, match="no preprocessor_config.json"):
        pre = hf_preprocessing(str(bare), transformers.AutoConfig.from_pretrained(bare))
    assert pre == Preprocessing((0.5,) * 3, (0.5,) * 3, (0.0, 1.0), 32, 32, 3)


def test_hf_head_replacement_and_random_init(vit_folder):
    ref, folder = vit_folder
    net = hf_model(str(folder), num_classes=3)
    assert net.num_classes == 3 and net.model.config.num_labels == 3
    a, b = ref.state_dict(), net.model.state_dict()
    assert b["classifier.weight"].shape == (3, 32)
    for key in a:
        if not key.startswith("classifier."):
            assert torch.equal(a[key], b[key]), key
    x = _x(2, 32)
    with torch.no_grad():
        cls = ref.vit(pixel_values=x).last_hidden_state[:, 0]  # (2, 32): ViT classifies the class token
        torch.testing.assert_close(net(x), cls @ b["classifier.weight"].T + b["classifier.bias"])
    rand = hf_model(str(folder), pretrained=False)
    assert getattr(rand, "weights_source", None) is None and rand.num_classes == 5


def test_hf_model_by_hub_id_from_the_cache_only(vit_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants
    import transformers.utils.hub

    ref, folder = vit_folder
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(cache))  # read at its import
    with pytest.raises(WeightsNotFoundError, match="no hub model 'acme/tiny-vit' in the Hugging Face cache"):
        hf_model("acme/tiny-vit")
    for file in folder.iterdir():  # as huggingface_hub lays out a download
        _into_hf_cache(cache, "acme/tiny-vit", file, name=file.name)
    net = hf_model("acme/tiny-vit")
    assert net.weights_source == "hf:acme/tiny-vit"
    assert preprocessing_of(net) == preprocessing_of(hf_model(str(folder)))
    x = _x(2, 32)
    with torch.no_grad():
        assert torch.equal(net(x), ref(pixel_values=x).logits)


def test_hf_bad_folders_fail_in_one_line(vit_folder, tmp_path):
    _, folder = vit_folder
    with pytest.raises(ModelConfigError, match="no such folder"):
        hf_model(str(tmp_path / "missing"))
    with pytest.raises(ModelConfigError, match="has no config.json"):
        hf_model(str(tmp_path))
    config_only = tmp_path / "config_only"
    transformers.ViTConfig(**TINY_VIT).save_pretrained(config_only)
    with pytest.raises(WeightsNotFoundError, match="holds no weights"):
        hf_model(str(config_only))
    text = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(text)
    with pytest.raises(ModelConfigError, match="no image classifier"):
        hf_model(str(text))
    base = tmp_path / "base"  # a backbone without a classifier: its head would be random
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(base)
    with pytest.raises(ValueError, match="lack 2 tensors"):
        hf_model(str(base))
    assert hf_model(str(base), num_classes=4).num_classes == 4  # a fresh head for fine-tuning


def test_the_engine_and_an_explainer_see_plain_logits(vit_folder):
    """Sensitivity equals the gradient of the transformers model's logit; the engine's scores equal
    the model's logits on the perturbed images built by hand."""
    ref, folder = vit_folder
    net = hf_model(str(folder))
    x = _x(2, 32, seed=3)
    target = torch.tensor([1, 4])
    heat = Sensitivity("l2")(net, x, target)  # (2, 32, 32)
    xg = x.clone().requires_grad_(True)
    ref(pixel_values=xg).logits[[0, 1], target].sum().backward()
    torch.testing.assert_close(heat, xg.grad.norm(dim=1), rtol=1e-5, atol=1e-7)
    result = region_perturbation(net, x, heat, target=target, region_size=8, steps=4, perturbation="mean",
                                 mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    perturbed = x.clone()
    with torch.no_grad():
        for k in range(5):
            torch.testing.assert_close(result.scores[0, :, k], ref(pixel_values=perturbed).logits[[0, 1], target],
                                       rtol=1e-5, atol=1e-5)
            if k < 4:
                for i, r in enumerate(result.order[0, :, k].tolist()):
                    row, col = divmod(r, 4)  # 4×4 grid of 8×8 regions; mean = 0 in model space
                    perturbed[i, :, 8 * row:8 * row + 8, 8 * col:8 * col + 8] = 0


# -- fine-tuning through the real config -----------------------------------------------------------
@needs_fmnist
@pytest.mark.parametrize("model", ["timm", "hf"])
def test_one_fine_tuning_step_trains_the_fresh_head_only(train_cfg, vit_folder, model):
    overrides = (["model=timm", "model.net.name=test_vit", "model.net.pretrained=false",
                  "+model.net.kwargs.img_size=32"] if model == "timm"
                 else ["model=hf", f"model.net.path={vit_folder[1]}"])
    cfg = train_cfg(*overrides, "model.freeze_backbone_epochs=1", "data.batch_size=4", "data.train_size=8")
    module, dm, notes = build_model_and_data(cfg)
    assert module.num_classes == 10 and "10 outputs" in notes["head"]
    head_prefix = module._head_prefix
    assert dm.image_size == 32 and dm.in_channels == 3
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    after = module.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(head_prefix) for k in changed)
    assert after[head_prefix + "weight"].shape[0] == 10


# -- optional extras ---------------------------------------------------------------------------------
@pytest.mark.parametrize("module, build, extra", [
    ("timm", lambda: timm_model("test_vit", pretrained=False), "timm"),
    ("transformers", lambda: hf_model("/nowhere"), "hf"),
])
def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys, module, build, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=rf"pip install 'heatmapbench\[{extra}\]'") as info:
        build()
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit) as code:  # what the commands print: one line, status 2
        user_errors_exit(build)()
    assert code.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {info.value}"
