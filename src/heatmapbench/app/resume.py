"""``heatmapbench-evaluate ... resume=<run id or run folder>``: finish a stopped evaluation in its own run.

An evaluation writes its scored batches to ``<run folder>/batches/`` as it goes
(:mod:`heatmapbench.evaluation.shards`) beside ``run.json``: the MLflow run id, its store, and the
settings that decide the numbers. A SLURM time limit, a pre-empted node, ``kill -9`` or the OOM
killer leave complete shards only. ``resume=`` reopens that MLflow run, keeps the shards, scores
the images no shard holds and finishes as if never stopped (the run logs
``eval/images_reused``). Settings that change the numbers must be the recorded ones; only how
and where the run executes may differ (:data:`MAY_CHANGE`). With the same ``data.batch_size``
the result is bit for bit that of an uninterrupted run on the same device type; with another,
the rescored images draw their random numbers in batches of the new size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from heatmapbench.app.schema import ConfigError
from heatmapbench.app.store import retry_locked
from heatmapbench.app.provenance import flatten

#: ``batches/run.json``: the run a folder of shards belongs to, and the settings it was scored with.
MANIFEST = "run.json"
#: Tag of an evaluate run naming its folder of shards (so that ``resume=<run id>`` finds it).
BATCHES_TAG = "batches_dir"
#: Config keys that may differ when a run is resumed: how and where it runs, not what it computes.
MAY_CHANGE = ("hydra", "paths", "logger", "trainer", "callbacks", "device", "progress", "resume", "data.batch_size",
              "data.num_workers", "data.pin_memory", "data.download", "evaluation.batch_size")


def result_settings(cfg: DictConfig) -> dict[str, str]:
    """The config as flat ``key: value`` text, less :data:`MAY_CHANGE` (interpolations unresolved,
    so data moved under another ``paths.data_dir`` still matches)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in MAY_CHANGE)}


def write_manifest(folder: Path, run_id: str, tracking_uri: str, cfg: DictConfig, num_images: int) -> Path:
    """Record which run ``folder``'s shards belong to and the settings that made them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri, "num_images": num_images,
                                "batch_size": int(cfg.data.batch_size), "settings": result_settings(cfg)},
                               indent=1) + "\n")
    return path


@dataclass
class Resume:
    """A stopped evaluation to finish: its MLflow run, its folder of shards, what it recorded."""

    run_id: str
    folder: Path
    manifest: dict[str, Any]


def _get_run(tracking_uri: str, run_id: str, error: str) -> Any:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return retry_locked(MlflowClient(tracking_uri).get_run)(run_id)
    except MlflowException:
        raise ConfigError(error) from None


def _folder_of_run(value: str, tracking_uri: str) -> Path:
    run = _get_run(tracking_uri, value, f"resume={value!r} is neither a folder nor a run id of {tracking_uri}; "
                   "pass the run's output folder (it holds batches/) or its MLflow run id")
    folder = run.data.tags.get(BATCHES_TAG)
    if not folder:
        raise ConfigError(f"resume={value!r}: that run has no {BATCHES_TAG} tag (not an evaluation written batch "
                          "by batch); start a new evaluation")
    return Path(folder)


def find_resume(cfg: DictConfig) -> Resume:
    """The run ``cfg.resume`` names, checked against ``cfg``; every refusal is one line, before any work."""
    value = str(cfg.resume)
    path = Path(value).expanduser()
    if path.is_dir():
        folder = path if (path / MANIFEST).is_file() else path / "batches"
    else:
        folder = _folder_of_run(value, str(cfg.logger.tracking_uri))
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"resume={value}: {folder / MANIFEST} does not exist; pass the output folder of an "
                          "evaluation run (it holds batches/run.json) or its MLflow run id")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest["tracking_uri"] != str(cfg.logger.tracking_uri):
        raise ConfigError(f"resume={value}: the run is in the store {manifest['tracking_uri']}, not in "
                          f"{cfg.logger.tracking_uri}; pass logger.tracking_uri={manifest['tracking_uri']}")
    old, new = manifest["settings"], result_settings(cfg)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            raise ConfigError(f"resume={value}: {key}={new.get(key, '(unset)')} differs from the run's "
                              f"{key}={old.get(key, '(unset)')}; resume with the run's settings (only "
                              "data.batch_size, device and trainer.* may change)")
    _check_unfinished(value, manifest["run_id"], str(cfg.logger.tracking_uri))
    return Resume(run_id=manifest["run_id"], folder=folder, manifest=manifest)


def _check_unfinished(value: str, run_id: str, tracking_uri: str) -> None:
    run = _get_run(tracking_uri, run_id, f"resume={value}: its run {run_id} is not in {tracking_uri} (deleted?); "
                   "start a new evaluation")
    if run.info.status == "FINISHED":
        raise ConfigError(f"resume={value}: the run {run_id} has finished; nothing to resume")
