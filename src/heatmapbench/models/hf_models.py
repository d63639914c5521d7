"""Hugging Face transformers image classifiers from a ``save_pretrained`` folder, as plain classifiers.

``model=hf model.net.path=<folder>`` loads ``AutoModelForImageClassification.from_pretrained``
from a folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), never
over the network; ``path`` may also be a hub id (``owner/name``) found in the Hugging Face cache,
downloaded only with ``allow_download=True``. ``pretrained=False`` builds the random
initialisation of the folder's config (untrained: ``heatmapbench-evaluate`` warns and tags the run).

The model is wrapped in :class:`HFClassifier`, which returns the logits tensor of the model's
``ModelOutput``: the perturbation engine, the explainers and Lightning see ``(B, C, H, W) →
(B, K)`` like any other classifier. As the zoo (:mod:`heatmapbench.models.zoo`), the wrapper
carries ``preprocessing``, ``head_name`` and ``weights_source``.

Preprocessing, from the model's own files: the image processor saved beside it
(``preprocessor_config.json``: resize, centre crop, ``rescale_factor``, ``image_mean`` /
``image_std``); a folder without one gets the defaults of its model type's processor at the
config's ``image_size``, with a warning. A processor's resize to ``height × width`` equals the
shorter-side resize and centre crop used here on square images; other images keep their
aspect ratio here. The resampling filter is not carried over (the data modules resize
bilinearly). Processors that do what ``Preprocessing`` cannot express (channel flips) are refused.

Heads: ``num_classes`` other than the config's ``num_labels`` loads every other weight and a
freshly initialised classifier of that width (``from_pretrained(num_labels=..,
ignore_mismatched_sizes=True)``, the transformers fine-tuning recipe); ``None`` keeps the model's.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heatmapbench.models.errors import ModelConfigError
from heatmapbench.models.zoo import Preprocessing, WeightsNotFoundError, require_extra

__all__ = ["HFClassifier", "hf_model", "hf_preprocessing"]

#: The files ``save_pretrained`` writes the weights into (single file or sharded index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HFClassifier(nn.Module):
    """A transformers image classifier as a plain classifier: ``pixel_values (B, C, H, W)`` → logits ``(B, K)``.

    The ``ModelOutput`` (logits, hidden states, attentions) never leaves this module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.model(pixel_values=x, return_dict=True).logits


def _transformers() -> Any:
    return require_extra("transformers", "hf", "model=hf")


def _source(path: str, allow_download: bool) -> tuple[str, bool]:
    """``(where, is_folder)``: a ``save_pretrained`` folder, or a hub id in the cache (or to download)."""
    if not isinstance(path, str) or not path:
        raise ModelConfigError("{path} is invalid: give the folder a transformers image classifier was saved to "
                               "(model.save_pretrained(folder))", {"path": path})
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelConfigError("{path} is invalid: {folder} has no config.json; point it at a folder written by "
                                   "model.save_pretrained(folder) (config.json and model.safetensors)", {"path": path},
                                   folder=folder.resolve())
        return str(folder), True
    if folder.exists():
        raise ModelConfigError("{path} is invalid: a file, not a folder; point it at the folder "
                               "model.save_pretrained(folder) wrote", {"path": path})
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        from huggingface_hub import try_to_load_from_cache

        if allow_download or isinstance(try_to_load_from_cache(path, "config.json"), str):
            return path, False
        raise WeightsNotFoundError(
            "{path}: no such folder, and no hub model {hub_id} in the Hugging Face cache; save the model to a folder "
            "with save_pretrained, or pass {allow_download} (needs internet)", {"path": path, "allow_download": True},
            hub_id=repr(path))
    raise ModelConfigError("{path} is invalid: no such folder ({folder}); save a transformers image classifier there "
                           "with model.save_pretrained(folder)", {"path": path}, folder=folder.resolve())


def _head_name(model: nn.Module) -> str | None:
    """The classifier's last ``nn.Linear`` (name relative to the transformers model), or ``None``."""
    for attribute in ("classifier", "head", "fc"):
        module = getattr(model, attribute, None)
        if isinstance(module, nn.Linear):
            return attribute
        if isinstance(module, nn.Module):
            linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                return f"{attribute}.{linears[-1]}"
    return None


def hf_model(path: str, pretrained: bool = True, allow_download: bool = False,
             num_classes: int | None = None) -> HFClassifier:
    """An ``AutoModelForImageClassification`` from ``path``, wrapped to return logits.

    Parameters
    ----------
    path
        A folder written by ``save_pretrained`` (``config.json`` and the weights); or a hub id
        (``owner/name``) in the Hugging Face cache.
    pretrained
        ``False``: random initialisation from the folder's ``config.json``.
    allow_download
        Let transformers download a hub id that is not in the cache.
    num_classes
        Output width; other than the config's ``num_labels``, a fresh classifier. ``None``: the model's.

    Raises
    ------
    MissingExtraError
        transformers is not installed.
    ModelConfigError
        No such folder, no ``config.json`` in it, or its config is not an image classifier's.
    WeightsNotFoundError
        ``pretrained`` but no weights file in the folder (or the hub id is not cached).
    ValueError
        The weights do not fit the config.
    """
    transformers = _transformers()
    where, is_folder = _source(path, allow_download)
    local = not allow_download or is_folder
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1 or None (the model's num_labels), got {num_classes!r}")
    config = transformers.AutoConfig.from_pretrained(where, local_files_only=local)
    auto = transformers.AutoModelForImageClassification
    if type(config) not in auto._model_mapping:
        raise ModelConfigError("{path}: its config.json describes a {model_type} model, which transformers has no "
                               "image classifier for (AutoModelForImageClassification)", {"path": path},
                               model_type=repr(config.model_type))
    new_head = num_classes is not None and num_classes != config.num_labels
    if not pretrained:
        if new_head:
            config.num_labels = num_classes
        model = auto.from_config(config)
        source = None
    else:
        if is_folder and not any((Path(where) / f).is_file() for f in WEIGHT_FILES):
            raise WeightsNotFoundError("{path}: {folder} holds no weights ({files}); save them with "
                                       "model.save_pretrained, or pass {pretrained} for a randomly initialised network",
                                       {"path": path, "pretrained": False}, folder=Path(where).resolve(),
                                       files=" / ".join(WEIGHT_FILES[::2]))
        kwargs = {"num_labels": num_classes, "ignore_mismatched_sizes": True} if new_head else {}
        model, info = auto.from_pretrained(where, local_files_only=local, output_loading_info=True, **kwargs)
        head = _head_name(model)
        missing = [k for k in info["missing_keys"] if not (new_head and head and k.startswith(head + "."))]
        if missing or (info["mismatched_keys"] and not new_head):
            raise ModelConfigError("{path}: the weights lack {count} tensors of the {kind} its config describes (e.g. "
                                   "{missing}); a base model without a classifier needs {num_classes} set to "
                                   "its number of classes (a fresh head) and fine-tuning", {"path": path, "num_classes": None}, count=len(missing),
                                   kind=type(model).__name__, missing=missing[:3])
        source = str(Path(where).resolve()) if is_folder else f"hf:{where}"
    net = HFClassifier(model.eval())
    net.preprocessing = hf_preprocessing(where, config, local)
    head = _head_name(model)
    if head is not None:
        net.head_name = f"model.{head}"
    if source is not None:
        net.weights_source = source  # a plain attribute: evaluate warns about nets without one
    return net.eval()


# -- preprocessing ---------------------------------------------------------------------------------
def _square(size: dict[str, int], what: str) -> int:
    if size.get("height") != size.get("width"):
        raise ModelConfigError(f"the model's image processor {what} is {size['height']}×{size['width']}; heatmapbench's "
                          "data modules crop squares")
    return int(size["height"])


def processor_preprocessing(processor: Any, channels: int = 3) -> Preprocessing:
    """What a transformers image processor does to an image, as a :class:`Preprocessing`.

    Resize (shorter side, or ``height × width``), centre crop, ``px · rescale_factor`` on 8-bit
    pixels (so ``value_range = (0, 255 · rescale_factor)``), then ``(px - image_mean) / image_std``.
    """
    name = type(processor).__name__
    for flag in ("do_flip_channel_order", "rescale_offset"):
        if getattr(processor, flag, False):
            raise ModelConfigError(f"the model's image processor {name} sets {flag}, which heatmapbench's preprocessing "
                              "cannot express; use another model")
    size = dict(processor.size) if getattr(processor, "do_resize", True) and processor.size else {}
    crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) and processor.crop_size else None
    if "height" in size:
        resize = image_size = _square(size, "size")
    elif "shortest_edge" in size:
        resize = image_size = int(size["shortest_edge"])
        if name.startswith("ConvNextImageProcessor") and resize < 384:
            # ConvNeXt's processor: resize to shortest_edge / crop_pct, crop shortest_edge (warp at >= 384)
            resize = int(image_size / processor.crop_pct)
        elif name.startswith("LevitImageProcessor"):
            resize = int((256 / 224) * image_size)  # Levit's own rule
    else:
        raise ModelConfigError(f"the model's image processor {name} has size={size}: heatmapbench reads height/width or "
                          "shortest_edge sizes only")
    if crop is not None:
        image_size = _square(crop, "crop_size")
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    top = 255.0 * float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 255.0
    return Preprocessing(mean, std, (0.0, top), image_size, max(resize, image_size), channels)


def hf_preprocessing(where: str, config: Any, local_files_only: bool = True) -> Preprocessing:
    """The preprocessing of the model at ``where``: its saved image processor, else its type's defaults.

    Without a saved processor the defaults of the model type's processor class are scaled to
    the config's ``image_size`` (the size the position embeddings were built for), with a warning.
    """
    transformers = _transformers()
    channels = int(getattr(config, "num_channels", 3))
    saved = Path(where, "preprocessor_config.json").is_file() if Path(where).is_dir() else True
    if saved:
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(where, use_fast=False,
                                                                        local_files_only=local_files_only)
            return processor_preprocessing(processor, channels)
        except OSError:  # a hub id without a cached processor file
            pass
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type) or (None,)
    cls = getattr(transformers, names[0]) if names[0] else None
    if cls is None:
        raise ModelConfigError(f"{where} has no preprocessor_config.json and transformers knows no image processor for "
                               f"{config.model_type!r}; save the image processor beside the model "
                               "(processor.save_pretrained(folder))")
    pre = processor_preprocessing(cls(), channels)
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if isinstance(size, int) and size != pre.image_size:
        pre = Preprocessing(pre.mean, pre.std, pre.value_range, size, round(size * pre.resize / pre.image_size),
                            pre.channels)
    warnings.warn(f"{where} has no preprocessor_config.json: using {cls.__name__}'s defaults at the config's size "
                  f"(resize {pre.resize}, crop {pre.image_size}, mean {list(pre.mean)}, std {list(pre.std)}); save the "
                  "model's image processor beside it (processor.save_pretrained(folder)) to use its own", stacklevel=2)
    return pre
