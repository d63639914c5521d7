"""``heatmapbench-evaluate``: the paper's comparison of heatmap methods on a pretrained classifier.

    heatmapbench-evaluate experiment=samek2015_samples
    heatmapbench-evaluate model=vgg16 data=imagefolder data.path=/data/ilsvrc2012/val num_images=5040
    heatmapbench-evaluate -m explainer=sensitivity_l2,lrp_epsilon_0.01 evaluation.region_size=4,9

Heatmaps of every configured explainer are scored by region perturbation over the data's
test split (or its first ``num_images``) in batches; one MLflow run holds the per-explainer
metrics, the curves, plots, gallery and the paper-style tables, which are also printed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from heatmapbench.metrics import names as mn
from heatmapbench.app.adapt_model import apply_model_preprocessing
from heatmapbench.app.plumbing import (CHECKPOINT_KEYS, apply_explainer_shortcut, config_keys, data_keys,
                                      instantiate_callbacks, instantiate_data, instantiate_model, instantiate_node,
                                      launchers_checked, selected_explainer, user_errors_exit)
from heatmapbench.app.schema import ConfigError, config_error, validate
from heatmapbench.evaluation.settings import EvaluationSettings
from heatmapbench.evaluation import Evaluation, build_explainers, build_perturbation
from heatmapbench.evaluation.style import settings_title
from heatmapbench.evaluation.writer import write_evaluation
from heatmapbench.evaluation.loop import EvaluationModule, ShardWriter
from heatmapbench.evaluation.shards import images_done, merge_shards, plan_batches, shard_files
from heatmapbench.evaluation.reliability import per_image_table, run_reliability, run_reliability_metrics
from heatmapbench.models.checkpoints import CheckpointError
from heatmapbench.models.zoo import from_checkpoint
from heatmapbench.registry import conf_dir
from heatmapbench.accel.precision import check_precision
from heatmapbench.app.resume import BATCHES_TAG, find_resume, write_manifest
from heatmapbench.app.sanity import log_sanity, run_sanity, sanity_settings
from heatmapbench.app.preflight import (check_logger, check_model_fits_data, check_regions_fit, warn_untrained,
                                    weights_source)
from heatmapbench.app.store import make_logger, retry_locked
from heatmapbench.app.provenance import run_identity, run_tags
from heatmapbench.app.tracking import log_skipped, results_kept_in, tracked_run, write_metrics



def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is invalid: no CUDA device here; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is None and os.environ.get("LOCAL_RANK"):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # a DDP rank's own GPU (Lightning moves it there)
    return device


def build_inputs(cfg: DictConfig):
    """Model, data, explainers and perturbation from the config; every user error surfaces here."""
    apply_explainer_shortcut(cfg)
    validate(cfg, groups=("paths", "data", "logger", "evaluation"))
    missing = sorted(OmegaConf.missing_keys(cfg.model))
    if missing:  # e.g. model=checkpoint without its checkpoint
        raise ConfigError(f"model.{missing[0]} is required but not set; pass model.{missing[0]}=...")
    if not isinstance(cfg.gallery_size, int) or cfg.gallery_size < 0:
        raise ConfigError(f"gallery_size={cfg.gallery_size} is invalid: must be an integer >= 0 (0: no gallery)")
    if cfg.num_images is not None and cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images} is invalid: must be >= 1 or null (all images)")
    settings = EvaluationSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True))
    device = _device(cfg.device)
    try:
        check_precision(settings.precision, device)
    except ValueError as err:
        raise config_error("evaluation", err) from None
    torch.manual_seed(int(cfg.seed))  # untrained weights alike in every process of a run, and in every rerun
    module = instantiate_model(cfg.model)  # a model's user error (no weights, unknown name) is one line
    net = getattr(module, "net", module)
    if cfg.get("ckpt_path"):
        try:
            with config_keys("model.net", **CHECKPOINT_KEYS):  # errors name ckpt_path, model, not from_checkpoint's
                from_checkpoint(cfg.ckpt_path, net)
        except CheckpointError:
            raise
        except ValueError as err:  # a file of another network, or not one of heatmapbench-train
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {' '.join(str(err).split())}") from err
    net = net.to(device).eval()
    apply_model_preprocessing(cfg, net)
    datamodule = instantiate_data(cfg.data)
    with data_keys():  # reading the data (files found, images scanned): an error names the data.* keys
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        datamodule.setup("test")
    dataset = datamodule.test_set
    n = len(dataset) if cfg.num_images is None else min(int(cfg.num_images), len(dataset))
    if n == 0:
        raise ConfigError("the data's test split is empty: nothing to evaluate")
    x0 = dataset[0][0].unsqueeze(0).to(device)  # (1, C, H, W): checks against the real images, before any run
    check_regions_fit(settings, tuple(x0.shape))
    check_model_fits_data(net, x0, getattr(datamodule, "num_classes", None), exact=False)
    check_logger(cfg.logger)
    chosen = selected_explainer(cfg)
    if chosen is None:
        explainers = build_explainers(settings.explainers)
    else:  # explainer=<name> with its (possibly overridden) parameters
        explainers = {chosen[0]: instantiate_node(chosen[1], "explainer", _convert_="all")}
    perturbation = build_perturbation(cfg.perturbation)
    return settings, device, net, datamodule, Subset(dataset, range(n)), explainers, perturbation


def batches_folder(cfg: DictConfig) -> Path:
    """The run's folder of per-batch results (``<output_dir>/batches``)."""
    return Path(cfg.paths.output_dir) / "batches"


def launched_rank() -> int:
    """0 for the process a user started (rank 0), else the first non-zero rank variable its launcher
    set (not always the global rank); read before any Trainer exists.

    Lightning's DDP launcher starts ranks 1… as copies of the command (``LOCAL_RANK``, ``NODE_RANK``),
    SLURM's ``srun`` as tasks (``SLURM_PROCID``), torchrun with ``RANK``. Only rank 0 opens the MLflow
    run, logs, and merges; the others score their share of the images and exit.
    """
    keys = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return next((int(os.environ[k]) for k in keys if int(os.environ.get(k) or 0)), 0)


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``pytorch_lightning.Trainer`` arguments of the prediction loop: ``trainer.*``, with ``device``
    choosing the accelerator, gradients on (the explainers need them) and no Lightning logging."""
    node = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if not k.startswith("_")}
    node = {k: v for k, v in node.items() if v is not None}
    accelerator = str(node.get("accelerator", "auto"))
    device = str(cfg.device)
    if device == "auto":
        want = "gpu" if torch.cuda.is_available() else "cpu"
    else:
        parsed = _device(device)
        want = "cpu" if parsed.type == "cpu" else "gpu"
        if parsed.index is not None:
            if node.get("devices", 1) not in (1, "1", "auto"):
                raise ConfigError(f"device={device} names one GPU but trainer.devices={node['devices']}; use "
                                  "device=cuda with trainer.devices=N (or a list: trainer.devices=[0,2])")
            node["devices"] = [parsed.index]
    if accelerator != "auto" and accelerator != want and device != "auto":
        raise ConfigError(f"device={device} and trainer.accelerator={accelerator} disagree; set one of them")
    node["accelerator"] = want if accelerator == "auto" else accelerator
    precision = str(node.get("precision", "32-true"))
    if precision not in ("32", "32-true"):
        raise ConfigError(f"trainer.precision={precision} is invalid for evaluate: the explainers' and the engine's "
                          "precision is evaluation.precision (fp32, bf16, fp16, tf32); drop trainer.precision")
    node.update(inference_mode=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=False, use_distributed_sampler=False)
    return node


def evaluate_dataset(net, datamodule, subset, explainers, settings, perturbation, *, folder: str | Path,
                     batches: list[list[int]], trainer: dict[str, Any] | None = None, gallery_size: int = 6,
                     progress: bool = True, callbacks: tuple = ()) -> Evaluation | None:
    """Score ``batches`` of ``subset`` in a Lightning prediction loop, each batch written to ``folder``
    as a shard the moment it is scored; rank 0 returns the evaluation merged from every shard.

    ``trainer``: ``pytorch_lightning.Trainer`` arguments (:func:`trainer_kwargs`); with several
    processes each scores its share of the batches (:mod:`heatmapbench.evaluation.loop`). Memory
    holds one batch at a time; a killed run keeps every finished batch. Ranks other than 0
    return ``None``.
    """
    import pytorch_lightning as pl

    module = EvaluationModule(net, subset, batches, explainers, settings, perturbation, datamodule.normalization,
                              gallery_size=gallery_size, num_workers=getattr(datamodule, "num_workers", 0),
                              progress=progress)
    writer = ShardWriter(folder)
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = lightning.level
    lightning.setLevel(logging.WARNING)  # its "GPU available" and cloud-service tips: the run prints its device
    try:
        runner = pl.Trainer(**(trainer or {"accelerator": "cpu", "devices": 1, "logger": False,
                                           "inference_mode": False, "enable_progress_bar": False}),
                            callbacks=[writer, *callbacks])
    finally:
        lightning.setLevel(level)
    runner.predict(module, return_predictions=False)
    if not runner.is_global_zero:
        return None
    return merge_shards(writer.folder, len(subset), gallery_size)


def evaluation_metrics(evaluation: Evaluation, summary) -> dict[str, float]:
    """Per-explainer metrics of one evaluation, as logged to MLflow."""
    random_ordering = mn.random_ordering_metric(mn.AOPC)
    m, lo, hi = summary.attrs[random_ordering]
    metrics: dict[str, float] = {mn.IMAGES: float(evaluation.num_images), mn.SECONDS: evaluation.seconds,
                                 random_ordering: m, mn.random_ordering_metric(mn.AOPC, "lo"): lo,
                                 mn.random_ordering_metric(mn.AOPC, "hi"): hi}
    if evaluation.label is not None:
        metrics[mn.ACCURACY] = float((evaluation.target == evaluation.label).double().mean())
    for _, row in summary.iterrows():
        for column, value in row.items():
            parsed = mn.parse_explainer_metric(f"{column}/{row.explainer}")
            if parsed is not None and value == value:  # a measure (or its bound), not NaN
                metrics[f"{column}/{row.explainer}"] = float(value)
    return metrics


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Build everything (failing before any MLflow run exists), evaluate, log and print the tables.

    In a run of several processes (``trainer.devices``, ``trainer.num_nodes``) every rank builds the
    same inputs and scores its share of the images; rank 0 alone opens the MLflow run, merges,
    logs and returns the metrics (the others return ``{}``).
    """
    sanity = sanity_settings(cfg)  # sanity=mprt: the randomisation test in the same run
    settings, device, net, datamodule, subset, explainers, perturbation = build_inputs(cfg)
    trainer = trainer_kwargs(cfg)
    score = dict(trainer=trainer, gallery_size=cfg.gallery_size, progress=cfg.progress,
                 callbacks=tuple(instantiate_callbacks(cfg.get("callbacks"))))
    if launched_rank() != 0:  # rank 0 has the run, the plan and the folder (broadcast as the loop starts)
        evaluate_dataset(net, datamodule, subset, explainers, settings, perturbation, folder=batches_folder(cfg),
                         batches=[], **score)
        return {}
    resume = find_resume(cfg) if cfg.get("resume") else None
    batches = batches_folder(cfg) if resume is None else resume.folder
    if resume is None and shard_files(batches):
        raise ConfigError(f"{batches} already holds the batches of another evaluation; choose another "
                          f"hydra.run.dir, or finish that one with resume={batches.parent}")
    reused = images_done(batches) if resume is not None else []
    plan = plan_batches(len(subset), datamodule.batch_size, reused)
    run_name, sweep_tags = run_identity(cfg, "evaluate")
    if resume is not None:
        logger_kwargs = {"run_id": resume.run_id}
    else:
        logger_kwargs = {"run_name": run_name} if cfg.logger.get("run_name") is None else {}
    logger = make_logger(cfg.logger, **logger_kwargs)
    tags = {**run_tags(cfg, "evaluate", list(explainers)), **sweep_tags, "weights": weights_source(net) or "untrained",
            BATCHES_TAG: str(batches.resolve())}
    if weights_source(net) is None:
        warn_untrained(f"model={tags['model']}")
    if resume is not None:
        print(f"resuming run {resume.run_id}: {len(reused)} of {len(subset)} images already scored in {batches}",
              flush=True)
    print(f"evaluating {len(subset) - len(reused)} images × {len(explainers)} explainers "
          f"({settings.steps} steps of {settings.region_size}×{settings.region_size} regions) on {device}", flush=True)
    folder = batches.parent / "evaluation"  # the run's own output folder, also when resumed from another
    with tracked_run(logger, cfg, extra_tags=tags):
        if getattr(datamodule, "skip_unreadable", False):
            log_skipped(logger, datamodule.skipped)
        if resume is None:
            write_manifest(batches, logger.run_id, str(cfg.logger.tracking_uri), cfg, len(subset))
        start = time.perf_counter()
        evaluation = evaluate_dataset(net, datamodule, subset, explainers, settings, perturbation, folder=batches,
                                      batches=plan, **score)
        seconds = time.perf_counter() - start
        if evaluation.forwards:  # what evaluation.incremental chose (auto probes once per model)
            print(f"curve forwards: {evaluation.forwards}", flush=True)
            retry_locked(logger.experiment.set_tag)(logger.run_id, "incremental", evaluation.forwards[:4000])
        statistics = evaluation.statistics(n_boot=settings.n_boot, seed=settings.seed)  # logged = written
        metrics = evaluation_metrics(evaluation, statistics.summary)
        metrics[mn.SECONDS] = seconds
        metrics[mn.IMAGES_REUSED] = float(len(reused))
        reliability = run_reliability(per_image_table(evaluation), n_boot=settings.n_boot, seed=settings.seed)
        metrics.update(run_reliability_metrics(reliability))
        # the results first, into the run's output folder: a store that fails later loses nothing
        files = write_evaluation(evaluation, folder, tuple(getattr(datamodule, "classes", ())),
                                 title=settings_title(settings, perturbation, len(subset)),
                                 statistics=statistics, reliability=reliability)
        print("\n" + files["summary_md"].read_text() + "\n" + files["reliability_md"].read_text())
        print(f"results: {folder}", flush=True)
        checks = None
        try:
            with results_kept_in(folder):
                retry_locked(logger.log_metrics)(metrics)
                for path in files.values():
                    retry_locked(logger.experiment.log_artifact)(logger.run_id, str(path), "evaluation")
            if sanity is not None:
                checks = run_sanity(sanity, net, subset, explainers, device, folder / "sanity",
                                    n_boot=settings.n_boot, seed=settings.seed)
                metrics.update(checks.metrics)
                print("\n" + checks.markdown, flush=True)
        finally:  # once, with every metric measured (the evaluation's alone where logging or the sanity test failed)
            metrics_file = write_metrics(metrics, folder / "metrics.json")
        with results_kept_in(folder):
            if checks is not None:
                log_sanity(logger, checks)
            retry_locked(logger.experiment.log_artifact)(logger.run_id, str(metrics_file), "evaluation")
    print(f"{len(subset)} images in {seconds:.1f} s; MLflow run {logger.run_id} "
          f"(experiment {cfg.logger.experiment_name!r}, {cfg.logger.tracking_uri})", flush=True)
    return {"run_id": logger.run_id, **metrics}


@launchers_checked
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="evaluate")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the mean AOPC relative to random of the first explainer."""
    metrics = run_evaluate(cfg)
    first = cfg.evaluation.explainers[0]
    return metrics.get(mn.explainer_metric(mn.AOPC_REL, first))


if __name__ == "__main__":
    main()
