"""Names of explainers and perturbations, and the objects they stand for.

A name is resolved once, where it enters (a CLI's config, ``get_explainer``, the ``explainers``
or ``perturbation`` argument of the Python API); everything below that works with objects.
A name is found, in this order, among

1. classes registered from Python: ``register_explainer("mine", MyExplainer, alpha=2)``;
2. the YAML files ``<dir>/<group>/<name>.yaml`` (with a ``_target_``) of the user's config
   folders: those added with :func:`add_config_dir` and, inside a Hydra command, those on its
   search path (``heatmapbench-evaluate hydra.searchpath=[file:///my/conf] explainer=mine``);
3. the package's catalogue, in Python: :data:`heatmapbench.explain.presets.EXPLAINERS` and
   :data:`heatmapbench.perturbation.presets.PERTURBATIONS` (each name a class and its parameters,
   as Zennit's ``COMPOSITES``). Building one of them reads no file.

So a new explainer or perturbation needs no edit of the package. The package's own YAML files
(``conf/explainer``, ``conf/perturbation``) are the commands' face of the catalogue
(``explainer=<name>``, ``perturbation=<name>``); a test keeps each equal to its Python entry.
"""

from __future__ import annotations

import importlib
import importlib.resources
from functools import partial
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

#: The config groups whose entries are objects built by name.
GROUPS = ("explainer", "perturbation")

_PACKAGE = Path(__file__).resolve().parent
_REGISTERED: dict[str, dict[str, tuple[Callable[..., Any], dict[str, Any]]]] = {g: {} for g in GROUPS}
_USER_DIRS: list[Path] = []


# -- where the configs are -----------------------------------------------------------------
def conf_dir() -> Path:
    """The package's own configs, ``heatmapbench/conf`` (in a checkout: ``src/heatmapbench/conf``)."""
    return _PACKAGE / "conf"


def in_checkout() -> bool:
    """Whether the package runs from a repository checkout (``src/`` layout, editable or PYTHONPATH)."""
    return _PACKAGE.parent.name == "src" and (_PACKAGE.parent.parent / "pyproject.toml").is_file()


def project_root() -> Path:
    """Where data, outputs and the MLflow store go by default (``paths.root_dir``).

    In a repository checkout: the repository (``<repo>/mlruns``, ``<repo>/outputs``), as the
    Makefile and the README expect. Installed: the working directory (``./mlruns``,
    ``./outputs``), as MLflow and Hydra users expect.
    """
    return _PACKAGE.parent.parent if in_checkout() else Path.cwd()


def add_config_dir(path: str | Path) -> None:
    """Look up names also in ``<path>/<group>/<name>.yaml`` (before the package's own catalogue)."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"config folder {path!r} does not exist")
    if folder not in _USER_DIRS:
        _USER_DIRS.insert(0, folder)


def _hydra_search_dirs() -> list[Path]:
    """The folders the running Hydra command was given with ``hydra.searchpath``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        entries = list(HydraConfig.get().searchpath)
    except Exception:  # noqa: BLE001  (no Hydra command running)
        return []
    dirs = []
    for entry in entries:
        entry = str(entry)
        if entry.startswith("pkg://"):
            try:
                dirs.append(Path(str(importlib.resources.files(entry[len("pkg://"):].replace("/", ".")))))
            except (ModuleNotFoundError, TypeError):
                continue
        else:
            dirs.append(Path(entry[len("file://"):] if entry.startswith("file://") else entry))
    return [d for d in dirs if d.is_dir() and d != conf_dir()]


def user_config_dirs() -> list[Path]:
    """The user's folders searched for ``<group>/<name>.yaml``, first match wins."""
    return [*_USER_DIRS, *_hydra_search_dirs()]


# -- the package's catalogue ------------------------------------------------------------------
def catalogue(group: str) -> dict[str, partial]:
    """The package's own names of ``group``: name -> the class with its parameters bound."""
    if group == "explainer":
        from heatmapbench.explain.presets import EXPLAINERS

        return EXPLAINERS
    if group == "perturbation":
        from heatmapbench.perturbation.presets import PERTURBATIONS

        return PERTURBATIONS
    raise ValueError(f"group={group!r} is invalid: choose one of {GROUPS}")


def class_path(cls: type) -> str:
    """The shortest import path that names ``cls`` (``heatmapbench.perturbation.Road``, not
    ``heatmapbench.perturbation.road.Road``): the ``_target_`` a config writes for it."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = importlib.import_module(".".join(parts[:end]))
        if getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def preset_config(preset: partial) -> DictConfig:
    """A catalogue entry as the config node that builds it: ``{_target_: <class>, **parameters}``."""
    return OmegaConf.create({"_target_": class_path(preset.func), **preset.keywords})


# -- registering from Python ------------------------------------------------------------------
def register(group: str, name: str, factory: Callable[..., Any], **defaults: Any) -> None:
    """Make ``name`` build ``factory(**defaults, **overrides)`` in ``group`` (explainer, perturbation)."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is invalid: choose one of {GROUPS}")
    if not callable(factory):
        raise TypeError(f"register({group!r}, {name!r}, ...) needs a class or callable, got {factory!r}")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name={name!r} is invalid: a non-empty name without '/'")
    _REGISTERED[group][name] = (factory, dict(defaults))


def unregister(group: str, name: str) -> None:
    """Forget a name registered from Python (the package's catalogue and config files are not affected)."""
    _REGISTERED[group].pop(name, None)


def register_explainer(name: str, factory: Callable[..., Any], **defaults: Any) -> None:
    """Register an :class:`~heatmapbench.explain.Explainer` class (or factory) under ``name``."""
    register("explainer", name, factory, **defaults)


def register_perturbation(name: str, factory: Callable[..., Any], **defaults: Any) -> None:
    """Register a :class:`~heatmapbench.perturbation.Perturbation` class (or factory) under ``name``."""
    register("perturbation", name, factory, **defaults)


# -- looking names up --------------------------------------------------------------------------
def _user_yaml(group: str, name: str) -> Path | None:
    for folder in user_config_dirs():
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def available(group: str) -> list[str]:
    """Every name of ``group``, sorted.

    For ``explainer`` and ``perturbation``: the package's catalogue, names registered from Python
    and the YAML files of the user's config folders (the package's own folders are not read). For
    the commands' other groups (``model``, ``data``, ...): the YAML files of ``conf/<group>`` and
    of the user's folders; files named ``_*.yaml`` are shared bases of the others
    (e.g. ``model/_torchvision.yaml``), not choices.
    """
    folders = user_config_dirs()
    if group in GROUPS:
        names = set(catalogue(group)) | set(_REGISTERED[group])
    else:
        names, folders = set(), [*folders, conf_dir()]
    for folder in folders:
        names.update(p.name[: -len(".yaml")] for p in (folder / group).glob("*.yaml") if not p.name.startswith("_"))
    return sorted(names)


def _unknown(group: str, name: str) -> ValueError:
    return ValueError(
        f"Unknown {group} {name!r}. Known {group} names: {', '.join(available(group))}. Register a new one "
        f"with heatmapbench.registry.register_{group}(name, cls) or a {group}/{name}.yaml file (with "
        f"_target_) in a folder on Hydra's search path (hydra.searchpath=[file:///path/to/conf]).")


def _user_config(group: str, name: str, chain: tuple[str, ...] = ()) -> DictConfig:
    """A user's ``<group>/<name>.yaml`` over its defaults list, whose entries name other configs of
    the group (the user's own files or the package's catalogue); ``_self_`` places the file itself
    (by default last, as in Hydra)."""
    if name in chain:
        raise ValueError(f"{group}/{name}.yaml: its defaults list includes itself ({' → '.join(chain + (name,))})")
    path = _user_yaml(group, name)
    if path is None:
        if name not in catalogue(group):
            raise _unknown(group, name)
        return preset_config(catalogue(group)[name])
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", None) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    cfg = OmegaConf.create()
    for entry in defaults:
        if not isinstance(entry, str):
            raise ValueError(f"{path}: defaults entry {entry!r} is not supported here; name a config of the "
                             f"{group!r} group (or _self_)")
        cfg = OmegaConf.merge(cfg, own if entry == "_self_" else _user_config(group, entry, chain + (name,)))
    return cfg


def load_config(group: str, name: str, **overrides: Any) -> DictConfig:
    """The config node ``name`` stands for in ``group`` (``{_target_: ..., **parameters}``), merged
    with ``overrides``: a user's YAML file (over its defaults list) or the package's catalogue entry.

    Unknown names raise ``ValueError`` listing the known ones.
    """
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is invalid: choose one of {GROUPS} (the commands' other groups "
                         "are composed by Hydra: hydra.compose)")
    cfg = _user_config(group, name)
    return OmegaConf.merge(cfg, OmegaConf.create(overrides)) if overrides else cfg


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides``, mappings merged key by key (as a config override merges them:
    ``attribute_kwargs={"n_steps": 8}`` keeps the preset's other ``attribute_kwargs``)."""
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _built(value: Any) -> Any:
    """An override given as a config node (a mapping with ``_target_``, e.g. ``method={"_target_":
    "captum.attr.InputXGradient", "_partial_": True}``) built as Hydra builds it; other values as given."""
    if isinstance(value, (dict, DictConfig)) and "_target_" in value:
        from hydra.utils import instantiate

        return instantiate(value, _convert_="all")
    return value


def build(group: str, name: str, **overrides: Any) -> Any:
    """The object ``name`` stands for in ``group``, with ``overrides`` of its parameters applied."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is invalid: choose one of {GROUPS}")
    if name in _REGISTERED[group]:
        factory, defaults = _REGISTERED[group][name]
        return factory(**{**defaults, **overrides})
    if _user_yaml(group, name) is not None:
        from hydra.utils import instantiate

        return instantiate(load_config(group, name, **overrides), _convert_="all")
    preset = catalogue(group).get(name)
    if preset is None:
        raise _unknown(group, name)
    return preset.func(**_merged(preset.keywords, {key: _built(value) for key, value in overrides.items()}))


def resolve(group: str, spec: Any, kind: type, **overrides: Any) -> Any:
    """``spec`` if it is already a ``kind``, else the ``kind`` its name builds (with ``overrides``)."""
    what = f"{'an' if kind.__name__[0] in 'AEIOU' else 'a'} {kind.__name__}"
    if isinstance(spec, kind):
        if overrides:
            raise TypeError(f"overrides apply to {group} names, not to {what} instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{group} must be a name or {what}, got {type(spec).__name__}")
    obj = build(group, spec, **overrides)
    if not isinstance(obj, kind):
        raise TypeError(f"{group} {spec!r} builds {type(obj).__name__}, not {what}")
    return obj
