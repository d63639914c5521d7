"""Structured-config schemas for the groups heatmapbench owns.

The YAML files of these groups list their schema first in their defaults list, so a
mistyped key or a value of the wrong type fails while Hydra composes the config. Ranges
are checked by ``validate`` (``__post_init__`` runs when the node is turned into its
dataclass), before any data is read or any MLflow run exists.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import re
import secrets
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from heatmapbench.callbacks import AOPCCallback
from heatmapbench.data import FashionMNISTDataModule, ImageFolderDataModule, ImageNetSamplesDataModule
from heatmapbench.data.base import DataNotFoundError, check_loader_args, check_normalisation
from heatmapbench.data.imagefolder import check_val_fraction
from heatmapbench.errors import ArgumentError
from heatmapbench.evaluation.settings import EvaluationSettings
from heatmapbench.models import ClassifierModule, SmallCNN, SmallViT, VGGSmall, hf_models, timm_models, zoo
from heatmapbench.models.classifier import FINE_TUNING
from heatmapbench.perturbation.presets import PERTURBATIONS
from heatmapbench.registry import available, class_path, project_root
from heatmapbench.roar.removal import METHODS as ROAR_METHODS
from heatmapbench.sanity.randomisation import MODES as RANDOMISATION_MODES
from heatmapbench.sanity.similarity import SIMILARITIES


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


def config_error(key: str, err: Exception) -> ConfigError:
    """A library's error about one of its arguments (``epsilon=-1 is invalid: ...``) as the config key
    that set it (``explainer.epsilon=-1 is invalid: ...``); other messages follow ``<key>: ``, one that
    already names the key is kept as it is, and one that carries its arguments
    (:class:`~heatmapbench.errors.ArgumentError`) names the keys wherever it names an argument
    (``pass data.download=true``)."""
    if isinstance(err, ArgumentError):  # the message names its arguments: as the keys
        return ConfigError(str(err.in_group(key)))
    text = " ".join(str(err).split())
    if text.startswith((f"{key}.", f"{key}:")):
        return ConfigError(text)
    return ConfigError(f"{key}.{text}" if re.match(r"[a-z_][a-z0-9_]*(=| is )", text) else f"{key}: {text}")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {what}")


_OMEGACONF_TYPES = (bool, int, float, str)


def _field_type(hint: Any) -> Any:
    """``hint`` where OmegaConf can hold it (bool, int, float, str, a list of one of them, or any of
    these or None), else ``Any``."""
    if hint in _OMEGACONF_TYPES:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = _field_type(rest[0]) if len(rest) == 1 else Any
        return Any if inner is Any else Optional[inner]
    if origin in (list, tuple, collections.abc.Sequence) and args:
        items = {a for a in args if a is not Ellipsis}
        if len(items) == 1 and next(iter(items)) in _OMEGACONF_TYPES:
            return list[next(iter(items))]
    return Any


def _field_default(value: Any, typed: bool) -> Any:
    if value is inspect.Parameter.empty:
        return field(default=MISSING if typed else None)
    if value is None or isinstance(value, _OMEGACONF_TYPES):
        return field(default=value)
    if not typed:
        return field(default=None)
    if isinstance(value, (list, tuple)):
        return field(default_factory=lambda value=value: list(value))
    if isinstance(value, dict):
        return field(default_factory=lambda value=value: dict(value))
    raise TypeError(f"default {value!r} cannot be a config value")


def _initialisers(built: Any) -> list[Any]:
    """The callables whose signatures a config of ``built`` fills: a function itself; a class's ``__init__``
    and, along its MRO, its bases' (read while each passes ``**kwargs`` on)."""
    if not inspect.isclass(built):
        return [built]
    return [klass.__dict__["__init__"] for klass in built.__mro__
            if klass is not object and "__init__" in klass.__dict__]


def signature_schema(cls: Any, name: str, *, defaults: dict[str, Any] | None = None, typed: bool = True,
                     target: str | None = None, skip: tuple[str, ...] = (), bases: tuple[type, ...] = ()) -> type:
    """The schema of a config that builds ``cls`` (a class or a function), read from its signature: one
    field per keyword argument of the function or of the class's ``__init__`` (and, through ``**kwargs``,
    of its bases'), with the signature's default (``???`` where it has none; ``defaults`` replace some)
    and ``_target_`` the class or function (or ``target``); the arguments in ``skip`` are left out (the
    config does not set them).

    Each default is declared once, in Python; the YAML files typed by such a schema set only what
    differs. Fields are typed by their annotations where OmegaConf can hold them, else ``Any``
    (``typed=False``: all ``Any``, for annotations OmegaConf cannot hold, such as Lightning's unions;
    a default that is no config value then reads null).
    """
    defaults = defaults or {}
    target = class_path(cls) if target is None else target
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=target))]
    for init in _initialisers(cls):
        try:
            hints = typing.get_type_hints(init) if typed else {}
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: that field is Any
            hints = {}
        more = False
        for key, param in inspect.signature(init).parameters.items():
            if param.kind is param.VAR_KEYWORD:
                more = True
            if key == "self" or key in skip or key in {f[0] for f in fields} or param.kind not in (
                    param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                continue
            default = defaults.get(key, param.default)
            fields.append((key, _field_type(hints.get(key)) if typed else Any, _field_default(default, typed)))
        if not more:
            break
    return make_dataclass(name, fields, bases=bases)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    mlruns_dir: str = MISSING


class _DataChecks:
    """Ranges of the data arguments, checked by the data modules' own functions
    (:func:`heatmapbench.data.base.check_loader_args`, :func:`~heatmapbench.data.base.check_normalisation`)
    when the config is validated: before any data is read."""

    def __post_init__(self) -> None:
        try:
            check_loader_args(self.batch_size, self.num_workers, getattr(self, "val_size", 0), self.eval_subset_size,
                              getattr(self, "train_size", None))
            check_normalisation(getattr(self, "mean", None), getattr(self, "std", None),
                                getattr(self, "value_range", None))
        except ValueError as err:
            raise config_error("data", err) from None


class _ImageFolderChecks(_DataChecks):
    def __post_init__(self) -> None:
        try:
            ImageFolderDataModule.check_folder(self.path)
            check_val_fraction(self.val_fraction)
        except (ValueError, DataNotFoundError) as err:
            raise config_error("data", err) from None
        super().__post_init__()


# The data groups' schemas, read from the data modules' signatures: each default is declared once,
# in the module, and the YAML files set only what differs (imagefolder: batch_size 32).
#: MNIST, Fashion-MNIST, CIFAR-10 (one signature; each file names its class).
TorchvisionDataConfig = signature_schema(FashionMNISTDataModule, "TorchvisionDataConfig", target=MISSING,
                                         bases=(_DataChecks,))
#: ``channels`` is left out: the images are RGB, and only keys the data config has take a model's preprocessing.
ImageFolderDataConfig = signature_schema(ImageFolderDataModule, "ImageFolderDataConfig",
                                         skip=("data_dir", "channels"), bases=(_ImageFolderChecks,))
ImageNetSamplesDataConfig = signature_schema(ImageNetSamplesDataModule, "ImageNetSamplesDataConfig",
                                             skip=("channels", "val_size", "train_size"), bases=(_DataChecks,))


class _TrainerChecks:
    """Ranges of the Trainer arguments heatmapbench relies on; the rest Lightning checks itself."""

    def __post_init__(self) -> None:
        def integer(key: str, low: int, none_ok: bool = True) -> None:
            value = getattr(self, key)
            ok = (value is None and none_ok) or (isinstance(value, int) and not isinstance(value, bool)
                                                 and value >= low)
            _require(ok, f"trainer.{key}", value, f"must be an integer >= {low}")

        integer("max_epochs", 1, none_ok=False)  # training runs a fixed number of epochs
        integer("num_nodes", 1, none_ok=False)
        integer("accumulate_grad_batches", 1, none_ok=False)
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            value = getattr(self, key)
            _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                       and value >= 0), f"trainer.{key}", value, "must be a number >= 0")


def _trainer_schema() -> type:
    """The schema of the ``trainer`` group, read from ``pytorch_lightning.Trainer``'s signature.

    Its keys and defaults are Lightning's own (a typo fails while Hydra composes); the YAML files
    set only what heatmapbench changes. Values are typed ``Any``: Lightning's annotations are
    unions OmegaConf cannot hold; :class:`_TrainerChecks` checks the ranges that matter here.
    """
    import pytorch_lightning as pl

    return signature_schema(pl.Trainer, "TrainerConfig", typed=False, bases=(_TrainerChecks,))


TrainerConfig = _trainer_schema()


@dataclass
class MLflowLoggerConfig:
    _target_: str = "pytorch_lightning.loggers.MLFlowLogger"
    experiment_name: str = "heatmapbench"
    run_name: Optional[str] = None
    # continue this run (heatmapbench-train resuming from ckpt_path; the checkpoint records it)
    run_id: Optional[str] = None
    tracking_uri: str = MISSING
    artifact_location: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    log_model: bool = False
    prefix: str = ""
    save_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _require(bool(self.experiment_name), "logger.experiment_name", self.experiment_name,
                 "must be a non-empty name")
        scheme = self.tracking_uri.split(":", 1)[0]
        _require(scheme in ("sqlite", "http", "https", "postgresql", "mysql", "databricks", "file"),
                 "logger.tracking_uri", self.tracking_uri,
                 "use sqlite:///<path>/mlflow.db (default) or http://host:port of an MLflow server")


@dataclass
class SanitySettings:
    """The model-randomisation test run beside an evaluation, on its explainers and first images.

    Parameters
    ----------
    modes
        ``cascading`` (output layer down, Adebayo et al. Fig. 2) and/or ``independent``.
    measures
        Similarities to the trained model's heatmap (:data:`~heatmapbench.sanity.similarity.SIMILARITIES`).
    num_images
        The first images of the evaluated set that are explained at every step.
    max_steps
        At most this many randomisation steps per mode, evenly spaced (the output layer's and the
        last always kept); null: one per layer.
    topk, ssim_window
        Fraction of locations of the top-k intersection; SSIM window (odd).
    seed
        Seed of the re-initialisation (every layer is reset after seeding with it).
    batch_size
        Images per explainer call; null: all ``num_images`` at once.
    gallery_size
        Images shown in the heatmap grid.
    """

    modes: list[str] = field(default_factory=lambda: ["cascading", "independent"])
    measures: list[str] = field(default_factory=lambda: list(SIMILARITIES))
    num_images: int = 16
    max_steps: Optional[int] = None
    topk: float = 0.1
    ssim_window: int = 7
    seed: int = 42
    batch_size: Optional[int] = None
    gallery_size: int = 2

    def __post_init__(self) -> None:
        self.modes, self.measures = list(self.modes), list(self.measures)
        bad = [m for m in self.modes if m not in RANDOMISATION_MODES]
        if bad or not self.modes:
            raise ConfigError(f"sanity.modes={self.modes} is invalid: choose from {list(RANDOMISATION_MODES)}")
        bad = [m for m in self.measures if m not in SIMILARITIES]
        if bad or not self.measures:
            raise ConfigError(f"sanity.measures={self.measures} is invalid: choose from {list(SIMILARITIES)}")
        if self.num_images < 1:
            raise ConfigError(f"sanity.num_images={self.num_images} is invalid: must be >= 1")
        if self.max_steps is not None and self.max_steps < 2:
            raise ConfigError(f"sanity.max_steps={self.max_steps} is invalid: must be >= 2 or null (every layer)")
        if not 0 < self.topk <= 1:
            raise ConfigError(f"sanity.topk={self.topk} is invalid: a fraction of the locations in (0, 1]")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ConfigError(f"sanity.ssim_window={self.ssim_window} is invalid: an odd number >= 3")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"sanity.batch_size={self.batch_size} is invalid: must be >= 1 or null")
        if self.gallery_size < 0:
            raise ConfigError(f"sanity.gallery_size={self.gallery_size} is invalid: must be >= 0")


@dataclass
class RoarSettings:
    """The ``roar`` node of ``heatmapbench-roar`` (ROAR and KAR, Hooker et al. 2019), checked before any work.

    The one source of these defaults: ``conf/roar.yaml`` lists this schema as ``roar_schema@roar`` and
    sets only ``explainers`` (required here) and ``cache_dir`` (rooted at ``paths.root_dir`` there).

    Parameters
    ----------
    explainers
        The explainers whose heatmaps decide what is removed (names of the explainer catalogue).
    baseline
        The random ranking every explainer is compared with (an explainer name; null: none).
    methods
        ``roar`` (remove the top-t locations of each heatmap) and/or ``kar`` (keep them: remove the bottom-t).
    fractions
        The fractions t of the locations removed, each in (0, 1].
    seeds
        Each retraining runs once per seed (model init, data order); >= 2 show the spread.
    fill
        ``train_mean``: the per-channel mean of the training images (Hooker et al.); or a perturbation
        of the engine: uniform, mean, constant, blur, road (noisy linear imputation).
    heatmap_batch_size
        Images per explainer call when the heatmaps of the whole data set are computed.
    explained_seed
        Seed of the explained model when ckpt_path is null (its retraining is also the unmodified one
        of this seed).
    roar_id
        Parent run id tag; null: a hash of model, data, trainer, fill and explained weights.
    cache_dir
        Explained model and heatmaps per roar_id, kept for resuming.
    """

    explainers: list[str]
    baseline: Optional[str] = "random"
    methods: list[str] = field(default_factory=lambda: ["roar", "kar"])
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    fill: str = "train_mean"
    heatmap_batch_size: int = 256
    explained_seed: int = 0
    roar_id: Optional[str] = None
    cache_dir: str = "outputs/roar"

    def __post_init__(self) -> None:
        known = available("explainer")
        names = list(self.explainers) + ([self.baseline] if self.baseline else [])
        unknown = [n for n in names if n not in known]
        if unknown or not self.explainers:
            raise ConfigError(f"roar.explainers={list(self.explainers)} is invalid: name known explainers "
                              f"({', '.join(known)}); unknown: {unknown}")
        if not self.methods or any(m not in ROAR_METHODS for m in self.methods):
            raise ConfigError(f"roar.methods={list(self.methods)} is invalid: choose from {list(ROAR_METHODS)}")
        if not self.fractions or any(not 0 < t <= 1 for t in self.fractions):
            raise ConfigError(f"roar.fractions={list(self.fractions)} is invalid: fractions in (0, 1]")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"roar.seeds={list(self.seeds)} is invalid: one or more distinct seeds")
        if self.fill != "train_mean" and self.fill not in available("perturbation"):
            raise ConfigError(f"roar.fill={self.fill!r} is invalid: train_mean (Hooker et al.) or a perturbation: "
                              f"{', '.join(available('perturbation'))}")
        if self.heatmap_batch_size < 1:
            raise ConfigError(f"roar.heatmap_batch_size={self.heatmap_batch_size} is invalid: must be >= 1")

    @property
    def all_explainers(self) -> list[str]:
        return list(dict.fromkeys(list(self.explainers) + ([self.baseline] if self.baseline else [])))


#: ``model/net``: the network builders, by schema name, with the arguments no model config sets. Each model
#: YAML lists its builder's schema (``- net: small_cnn_schema``), so the builder's defaults are declared once,
#: in its signature, and a mistyped key fails at composition. The arguments left out are architecture sizes
#: no model config sets (and ``from_checkpoint``'s ``prefix``): they stay out of the composed config, so its
#: logged params and roar ids keep their keys, and a command line adds them as before (``+model.net.width=64``).
NET_BUILDERS: dict[str, tuple[Any, tuple[str, ...]]] = {
    **{f"{name}_schema": (getattr(zoo, name), ("transform_input",) if name == "googlenet" else ())
       for name in ("alexnet", "vgg16", "resnet50", "googlenet", "vit_b_16", "swin_t", "convnext_tiny")},
    "efficientnet_lite0_schema": (zoo.efficientnet_lite0, ()),
    "from_checkpoint_schema": (zoo.from_checkpoint, ("prefix",)),
    "hf_model_schema": (hf_models.hf_model, ()),
    "timm_model_schema": (timm_models.timm_model, ()),
    "small_cnn_schema": (SmallCNN, ("width", "hidden", "dropout", "image_size")),
    "vgg_small_schema": (VGGSmall, ("width", "hidden", "dropout", "batch_norm", "image_size")),
    "small_vit_schema": (SmallViT, ("image_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "dropout")),
}


#: group -> (schema name, dataclass); the group "" holds the root configs' own blocks (``roar_schema@roar``)
SCHEMAS: dict[str, dict[str, type]] = {
    "": {"roar_schema": RoarSettings},
    "paths": {"paths_schema": PathsConfig},
    "data": {"torchvision_data_schema": TorchvisionDataConfig,
             "imagefolder_data_schema": ImageFolderDataConfig,
             "imagenet_samples_data_schema": ImageNetSamplesDataConfig},
    # ClassifierModule's arguments (net, optimizer, scheduler: any node; the network's keys are its builder's); the
    # fine-tuning ones only for pretrained nets: ClassifierModule refuses them for a net that names no head
    "model": {"classifier_schema": signature_schema(ClassifierModule, "ClassifierModuleConfig", skip=FINE_TUNING),
              "finetune_classifier_schema": signature_schema(ClassifierModule, "FineTuneClassifierModuleConfig")},
    # their networks' (model.net): each builder's arguments; a user's own net config names no schema and stays Any
    "model/net": {name: signature_schema(builder, f"{builder.__name__}NetConfig", skip=skip)
                  for name, (builder, skip) in NET_BUILDERS.items()},
    "trainer": {"trainer_schema": TrainerConfig},
    "logger": {"mlflow_logger_schema": MLflowLoggerConfig},
    "evaluation": {"evaluation_schema": EvaluationSettings},
    "sanity": {"sanity_schema": SanitySettings},
    # read from signatures: each perturbation of the catalogue (with what its entry binds), the AOPC callback
    "perturbation": {f"{name}_schema": signature_schema(preset.func, f"{preset.func.__name__}Config",
                                                        defaults=preset.keywords)
                     for name, preset in PERTURBATIONS.items()},
    "callbacks": {"aopc_schema": signature_schema(AOPCCallback, "AOPCCallbackConfig")},
}


def left_out_by(schema: Any) -> tuple[str, tuple[str, ...]]:
    """``(builder, arguments)``: the builder of a ``model/net`` schema and the arguments it leaves out
    (:data:`NET_BUILDERS`); ``("", ())`` for any other schema."""
    for name, (builder, skip) in NET_BUILDERS.items():
        if SCHEMAS["model/net"][name] is schema:
            return class_path(builder), skip
    return "", ()


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (group/name), once per process."""
    cs = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group or None, name=name, node=node)


def not_a_setting(full_key: str, keys: list[str]) -> str:
    """The line for ``full_key`` that its node's schema (``keys``) does not hold: the nearest key, else
    every key; one wording whether Hydra refused it while composing or :func:`validate` found it added with +."""
    parent, _, key = full_key.rpartition(".")
    near = difflib.get_close_matches(key, keys, n=1)
    hint = (f"did you mean {full_key[:len(full_key) - len(key)]}{near[0]}?" if near
            else f"its keys are {', '.join(k for k in keys if k != '_target_')}")
    return f"{full_key} is not a setting of {parent or 'the config'}: {hint}"


def validate(cfg: DictConfig, groups: tuple[str, ...] = ("paths", "data", "trainer", "logger", "evaluation")) -> None:
    """Check types and ranges of every typed group in ``cfg``; raise ``ConfigError`` on the first problem."""
    for group in groups:
        node = cfg.get(group)
        if node is None or not isinstance(node, DictConfig):
            continue
        if OmegaConf.get_type(node) is dict:
            continue  # a user's own config without a schema: nothing to check here
        keys = [f.name for f in dataclasses.fields(OmegaConf.get_type(node))]
        extra = [k for k in node.keys() if k not in keys]  # added with +group.key=..., which Hydra lets through
        if extra:
            raise ConfigError(not_a_setting(f"{group}.{extra[0]}", keys))
        missing = sorted(k for k in node.keys() if OmegaConf.is_missing(node, k))
        if missing:
            raise ConfigError(f"{group}.{missing[0]} is required but not set; pass {group}.{missing[0]}=...")
        try:
            OmegaConf.to_object(node)
        except ConfigError:
            raise
        except ValueError as err:  # a library class's check of its own argument, or omegaconf's (with the key)
            raise config_error(group, err) from None
        except Exception as err:  # noqa: BLE001 - omegaconf validation errors carry the key
            raise ConfigError(f"{group}: {err}") from err


def root_dir() -> str:
    """``paths.root_dir``: the repository in a checkout, the working directory when installed."""
    return str(project_root())


def steps_that_fit(steps: int, region_size: int, height: int, width: int | None = None) -> int:
    """``min(steps, regions)``: the paper's L where the image has that many grid regions, else all
    of them; a sweep over region sizes then runs (32-px regions of a 224-px image: 49 steps)."""
    from heatmapbench.perturbation.regions import max_regions

    return min(int(steps), max_regions(int(height), int(width if width is not None else height), int(region_size),
                                       "grid"))


@functools.lru_cache(maxsize=None)
def unique_suffix() -> str:
    """Four hex digits drawn once per process: run folders named to the second stay apart when several
    runs start in the same second (on one machine or several sharing a file system)."""
    return secrets.token_hex(2)


if not OmegaConf.has_resolver("hb_unique"):
    OmegaConf.register_new_resolver("hb_unique", unique_suffix)
if not OmegaConf.has_resolver("hb_root"):
    OmegaConf.register_new_resolver("hb_root", root_dir)
if not OmegaConf.has_resolver("hb_steps_that_fit"):
    OmegaConf.register_new_resolver("hb_steps_that_fit", steps_that_fit)

register_configs()
