"""Names of explainers and perturbations, and the objects they stand for.

A name is resolved once, where it enters (a CLI's config, ``get_explainer``, the ``explainers``
or ``perturbation`` argument of the Python API); everything below that works with objects.
A name is found, in this order, among

1. classes registered from Python: ``register_explainer("mine", MyExplainer, alpha=2)``;
2. the YAML files ``<dir>/<group>/<name>.yaml`` (with a ``_target_``) of every user config
   folder: those added with :func:`add_config_dir` and, inside a Hydra command, those on its
   search path (``heatmapbench-evaluate hydra.searchpath=[file:///my/conf] explainer=mine``);
3. the package's own ``conf/`` (:func:`conf_dir`).

So a new explainer or perturbation needs no edit of the package.
"""

from __future__ import annotations

import importlib.resources
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
    """Look up names also in ``<path>/<group>/<name>.yaml`` (before the package's own configs)."""
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
    return [d for d in dirs if d.is_dir()]


def config_dirs() -> list[Path]:
    """Every folder searched for ``<group>/<name>.yaml``, first match wins."""
    return [*_USER_DIRS, *_hydra_search_dirs(), conf_dir()]


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
    """Forget a name registered from Python (configs on disk are not affected)."""
    _REGISTERED[group].pop(name, None)


def register_explainer(name: str, factory: Callable[..., Any], **defaults: Any) -> None:
    """Register an :class:`~heatmapbench.explain.Explainer` class (or factory) under ``name``."""
    register("explainer", name, factory, **defaults)


def register_perturbation(name: str, factory: Callable[..., Any], **defaults: Any) -> None:
    """Register a :class:`~heatmapbench.perturbation.Perturbation` class (or factory) under ``name``."""
    register("perturbation", name, factory, **defaults)


# -- looking names up --------------------------------------------------------------------------
def _yaml_path(group: str, name: str) -> Path | None:
    for folder in config_dirs():
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def available(group: str) -> list[str]:
    """Every name of ``group``: registered from Python or a YAML file in a config folder; sorted.

    Files named ``_*.yaml`` are shared bases of the others (e.g. ``model/_torchvision.yaml``), not choices.
    """
    names = set(_REGISTERED.get(group, {}))
    for folder in config_dirs():
        names.update(p.name[: -len(".yaml")] for p in (folder / group).glob("*.yaml") if not p.name.startswith("_"))
    return sorted(names)


def _unknown(group: str, name: str) -> ValueError:
    return ValueError(
        f"Unknown {group} {name!r}. Known {group} names: {', '.join(available(group))}. Register a new one "
        f"with heatmapbench.registry.register_{group}(name, cls) or a {group}/{name}.yaml file (with "
        f"_target_) in a folder on Hydra's search path (hydra.searchpath=[file:///path/to/conf]).")


def _compose(group: str, name: str, chain: tuple[str, ...] = ()) -> DictConfig:
    """``<group>/<name>.yaml`` over its defaults list, as Hydra composes a group option.

    A defaults entry names a config of the same group: another YAML file (a shared base such as
    ``model/_torchvision.yaml``) or a schema in Hydra's ConfigStore; ``_self_`` places the file
    itself (by default last, as in Hydra).
    """
    if name in chain:
        raise ValueError(f"{group}/{name}.yaml: its defaults list includes itself ({' → '.join(chain + (name,))})")
    path = _yaml_path(group, name)
    if path is None:
        from hydra.core.config_store import ConfigStore

        stored = ConfigStore.instance().repo.get(group, {}).get(f"{name}.yaml")
        if stored is None:
            raise _unknown(group, name)
        return OmegaConf.structured(stored.node)
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", None) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    cfg = OmegaConf.create()
    for entry in defaults:
        if not isinstance(entry, str):
            raise ValueError(f"{path}: defaults entry {entry!r} is not supported here; name a config of the "
                             f"{group!r} group (or _self_)")
        part = own if entry == "_self_" else _compose(group, entry, chain + (name,))
        cfg = OmegaConf.merge(cfg, part)
    return cfg


def load_config(group: str, name: str, **overrides: Any) -> DictConfig:
    """The config ``<group>/<name>.yaml`` (over its defaults list) merged with ``overrides``.

    Unknown names raise ``ValueError`` listing the known ones.
    """
    if _yaml_path(group, name) is None:
        raise _unknown(group, name)
    cfg = _compose(group, name)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return cfg


def build(group: str, name: str, **overrides: Any) -> Any:
    """The object ``name`` stands for in ``group``, with ``overrides`` of its parameters applied."""
    if name in _REGISTERED.get(group, {}):
        factory, defaults = _REGISTERED[group][name]
        return factory(**{**defaults, **overrides})
    from hydra.utils import instantiate

    return instantiate(load_config(group, name, **overrides), _convert_="all")


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
