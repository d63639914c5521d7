"""``heatmapbench-roar``: ROAR and KAR (Hooker et al., NeurIPS 2019) through the Lightning trainer.

    heatmapbench-roar experiment=roar_fashion_mnist
    heatmapbench-roar -m experiment=roar_fashion_mnist roar.seeds=[0],[1]   # one job per seed, one parent run

The explained model is the checkpoint ``ckpt_path`` or, when none is given, the recipe (``model``,
``trainer``, ``data``) trained on the unmodified images with ``roar.explained_seed``. Its heatmaps of every
training, validation and test image for their true labels are computed in batches with the
configured explainers (and the ``random`` ranking baseline), cached on disk, and for every method
(``roar``: replace the top-t locations; ``kar``: the bottom-t), fraction t and seed, a fresh model of
the same recipe is trained on the modified images and tested on the modified test images.

MLflow: one parent run per ``roar_id`` (a hash of the recipe: model, data, trainer, fill, explained
weights; not of the explainers, fractions or seeds, so the jobs of a sweep share it), one child run per
retraining tagged ``roar_job``. A retraining whose child run is FINISHED is not redone: rerunning the
command (or another job of the sweep) resumes. At the end of every job the parent gets the table of all
finished retrainings (``roar/roar_accuracy.csv``), the accuracy-against-t figure (Hooker's Fig. 4) and
the metrics ``roar/<method>/<explainer>``: the mean test accuracy over the fractions and seeds (lower is
better for ROAR, higher for KAR).

Jobs that run at once (a joblib or SLURM sweep) share the parent: each registers on it as a
``roar_worker.<host>.<pid>.<id>`` tag, refreshed every minute while it works and set to its own
outcome when it ends. A job that ends while another still works leaves the parent RUNNING; the last
one closes it: FINISHED only when every job finished, else FAILED (or KILLED), with an ``end_reason``
naming the jobs. A job whose tag stopped being refreshed (killed outright) counts as KILLED.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from heatmapbench.app.plumbing import (CHECKPOINT_KEYS, config_keys, data_keys, instantiate_data, instantiate_model,
                                       launchers_checked, user_errors_exit)
from heatmapbench.app.preflight import check_logger
from heatmapbench.app.schema import RoarSettings, validate
from heatmapbench.app.store import make_logger, retry_locked, store_lock
from heatmapbench.app.provenance import run_tags
from heatmapbench.app.tracking import end_run, heartbeat, status_of, tracked_run
from heatmapbench.evaluation.core import build_explainers, build_perturbation
from heatmapbench.metrics import names as mn
from heatmapbench.perturbation.perturbations import PixelSpace
from heatmapbench.registry import conf_dir
from heatmapbench.roar import Job, dataset_heatmaps, jobs, remove, retrain
from heatmapbench.roar.retrain import UNMODIFIED

#: The parent run's table and figure (read by the report's metric agreement).
TABLE = "roar_accuracy.csv"
FIGURE = "roar_accuracy.png"
SPLITS = ("train", "val", "test")


def roar_id(cfg: DictConfig, settings: RoarSettings) -> str:
    """A hash of what makes retrainings comparable: model, data, trainer, fill and explained weights."""
    if settings.roar_id:
        return settings.roar_id
    recipe = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "trainer")}
    recipe["data"].pop("data_dir", None)  # where the files are, and the run's own folder, change nothing
    recipe["trainer"].pop("default_root_dir", None)
    recipe.update(fill=settings.fill, ckpt_path=str(cfg.get("ckpt_path")), explained_seed=settings.explained_seed)
    return hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) images and (N,) labels of a dataset, read in batches."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=1024, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


class Retrainer:
    """The recipe, the data and the explained model of one ``roar_id``; heatmaps cached in ``folder``."""

    def __init__(self, cfg: DictConfig, settings: RoarSettings, folder: Path) -> None:
        self.cfg, self.settings, self.folder = cfg, settings, folder
        datamodule = instantiate_data(cfg.data)
        with data_keys():  # reading the data: an error names the data.* keys
            datamodule.prepare_data()
            datamodule.setup("fit")
        self.data = {"train": _tensors(datamodule.train_set), "test": _tensors(datamodule.test_set)}
        self.data["val"] = _tensors(datamodule.val_set) if len(datamodule.val_set) else None
        self.batch_size = int(datamodule.batch_size)
        x = self.data["train"][0]
        self.space = PixelSpace.build(x.shape[1], datamodule.mean, datamodule.std, datamodule.value_range,
                                      x.device, x.dtype)
        self.fill = x.mean(dim=(0, 2, 3)) if settings.fill == "train_mean" else build_perturbation(settings.fill)
        self.explainers = build_explainers(settings.all_explainers)
        self._heatmaps: dict[tuple[str, str], torch.Tensor] = {}
        self.model = None

    def module(self):
        return instantiate_model(self.cfg.model)

    def trainer(self):
        return instantiate(self.cfg.trainer, logger=False, enable_checkpointing=False, callbacks=None,
                           enable_progress_bar=False, enable_model_summary=False)

    def run(self, job: Job) -> dict[str, float]:
        """Retrain for ``job``; return its metrics (``test/acc``, ...)."""
        if job.method == UNMODIFIED:
            sets = {s: self.data[s] for s in SPLITS}
        else:
            g = torch.Generator().manual_seed(job.seed)
            sets = {s: None if self.data[s] is None else
                    (remove(self.data[s][0], self.heatmaps(job.explainer, s), job.fraction, job.method,
                            fill=self.fill, space=self.space, generator=g), self.data[s][1]) for s in SPLITS}
        module, metrics = retrain(self.module, self.trainer, sets["train"], sets["val"], sets["test"], seed=job.seed,
                                  batch_size=self.batch_size)
        if job.method == UNMODIFIED and job.seed == self.settings.explained_seed and not self.cfg.get("ckpt_path"):
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(module.net.state_dict(), self.folder / "explained_model.pt")
        return metrics

    def explained_model(self):
        """The checkpoint's weights, else the recipe trained on unmodified images with ``explained_seed`` (cached)."""
        if self.model is None:
            module = self.module()
            if self.cfg.get("ckpt_path"):
                from heatmapbench.models.zoo import from_checkpoint

                with config_keys("model.net", **CHECKPOINT_KEYS):
                    from_checkpoint(self.cfg.ckpt_path, module.net)
            else:
                path = self.folder / "explained_model.pt"
                if not path.is_file():
                    self.run(Job(UNMODIFIED, "-", 0.0, self.settings.explained_seed))
                module.net.load_state_dict(torch.load(path, weights_only=True))
            self.model = module.net.eval()
        return self.model

    def heatmaps(self, explainer: str, split: str) -> torch.Tensor:
        """(N, H, W) heatmaps of the explained model for the true labels of ``split`` (cached on disk)."""
        key = (explainer, split)
        if key not in self._heatmaps:
            path = self.folder / "heatmaps" / f"{explainer}_{split}.pt"
            if path.is_file():
                self._heatmaps[key] = torch.load(path, weights_only=True)
            else:
                x, y = self.data[split]
                h = dataset_heatmaps(self.explainers[explainer], self.explained_model(), x, y,
                                     self.settings.heatmap_batch_size)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(h, path)
                self._heatmaps[key] = h
        return self._heatmaps[key]


def results_table(client, experiment_id: str, parent: str) -> pd.DataFrame:
    """Every FINISHED retraining under ``parent``: method, explainer, fraction, seed, accuracy, run id."""
    runs = retry_locked(client.search_runs)([experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                            "attributes.status = 'FINISHED'", max_results=50000)
    rows = [{"method": r.data.tags["roar_method"], "explainer": r.data.tags["roar_explainer"],
             "fraction": float(r.data.tags["roar_fraction"]), "seed": int(r.data.tags["roar_seed"]),
             "accuracy": r.data.metrics.get(mn.TEST_ACC, float("nan")), "job": r.data.tags["roar_job"],
             "run_id": r.info.run_id} for r in runs if "roar_job" in r.data.tags]
    columns = ["method", "explainer", "fraction", "seed", "accuracy", "job", "run_id"]
    return pd.DataFrame(rows, columns=columns).sort_values(["method", "explainer", "fraction", "seed"],
                                                           ignore_index=True)


def roar_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``roar/<method>/<explainer>``: mean test accuracy over the fractions and seeds (the area under Fig. 4's curve)."""
    out = {}
    part = table[table.method != UNMODIFIED]
    for (method, explainer), rows in part.groupby(["method", "explainer"]):
        out[mn.roar_metric(method, explainer)] = float(rows.accuracy.mean())
    base = table[table.method == UNMODIFIED]
    if len(base):
        out[mn.roar_metric("unmodified", "accuracy")] = float(base.accuracy.mean())
    return out


#: Tag prefix of the jobs working on a parent run: unix seconds while one works, ``<STATUS>: <reason>`` once ended.
WORKER_TAG = "roar_worker."


def worker_states(tags: dict[str, str], now: float, stale_after_s: float) -> dict[str, str]:
    """Per worker tag of a parent run: ``running``, ``stale`` (no beat for ``stale_after_s``: its process died) or
    the status it ended with (FINISHED, FAILED, KILLED)."""
    states = {}
    for key, value in tags.items():
        if not key.startswith(WORKER_TAG):
            continue
        if value.isdigit():
            states[key] = "running" if now - int(value) <= stale_after_s else "stale"
        else:
            states[key] = value.split(":", 1)[0]
    return states


def parent_outcome(tags: dict[str, str], states: dict[str, str]) -> tuple[str, str | None] | None:
    """How the parent run ends once its workers are in ``states``: None while one still runs (it stays open),
    else FINISHED when every worker finished, FAILED when one failed, KILLED when one was interrupted or died;
    with a reason naming the workers that did not finish (their own reasons from ``tags``)."""
    if "running" in states.values():
        return None
    unfinished = {k: s for k, s in states.items() if s != "FINISHED"}
    if not unfinished:
        return "FINISHED", None
    status = "FAILED" if "FAILED" in unfinished.values() else "KILLED"
    why = [f"{k[len(WORKER_TAG):]}: " + ("stopped without closing (its heartbeat stopped: SIGKILL, a lost node?)"
                                          if s == "stale" else tags[k]) for k, s in unfinished.items()]
    return status, (f"{len(unfinished)} of {len(states)} jobs of this ROAR did not finish; " + "; ".join(why))[:4000]


def _worker_key() -> str:
    host = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "host"
    return f"{WORKER_TAG}{host}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def join_parent(logger_cfg: DictConfig, rid: str) -> tuple[Any, str, bool]:
    """Find the parent run of ``rid`` or create it (tagged at creation), and register this process as one of
    its workers, under the store's lock, so that jobs that start together find one parent. Returns the
    parent's logger, this worker's tag and whether this process created the parent.

    A parent none of whose workers still runs starts a new round (a rerun that resumes): the tags of the
    earlier round's workers, and its ``end_reason``, are dropped.
    """
    from mlflow import MlflowClient

    from heatmapbench.app.runs import STALE_AFTER_MIN

    uri, worker = str(logger_cfg.tracking_uri), _worker_key()
    role = {"roar_id": rid, "roar_role": "parent"}
    logger = make_logger(logger_cfg, run_name=f"roar {rid}",  # the store prepared; no run yet
                         tags={**(logger_cfg.get("tags") or {}), **role})
    with store_lock(uri):
        client = MlflowClient(uri)
        exp = retry_locked(client.get_experiment_by_name)(logger_cfg.experiment_name)
        found = [] if exp is None else retry_locked(client.search_runs)(
            [exp.experiment_id], f"tags.roar_id = '{rid}' and tags.roar_role = 'parent'")
        if found:
            run = min(found, key=lambda r: (r.info.start_time, r.info.run_id))
            parent = run.info.run_id
            states = worker_states(run.data.tags, time.time(), STALE_AFTER_MIN * 60)
            if "running" not in states.values():  # a new round: the last one's workers and end are history
                for key in [*states, *(["end_reason"] if "end_reason" in run.data.tags else [])]:
                    retry_locked(client.delete_tag)(parent, key)
        else:
            retry_locked(lambda: logger.experiment)()  # creates the experiment and the run, with its tags
            parent = logger.run_id
        retry_locked(client.set_tag)(parent, worker, str(int(time.time())))
    if found:
        logger = make_logger(logger_cfg, run_id=parent)
    return logger, worker, not found


def shared_end(uri: str, worker: str) -> Any:
    """``end`` for :func:`tracked_run`: record this worker's outcome on the parent and close the parent only when no
    other worker of it still runs (:func:`parent_outcome`), under the store's lock."""
    from heatmapbench.app.runs import STALE_AFTER_MIN

    def end(logger: Any, status: str, reason: str | None) -> None:
        client, parent = logger.experiment, logger.run_id
        with store_lock(uri):
            retry_locked(client.set_tag)(parent, worker, f"{status}: {reason or 'all its retrainings finished'}"[:4000])
            tags = retry_locked(client.get_run)(parent).data.tags
            states = worker_states(tags, time.time(), STALE_AFTER_MIN * 60)
            outcome = parent_outcome(tags, states)
            if outcome is None:
                others = sum(s == "running" for k, s in states.items() if k != worker)
                print(f"parent run {parent} stays open: {others} other job(s) of this ROAR still run; the last one "
                      "closes it", flush=True)
                return
            end_run(logger, *outcome)

    return end


def run_roar(cfg: DictConfig) -> dict[str, Any]:
    """Check everything, find or open the parent run, run the missing retrainings, log the table and figure."""
    from heatmapbench.roar.figures import plot_accuracy

    validate(cfg, groups=("paths", "data", "trainer", "logger", "roar"))  # roar: RoarSettings' checks
    settings = RoarSettings(**OmegaConf.to_container(cfg.roar, resolve=True))
    check_logger(cfg.logger)
    rid = roar_id(cfg, settings)
    folder = Path(settings.cache_dir) / rid
    retrainer = Retrainer(cfg, settings, folder)  # data and explainers: errors before any run exists
    uri = str(cfg.logger.tracking_uri)
    logger, worker, created = join_parent(cfg.logger, rid)
    tags = {**run_tags(cfg, "roar", settings.all_explainers), "roar_id": rid, "roar_role": "parent"}
    todo = jobs(settings.methods, settings.all_explainers, settings.fractions, settings.seeds)
    with tracked_run(logger, cfg, extra_tags=tags, resumed=not created, end=shared_end(uri, worker)):
        client, parent, exp_id = logger.experiment, logger.run_id, logger.experiment_id
        done = set(results_table(client, exp_id, parent).job)
        print(f"ROAR {rid}: {len(todo)} retrainings, {len(done & {j.key for j in todo})} already finished "
              f"(parent run {parent})", flush=True)
        with heartbeat(client, parent, tag=worker):
            for job in todo:
                if job.key in done:
                    continue
                child = retry_locked(client.create_run)(exp_id, run_name=job.key, tags={
                    "mlflow.parentRunId": parent, "roar_id": rid, "roar_job": job.key, "task": "roar_retraining",
                    "roar_method": job.method, "roar_explainer": job.explainer, "roar_fraction": f"{job.fraction:g}",
                    "roar_seed": str(job.seed), "model": tags.get("model", ""), "data": tags.get("data", "")}).info.run_id
                try:
                    metrics = retrainer.run(job)
                    for key, value in metrics.items():
                        retry_locked(client.log_metric)(child, key, value)
                    retry_locked(client.set_terminated)(child, "FINISHED")
                except BaseException as err:
                    retry_locked(client.set_terminated)(child, status_of(err))
                    raise
                print(f"  {job.key}: test/acc {metrics.get(mn.TEST_ACC, float('nan')):.4f}", flush=True)
        table = results_table(client, exp_id, parent)
        metrics = roar_metrics(table)
        out = Path(cfg.paths.output_dir) / "roar"
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / TABLE, index=False)
        plot_accuracy(table, out / FIGURE, title=f"{tags.get('model', '')} on {tags.get('data', '')}")
        retry_locked(logger.log_metrics)(metrics)
        for name in (TABLE, FIGURE):
            retry_locked(client.log_artifact)(parent, str(out / name), "roar")
    summary = table.groupby(["method", "explainer", "fraction"]).accuracy.agg(["mean", "min", "max", "count"])
    print("\n== test accuracy after retraining (mean, min, max over seeds) ==\n" + summary.to_string(), flush=True)
    print(f"parent MLflow run {parent} (experiment {cfg.logger.experiment_name!r}, {uri}); files in {out}", flush=True)
    return {"run_id": parent, "roar_id": rid, "table": table, **metrics}


@launchers_checked
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="roar")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_roar(cfg)


if __name__ == "__main__":
    main()
