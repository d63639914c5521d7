"""``heatmapbench-evaluate``: the paper's comparison of heatmap methods on a pretrained classifier.

    heatmapbench-evaluate experiment=samek2015_samples
    heatmapbench-evaluate model=vgg16 data=imagefolder data.path=/data/ilsvrc2012/val num_images=5040
    heatmapbench-evaluate -m explainer=sensitivity_l2,lrp_epsilon_0.01 evaluation.region_size=4,9

Heatmaps of every configured explainer are scored by region perturbation over the data's
test split (or its first ``num_images``) in batches; one MLflow run holds the per-explainer
metrics, the curves, plots, gallery and the paper-style tables, which are also printed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from heatmapbench.metrics import names as mn
from heatmapbench.app.adapt_model import apply_model_preprocessing
from heatmapbench.app.plumbing import (apply_explainer_shortcut, instantiate_data, instantiate_node, selected_explainer,
                             user_errors_exit)
from heatmapbench.app.schema import ConfigError, EvaluationSettings, validate
from heatmapbench.evaluation import Evaluation, build_explainers, build_perturbation, engine_forwards, evaluate_batch
from heatmapbench.evaluation.artifacts import settings_title, write_evaluation
from heatmapbench.evaluation.shards import merge_shards, plan_batches, save_shard, shard_files
from heatmapbench.evaluation.reliability import per_image_table, reliability_metrics, run_reliability
from heatmapbench.models.zoo import from_checkpoint
from heatmapbench.registry import conf_dir
from heatmapbench.accel.precision import CUDA_ONLY
from heatmapbench.app.sanity import log_sanity, run_sanity, sanity_settings
from heatmapbench.app.preflight import (check_logger, check_model_fits_data, check_regions_fit, warn_untrained,
                                    weights_source)
from heatmapbench.app.tracking import (log_skipped, make_logger, results_kept_in, retry_locked, run_identity, run_tags,
                                   tracked_run, write_metrics)



def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is invalid: no CUDA device here; use device=cpu or device=auto")
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
    if settings.precision in CUDA_ONLY and device.type != "cuda":
        raise ConfigError(f"evaluation.precision={settings.precision} is invalid on {device.type}: it needs a "
                          "CUDA device; use evaluation.precision=bf16 or fp32")
    module = instantiate(cfg.model)
    net = getattr(module, "net", module)
    if cfg.get("ckpt_path"):
        from_checkpoint(cfg.ckpt_path, net)
    net = net.to(device).eval()
    apply_model_preprocessing(cfg, net)
    datamodule = instantiate_data(cfg.data)
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


def evaluate_dataset(net, datamodule, subset, explainers, settings, perturbation, device, *,
                     folder: str | Path, gallery_size: int = 6, progress: bool = True) -> Evaluation:
    """Evaluate ``subset`` in batches of ``data.batch_size``, each written to ``folder`` as it is done.

    Every batch's per-image results become one shard (:mod:`heatmapbench.evaluation.shards`) the
    moment it is scored; the whole evaluation is merged from the shards at the end, so memory
    holds one batch at a time and a killed run keeps every finished batch. The progress bar
    counts the inputs the perturbation engine forwards (updated after every forward chunk), so
    its rate and ETA hold from the first batch on.
    """
    batches = plan_batches(len(subset), datamodule.batch_size)
    total = sum(engine_forwards(settings, len(b), len(explainers), torch.device(device).type) for b in batches)
    with tqdm(total=total, desc="evaluate", unit="img", unit_scale=True, disable=not progress,
              dynamic_ncols=True) as bar:
        loader = DataLoader(subset, batch_sampler=batches, num_workers=getattr(datamodule, "num_workers", 0))
        for batch, (x, y) in zip(batches, loader):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            start = batch[0]
            bar.set_postfix_str(f"images {start}-{start + len(x)} of {len(subset)}", refresh=False)
            part = evaluate_batch(net, x, explainers, settings, perturbation, label=y,
                                  gallery_size=max(0, min(gallery_size - start, len(x))), seed_offset=start,
                                  progress=bar.update, **datamodule.normalization)
            save_shard(folder, torch.tensor(batch), part)
    return merge_shards(folder, len(subset), gallery_size)


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
    """Build everything (failing before any MLflow run exists), evaluate, log and print the tables."""
    sanity = sanity_settings(cfg)  # sanity=mprt: the randomisation test in the same run
    settings, device, net, datamodule, subset, explainers, perturbation = build_inputs(cfg)
    batches = batches_folder(cfg)
    if shard_files(batches):
        raise ConfigError(f"{batches} already holds the batches of another evaluation; "
                          "choose another hydra.run.dir")
    run_name, sweep_tags = run_identity(cfg, "evaluate")
    logger_kwargs = {"run_name": run_name} if cfg.logger.get("run_name") is None else {}
    logger = make_logger(cfg.logger, **logger_kwargs)
    tags = {**run_tags(cfg, "evaluate", list(explainers)), **sweep_tags, "weights": weights_source(net) or "untrained"}
    if weights_source(net) is None:
        warn_untrained(f"model={tags['model']}")
    print(f"evaluating {len(subset)} images × {len(explainers)} explainers "
          f"({settings.steps} steps of {settings.region_size}×{settings.region_size} regions) on {device}", flush=True)
    folder = Path(cfg.paths.output_dir) / "evaluation"
    with tracked_run(logger, cfg, extra_tags=tags):
        if getattr(datamodule, "skip_unreadable", False):
            log_skipped(logger, datamodule.skipped)
        start = time.perf_counter()
        evaluation = evaluate_dataset(net, datamodule, subset, explainers, settings, perturbation, device,
                                      folder=batches, gallery_size=cfg.gallery_size,
                                      progress=cfg.progress)
        seconds = time.perf_counter() - start
        statistics = evaluation.statistics(n_boot=settings.n_boot, seed=settings.seed)  # logged = written
        metrics = evaluation_metrics(evaluation, statistics.summary)
        metrics[mn.SECONDS] = seconds
        reliability = run_reliability(per_image_table(evaluation), n_boot=settings.n_boot, seed=settings.seed)
        metrics.update(reliability_metrics(reliability))
        # the results first, into the run's output folder: a store that fails later loses nothing
        files = write_evaluation(evaluation, folder, tuple(getattr(datamodule, "classes", ())),
                                 title=settings_title(settings, perturbation, len(subset)),
                                 statistics=statistics, reliability=reliability)
        files["metrics"] = write_metrics(metrics, folder / "metrics.json")
        print("\n" + files["summary_md"].read_text() + "\n" + files["reliability_md"].read_text())
        print(f"results: {folder}", flush=True)
        with results_kept_in(folder):
            retry_locked(logger.log_metrics)(metrics)
            for path in files.values():
                retry_locked(logger.experiment.log_artifact)(logger.run_id, str(path), "evaluation")
        if sanity is not None:
            checks = run_sanity(sanity, net, subset, explainers, device, folder / "sanity",
                                n_boot=settings.n_boot, seed=settings.seed)
            metrics.update(checks.metrics)
            print("\n" + checks.markdown, flush=True)
            with results_kept_in(folder):
                log_sanity(logger, checks)
    print(f"{len(subset)} images in {seconds:.1f} s; MLflow run {logger.run_id} "
          f"(experiment {cfg.logger.experiment_name!r}, {cfg.logger.tracking_uri})", flush=True)
    return {"run_id": logger.run_id, **metrics}


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="evaluate")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the mean AOPC relative to random of the first explainer."""
    metrics = run_evaluate(cfg)
    first = cfg.evaluation.explainers[0]
    return metrics.get(mn.explainer_metric(mn.AOPC_REL, first))


if __name__ == "__main__":
    main()
