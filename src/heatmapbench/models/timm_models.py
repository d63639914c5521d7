"""Any timm classifier by name (PyTorch Image Models), with its own preprocessing, built offline.

``model=timm model.net.name=<name>`` builds ``timm.create_model(name)`` (``name`` an
architecture, optionally with a pretrained tag: ``vit_base_patch16_224.augreg2_in21k_ft_in1k``)
and returns it as the zoo does (:mod:`heatmapbench.models.zoo`): in eval mode, its input
preprocessing attached as ``net.preprocessing``, its classification head named in
``net.head_name``, where its weights came from in ``net.weights_source``.

Weights, first found wins, nothing downloaded unless ``allow_download=True``:

1. ``weights_path``: a state dict file (``.safetensors``, ``.pth``/``.bin`` read with
   ``weights_only``, or the original ``.npz`` of models timm loads that way);
2. timm's own caches, as timm itself would fill them: the Hugging Face hub cache
   (``model.safetensors`` / ``pytorch_model.bin`` of the tag's ``hf_hub_id``), then
   ``torch.hub.get_dir()/checkpoints/<file of the tag's url>``;
3. with ``allow_download=True``, timm's own download (``create_model(..., pretrained=True)``).

Every file goes through timm's ``load_pretrained`` (its per-model checkpoint filter, strict
loading), so the weights are the ones ``timm.create_model(name, pretrained=True)`` gives.
``pretrained=False`` builds the random initialisation (untrained: ``heatmapbench-evaluate``
warns and tags the run).

Preprocessing: ``timm.data.resolve_data_config(model=net)`` (the tag's pretrained config):
input size, ``mean``/``std`` on pixels in [0, 1], and the eval resize
``floor(size / crop_pct)`` before the centre crop, as ``timm.data.create_transform`` does.
The interpolation is not carried over: the data modules resize bilinearly, where many timm
models were trained with bicubic resizing.

Heads: ``num_classes`` other than the pretrained width keeps every other weight and gives
the model a fresh head through timm's ``reset_classifier`` (the fine-tuning recipe of
``heatmapbench-train head=adapt``); ``None`` keeps the pretrained width.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from heatmapbench.models.errors import ModelConfigError
from heatmapbench.models.zoo import Preprocessing, WeightsNotFoundError, require_extra

__all__ = ["cached_weights_file", "timm_model", "timm_preprocessing"]


def _timm() -> Any:
    return require_extra("timm", "timm", "model=timm")


def _pretrained_cfg(timm: Any, name: str) -> Any:
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``); a ``ModelConfigError`` for unknown names."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not isinstance(name, str) or not name or ":" in name:
        raise ModelConfigError("{name} is invalid: give a timm architecture name, optionally with a pretrained tag "
                               "(e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k; timm.list_models() lists them); a "
                               "weights file goes in {weights_path}", {"name": name, "weights_path": None})
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelConfigError("{name} is not a timm model; {hint}timm.list_models('*part*') lists the {count} "
                               "names of timm {version}", {"name": name}, hint=hint, count=len(timm.list_models()),
                               version=timm.__version__)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ModelConfigError("{name}: timm's {arch} has no pretrained tag {tag}; its tags: {tags}", {"name": name},
                               arch=arch, tag=repr(tag), tags=", ".join(tags) or "none")
    return cfg


def cached_weights_file(cfg: Any) -> Path | None:
    """The file timm would load for a pretrained config ``cfg``, if one of timm's caches holds it (no network).

    The Hugging Face hub cache first (timm's own order), then the torch hub checkpoints folder
    that timm's URL download writes into.
    """
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):  # else None (not cached) or a "known missing" marker
                return Path(hit)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached.is_file():
            return cached
    return None


def timm_preprocessing(net: nn.Module, image_size: int | Sequence[int] | None = None,
                       channels: int | None = None) -> Preprocessing:
    """The eval preprocessing of a timm model, from ``timm.data.resolve_data_config(model=net)``.

    ``resize = floor(size / crop_pct)`` then a centre crop of ``size``, as timm's eval transform.
    ``image_size`` / ``channels``: the model was built for another input than its pretrained
    config says (``img_size`` / ``in_chans`` of ``create_model``); the per-channel mean and std
    of another channel count are their averages.
    """
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=net)
    c, height, width = data["input_size"]
    if image_size is not None:  # timm takes an int or (height, width)
        height, width = (int(image_size), int(image_size)) if isinstance(image_size, int) else map(int, image_size)
    if height != width:
        raise ModelConfigError("timm model {kind} takes {height}×{width} inputs; heatmapbench's data modules crop "
                               "squares: pass a square img_size in {kwargs}", {"kwargs": None},
                               kind=type(net).__name__, height=height, width=width)
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    c = int(channels or c)
    if c != len(mean):
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    crop_pct = float(data.get("crop_pct") or 1.0)
    return Preprocessing(mean, std, (0.0, 1.0), int(height), int(math.floor(height / crop_pct)), c)


def _head_name(net: nn.Module) -> str | None:
    head = net.pretrained_cfg.get("classifier")
    return head if isinstance(head, str) else None  # a tuple: several heads (distilled models)


def timm_model(name: str, pretrained: bool = True, weights_path: str | None = None, allow_download: bool = False,
               num_classes: int | None = None, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name)`` with offline weights, its preprocessing and a named head.

    Parameters
    ----------
    name
        A timm architecture, optionally ``arch.tag`` for a given set of pretrained weights.
    pretrained
        ``False``: random initialisation (then ``weights_path`` must be ``None``).
    weights_path
        A state dict file of the model (with its pretrained head); default: timm's caches.
    allow_download
        Let timm download the weights when no file is found.
    num_classes
        Output width; other than the pretrained width, a fresh head (``reset_classifier``).
        ``None``: the pretrained width.
    kwargs
        More arguments of ``timm.create_model`` (e.g. ``img_size`` of a ViT, ``in_chans``).

    Raises
    ------
    MissingExtraError
        timm is not installed.
    ModelConfigError
        ``name`` is not a timm model or tag.
    WeightsNotFoundError
        No weights at ``weights_path`` or in timm's caches, and no download allowed.
    ValueError
        The weights do not fit the model.
    """
    timm = _timm()
    cfg = _pretrained_cfg(timm, name)
    kwargs = dict(kwargs or {})
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1 or None (the pretrained width), got {num_classes!r}")
    if not pretrained:
        if weights_path is not None:
            raise ModelConfigError("timm {name}: {pretrained} (random init) contradicts {weights_path}; drop one of them",
                                   {"pretrained": False, "weights_path": weights_path}, name=name)
        net = timm.create_model(name, pretrained=False, **({"num_classes": num_classes} if num_classes else {}),
                                **kwargs)
        return _finish(net, num_classes, kwargs)
    source: str
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError("timm {name}: no weights file at {file} ({weights_path}); save one with "
                                       "torch.save(model.state_dict(), path)", {"weights_path": None}, name=name,
                                       file=path.resolve())
    else:
        path = cached_weights_file(cfg)
    if path is not None:
        # the file goes through timm's own loading (checkpoint filter, strict); hub files are in
        # timm's layout already, only the original .npz of some models needs the custom loader
        overlay = {"file": str(path), "custom_load": bool(cfg.custom_load) and path.suffix == ".npz"}
        source = str(path)
    elif allow_download:
        overlay = {}
        source = f"timm:{cfg.hf_hub_id or cfg.url}"
    else:
        where = [f"the Hugging Face hub cache ({cfg.hf_hub_id})"] if cfg.hf_hub_id else []
        if cfg.url:
            where.append(str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)))
        raise WeightsNotFoundError(
            "timm {name}: pretrained weights not found in {where}; pass {weights_path}, pass {allow_download} (needs "
            "internet), or {pretrained} for a randomly initialised network",
            {"weights_path": "/path/to/state_dict", "allow_download": True, "pretrained": False}, name=name,
            where=" or ".join(where) or "any cache (timm lists no source)")
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:  # missing/unexpected keys or shapes, listed by torch
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"timm {name}: the weights in {source} do not fit the model: {first}") from err
    net.weights_source = source  # a plain attribute: evaluate warns about nets without one
    return _finish(net, num_classes, kwargs)


def _finish(net: nn.Module, num_classes: int | None, kwargs: Mapping[str, Any]) -> nn.Module:
    # the pretrained config keeps the input the weights were trained on, not create_model's img_size / in_chans
    net.preprocessing = timm_preprocessing(net, kwargs.get("img_size"), kwargs.get("in_chans"))
    head = _head_name(net)
    if head is not None:
        net.head_name = head
    if num_classes is not None and num_classes != net.num_classes:
        net.reset_classifier(num_classes)
    return net.eval()
