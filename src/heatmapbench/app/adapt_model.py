"""Fit a config to a pretrained model and to the data: the model's preprocessing, the data's classes.

Both entry points take the pretrained network's own input preprocessing (size, resize,
channels, mean/std, value range) into the data config, so the logged config shows what the
data really were; ``heatmapbench-train`` also sizes the classifier's head to the data's classes.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict
from torch import nn

from heatmapbench.app.schema import ConfigError
from heatmapbench.models.zoo import Preprocessing, preprocessing_of

#: What ``head`` may be in the train config.
HEAD_POLICIES = ("adapt", "keep")


def apply_model_preprocessing(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """Write ``model``'s preprocessing into ``cfg.data``; return the keys whose values changed.

    Only keys the data config has are set (e.g. Fashion-MNIST takes ``channels``, an image
    folder does not). Nothing happens for a model without preprocessing (the project's own
    small nets) or with ``cfg.preprocessing_from_model`` false.
    """
    pre = preprocessing_of(model)
    if pre is None or not cfg.get("preprocessing_from_model", True):
        return {}
    changed = {}
    with open_dict(cfg):  # the logged config must show what was really used
        for key, value in pre.data_kwargs().items():
            if key in cfg.data and cfg.data[key] != value:
                cfg.data[key] = value
                changed[key] = value
    return changed


def describe_preprocessing(pre: Preprocessing | None) -> str:
    """One line saying what the model's inputs are (printed and logged by ``heatmapbench-train``)."""
    if pre is None:
        return "the data module's own normalisation (the model names no preprocessing)"
    lo, hi = pre.value_range
    return (f"{pre.channels}×{pre.image_size}×{pre.image_size} (resize {pre.resize}, centre crop), "
            f"px in [{lo:g}, {hi:g}], mean {list(pre.mean)}, std {list(pre.std)}")


def adapt_num_classes(cfg: DictConfig, data_classes: int | None) -> str | None:
    """Size the model's output to the data's ``data_classes`` as ``cfg.head`` says.

    ``head=adapt`` (default) sets ``model.num_classes`` to the data's class count; a zoo model
    whose pretrained head has another width then gets a fresh head of that width, its other
    weights loaded, and so does a checkpoint (``model.net.adapt_head``). ``head=keep`` leaves the
    model as configured and refuses data with another number of classes. Returns a line describing a change, or ``None``.

    Raises
    ------
    ConfigError
        ``head`` is not one of ``adapt``/``keep``, or ``keep`` with a mismatched class count.
    """
    policy = cfg.get("head", "adapt")
    if policy not in HEAD_POLICIES:
        raise ConfigError(f"head={policy!r} is invalid: use head=adapt (size the head to the data's classes) "
                          "or head=keep (keep the model's head; the data must have as many classes)")
    net = cfg.model.get("net")
    if isinstance(net, DictConfig) and "adapt_head" in net:  # a checkpoint's head: refused or replaced
        with open_dict(cfg):
            net.adapt_head = policy == "adapt"
    if data_classes is None or "num_classes" not in cfg.model:
        return None
    if cfg.model.num_classes is None:  # the net's own width (timm, Hugging Face): known once it is built
        if policy == "keep":
            return None  # the built model's outputs are checked against the data before any run
        with open_dict(cfg):
            cfg.model.num_classes = data_classes
        return (f"{data_classes} outputs (the data's classes; a pretrained head of another width is replaced by a "
                "fresh one)")
    configured = int(cfg.model.num_classes)
    if configured == data_classes:
        return None
    if policy == "keep":
        raise ConfigError(
            f"head=keep: the model's head has {configured} outputs (model.num_classes={configured}) but the "
            f"data have {data_classes} classes; use head=adapt to fine-tune a fresh {data_classes}-way head "
            f"(the other pretrained weights are kept), or data with {configured} classes")
    with open_dict(cfg):
        cfg.model.num_classes = data_classes
    return f"{configured} → {data_classes} outputs (the data's classes; a pretrained head is replaced by a fresh one)"
