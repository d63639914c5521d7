"""Build objects by name from the YAML files of a config group (``conf/<group>/<name>.yaml``).

A new explainer or perturbation is a small class plus one YAML file with ``_target_``;
nothing here needs to change for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
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
    cfg = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return cfg


def build(group: str, name: str, **overrides: Any) -> Any:
    """Instantiate ``conf/<group>/<name>.yaml`` (its ``_target_``) with ``overrides`` applied."""
    return instantiate(load_config(group, name, **overrides), _convert_="all")
