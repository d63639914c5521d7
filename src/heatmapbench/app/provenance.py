"""What a run records about itself: the git commit, the resolved config, readable params, its name and tags.

What a person sees in the MLflow runs table comes from here: :func:`readable_params` (the settings
that define the experiment), :func:`run_identity` (a unique, meaningful run name and the sweep's
tags) and :func:`run_tags`; :func:`git_commit`, :func:`resolved_config` and :func:`hydra_overrides`
are the provenance :func:`~heatmapbench.app.tracking.log_config` logs with every run.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

import heatmapbench

__all__ = ["TRAINER_PARAMS", "flatten", "git_commit", "hydra_overrides", "readable_params", "resolved_config",
           "run_identity", "run_tags"]


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    cwd = str(cwd or Path(heatmapbench.__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into ``{"a.b.c": value}`` strings (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(cfg, (list, tuple)) and any(isinstance(v, (dict, list)) for v in cfg):
        for i, value in enumerate(cfg):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(cfg)[:6000]
    return out


def hydra_overrides() -> list[str]:
    """The overrides of the Hydra app this runs in (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        return []


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers with interpolations resolved (without Hydra's own node)."""
    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key])
            else cfg[key] for key in cfg if key != "hydra"}


def _class_name(node: Any) -> str:
    """The last part of a config node's ``_target_`` (``heatmapbench.models.SmallCNN`` → ``SmallCNN``)."""
    target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
    return str(target).rsplit(".", 1)[-1] if target else ""


#: The argument of a generic builder that says which network it makes: timm's model name, a
#: Hugging Face folder (its last part) or hub id.
_NET_IDENTITY = ("name", "path")


def _model_label(model: Any) -> str:
    """``SmallCNN``, or ``timm_model:convnext_atto`` / ``hf_model:my-vit`` where one builder makes many networks."""
    net = model.get("net") if isinstance(model, DictConfig) else None
    label = _class_name(net) or _class_name(model)
    for key in _NET_IDENTITY:
        if isinstance(net, DictConfig) and key in net and not OmegaConf.is_missing(net, key):
            value = net.get(key)
            if isinstance(value, str) and value:
                return f"{label}:{Path(value).name if key == 'path' and Path(value).is_dir() else value}"
    return label


def run_tags(cfg: DictConfig, task: str, explainers: Sequence[str] = ()) -> dict[str, str]:
    """The tags every train and evaluate run carries: task, model, data, perturbation, explainers."""
    tags = {"task": task, "model": _model_label(cfg.get("model")), "data": _class_name(cfg.get("data")),
            "perturbation": _class_name(cfg.get("perturbation")).lower(), "explainers": ",".join(explainers)}
    return {k: v for k, v in tags.items() if v}


def _short_override(override: str) -> str:
    """``trainer.max_epochs=2`` → ``max_epochs=2`` (the value whole)."""
    key, sep, value = override.partition("=")
    return f"{key.split('.')[-1]}{sep}{value}" if sep else override


#: Overrides that say how a command displays, not what it ran: left out of run names.
_DISPLAY_OVERRIDES = ("progress=",)


def _name_order(overrides: list[str]) -> list[str]:
    """The overrides a run name shows, most telling first: display settings dropped, ``experiment=``
    last (an experiment config names its MLflow experiment too, so within it every run shares it)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(_DISPLAY_OVERRIDES)]
    return sorted(kept, key=lambda o: o.lstrip("+~").startswith("experiment="))


def run_identity(cfg: DictConfig, task: str | None = None) -> tuple[str, dict[str, str]]:
    """A unique, meaningful run name and, inside a sweep (``-m``), the sweep's tags.

    The name reads ``<task> <model>/<data> <overrides> [#<job>] <4 hex>``: what ran (the data module's
    name without ``DataModule``), what was changed (at most 40 characters, so that the name fits the runs
    table and chart legends; ``experiment=`` last and display settings left out, see :func:`_name_order`),
    and a random suffix that keeps reruns apart (the start time is a column of its own). Every job of one sweep
    gets the same ``sweep_id`` (its sweep directory) plus its job number and overrides, so the
    runs can be filtered together in the UI and in ``report``.
    """
    tags_ = run_tags(cfg, task or str(cfg.get("task_name") or "run"))
    overrides: list[str] = []
    sweep: dict[str, str] = {}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        hc = None
    if hc is not None:
        overrides = [o for o in hc.overrides.task if not o.startswith(("hydra.", "paths.", "logger."))]
        if hc.mode == RunMode.MULTIRUN:
            sweep_dir = Path(str(hc.sweep.dir))
            sweep = {"sweep_id": f"{sweep_dir.parent.parent.name}/{sweep_dir.name}",
                     "sweep_job": str(hc.job.num), "sweep_overrides": " ".join(overrides) or "(none)"}
    what = [tags_[k] for k in ("model", "data") if k in tags_]
    parts = [tags_["task"], "/".join(w.removesuffix("DataModule") or w for w in what)]
    shown = " ".join(_short_override(o) for o in _name_order(overrides))
    if shown:
        parts.append(shown if len(shown) <= 40 else shown[:39] + "…")
    if sweep:
        parts.append(f"#{sweep['sweep_job']}")
    parts.append(secrets.token_hex(2))  # the start time is a column of its own
    return " ".join(p for p in parts if p)[:250], sweep


#: Config groups that are bookkeeping (where files go, how runs are stored), not the experiment.
_NOT_PARAMS = ("hydra", "paths", "logger", "progress", "task_name")  # task_name: the tag ``task`` says it
#: How data are loaded, not which: they stay in config.yaml.
_LOADING_KEYS = ("data.num_workers", "data.pin_memory", "data.download")
#: Instantiation keys of Hydra: their class paths become ``<node>=<ClassName>``, the rest are dropped.
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def _short_path(value: str) -> str:
    parts = Path(value).parts
    return value if len(parts) <= 1 else "…/" + "/".join(parts[-2:])


#: Trainer arguments that change what is trained (the others, logging and display, stay in config.yaml).
TRAINER_PARAMS = ("max_epochs", "max_steps", "precision", "accelerator", "devices", "num_nodes", "strategy",
                  "accumulate_grad_batches", "gradient_clip_val", "deterministic", "benchmark", "limit_train_batches",
                  "limit_val_batches", "val_check_interval", "check_val_every_n_epoch")


def readable_params(cfg: DictConfig) -> dict[str, str]:
    """The settings that define the experiment, as MLflow params a person can read.

    From the config: no Hydra instantiation keys (a node's ``_target_`` becomes ``<node>`` = its
    class name), no interpolations (they restate another param), no ``paths``/``logger``/``hydra``
    groups, no callbacks but the AOPC callback's own settings, only the Trainer arguments that
    change what is trained (:data:`TRAINER_PARAMS`), and no absolute paths (shortened to
    ``…/<folder>/<file>``). The full resolved config is the run's ``config.yaml`` artifact.
    """
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, DictConfig):
            if node.get("_target_") and key and key != "trainer":
                # the model and the perturbation as their tags spell them (``SmallCNN``, not the Lightning
                # module's class; ``uniform``): one name per concept in the UI
                out[key] = (_class_name(node).lower() if key == "perturbation" else _model_label(node)
                            if key == "model" else _class_name(node))
            for child in node.keys():
                name = f"{key}.{child}" if key else str(child)
                if child in _HYDRA_KEYS or OmegaConf.is_interpolation(node, child):
                    continue
                if not key and child in _NOT_PARAMS:
                    continue
                if key == "callbacks" and child != "aopc":
                    continue
                walk(node._get_node(child), name)
            return
        value = node._value() if hasattr(node, "_value") else node
        if isinstance(node, ListConfig) or isinstance(value, (list, tuple)):
            value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else value
        if key.startswith("trainer.") and key[len("trainer."):] not in TRAINER_PARAMS or key in _LOADING_KEYS:
            return
        if value is None:  # not set: a param reading "None" says nothing
            return
        text = str(value)
        if isinstance(value, str) and os.path.isabs(value):
            text = _short_path(value)
        out[key] = text[:6000]

    walk(cfg, "")
    return out
