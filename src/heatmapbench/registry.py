"""Build objects by name from the YAML files of a config group (``conf/<group>/<name>.yaml``).

A new explainer or perturbation is a small class plus one YAML file with ``_target_``;
nothing here needs to change for it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The project's ``conf/`` directory (the package is installed editable from the repo)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "conf"
        if (candidate / "train.yaml").is_file() or (candidate / "explainer").is_dir():
            return candidate
    raise FileNotFoundError(
        f"Could not find heatmapbench's conf/ directory above {here}. "
        "Install the project from its repository with `pip install -e .`."
    )


def available(group: str) -> list[str]:
    """Names of the configs in ``conf/<group>/`` (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(".yaml")] for p in (conf_dir() / group).glob("*.yaml"))


def load_config(group: str, name: str, **overrides: Any) -> DictConfig:
    """Load ``conf/<group>/<name>.yaml`` merged with ``overrides``; unknown names list the known ones."""
    known = available(group)
    if name not in known:
        raise ValueError(
            f"Unknown {group} {name!r}. Known {group} names: {', '.join(known)}. "
            f"Add conf/{group}/{name}.yaml to register a new one."
        )
    path = conf_dir() / group / f"{name}.yaml"
    cfg = OmegaConf.create(_parsed(str(path), path.stat().st_mtime_ns))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return cfg


@functools.lru_cache(maxsize=256)
def _parsed(path: str, mtime_ns: int) -> dict:
    """A YAML file as a plain container, parsed once per version of the file (the engine
    resolves its perturbation by name on every call; parsing costs ~0.5 ms)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, list) and all(_plain(t) for t in v))


@functools.lru_cache(maxsize=256)
def _callable(target: str) -> Any:
    return get_object(target)


def build(group: str, name: str, **overrides: Any) -> Any:
    """Instantiate ``conf/<group>/<name>.yaml`` (its ``_target_``) with ``overrides`` applied.

    A flat config (``_target_`` plus plain values) is called directly, which is what Hydra's
    ``instantiate`` would do, ~0.5 ms faster; anything else goes through ``instantiate``.
    """
    cfg = load_config(group, name, **overrides)
    flat = OmegaConf.to_container(cfg, resolve=True)
    target = flat.pop("_target_", None)
    if isinstance(target, str) and all(not k.startswith("_") and _plain(v) for k, v in flat.items()):
        return _callable(target)(**flat)
    return instantiate(cfg, _convert_="all")
