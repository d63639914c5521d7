"""``heatmapbench-train``: fit a classifier with Lightning, tracked in MLflow.

    python -m heatmapbench.app.train data=fashion_mnist model=small_cnn trainer.max_epochs=3
"""

from __future__ import annotations

from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from heatmapbench.metrics import names as mn
from heatmapbench.app.adapt_model import adapt_num_classes, apply_model_preprocessing, describe_preprocessing
from heatmapbench.callbacks import AOPCCallback
from heatmapbench.app.plumbing import (data_keys, instantiate_callbacks, instantiate_data, instantiate_model,
                                       launchers_checked, user_errors_exit)
from heatmapbench.app.schema import ConfigError, validate
from heatmapbench.evaluation.markdown import correlation_markdown
from heatmapbench.models.zoo import preprocessing_of
from heatmapbench.registry import conf_dir
from heatmapbench.models.checkpoints import AtomicCheckpointIO, RunRecord, recorded_run, training_checkpoint
from heatmapbench.app.preflight import check_logger, check_model_fits_data, check_optimizer, check_regions_fit
from heatmapbench.app.store import make_logger, prepare_sqlite_store, retry_locked, store_lock
from heatmapbench.app.provenance import resolved_config, run_identity, run_tags
from heatmapbench.app.tracking import log_skipped, tracked_run


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, fit (and test) from a composed ``train`` config; return the final metrics.

    Everything that can be wrong with the config or the data fails before an MLflow run exists.
    """
    validate(cfg)
    ckpt = training_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None  # read safely, before anything
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, datamodule, notes = build_model_and_data(cfg)
    with data_keys():  # files found or downloaded: an error names the data.* keys
        datamodule.prepare_data()
    callbacks = callbacks_the_trainer_allows(instantiate_callbacks(cfg.get("callbacks")), cfg.trainer)
    _check_model_and_data(model, datamodule, callbacks)
    check_optimizer(model)
    run_name, sweep_tags = run_identity(cfg, "train")
    aopc = (cfg.get("callbacks") or {}).get("aopc")
    explainers = list(cfg.evaluation.explainers) if aopc and cfg.get("evaluation") else []
    tags = {**run_tags(cfg, "train", explainers), **notes, **sweep_tags}
    logger_kwargs: dict[str, Any] = {}
    if cfg.get("logger"):
        check_logger(cfg.logger, allow_run_id=True)
        run_id = _run_to_resume(cfg, ckpt)
        if run_id is not None:
            logger_kwargs["run_id"] = run_id
        elif cfg.logger.get("run_name") is None:
            logger_kwargs["run_name"] = run_name
        callbacks.append(RunRecord(resolved_config(cfg)))  # the run's id and config go into every checkpoint
    logger = make_logger(cfg.logger, **logger_kwargs) if cfg.get("logger") else None
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []] + [AtomicCheckpointIO()]  # full disk: no half file
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False, plugins=plugins)

    def fit_and_test() -> dict[str, Any]:
        if logger is not None and getattr(datamodule, "skip_unreadable", False):
            log_skipped(logger, datamodule.skipped)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.get("test"):
            for results in trainer.test(model, datamodule=datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in results.items()})
        return metrics

    if logger is None:
        metrics = fit_and_test()
        run_id = None
    else:
        with tracked_run(logger, cfg, extra_tags=tags):
            metrics = fit_and_test()
        run_id = logger.run_id
    _print_summary(cfg, metrics, logger, run_id)
    for callback in callbacks:
        if isinstance(callback, AOPCCallback) and callback.history:
            _print_aopc(callback)
    return {"run_id": run_id, **metrics}


def callbacks_the_trainer_allows(callbacks: list[Any], trainer_cfg: Any) -> list[Any]:
    """``trainer.enable_progress_bar=false`` / ``enable_checkpointing=false`` turn the configured progress bar /
    checkpoint callbacks off (Lightning refuses the combination, naming a callback the user never chose)."""
    from pytorch_lightning.callbacks import Checkpoint, ProgressBar

    off = tuple(kind for kind, flag in ((ProgressBar, "enable_progress_bar"), (Checkpoint, "enable_checkpointing"))
                if trainer_cfg.get(flag) is False)
    return [c for c in callbacks if not (off and isinstance(c, off))]


def _check_model_and_data(model: pl.LightningModule, datamodule: Any, callbacks: list[Any]) -> None:
    """One training image through the net, the AOPC callback's regions against the image size."""
    if not hasattr(datamodule, "train_set"):
        return  # not a heatmapbench data module: Lightning will say what is wrong
    with data_keys():  # the training images read and scanned (a training tree is needed): errors name data.* keys
        datamodule.setup("fit")
    x = datamodule.train_set[0][0].unsqueeze(0)  # (1, C, H, W)
    net = getattr(model, "net", model)
    check_model_fits_data(net, x, getattr(datamodule, "num_classes", None), exact=True)
    for callback in callbacks:
        if isinstance(callback, AOPCCallback):
            check_regions_fit(callback.settings, tuple(x.shape))


def _run_to_resume(cfg: DictConfig, ckpt: dict[str, Any] | None) -> str | None:
    """The MLflow run to continue: ``logger.run_id``, else the one the checkpoint records in this store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = str(cfg.logger.tracking_uri)
    given = cfg.logger.get("run_id")
    recorded = recorded_run(ckpt) if ckpt is not None else {}
    run_id = given or recorded.get("run_id")
    if run_id is None:
        if ckpt is not None:
            print(f"note: {cfg.ckpt_path} records no MLflow run; the resumed training logs into a new run", flush=True)
        return None
    if not given and recorded.get("tracking_uri") != uri:
        print(f"note: {cfg.ckpt_path} was written in the store {recorded.get('tracking_uri')}, not {uri}; "
              "the resumed training logs into a new run (logger.run_id=... picks one)", flush=True)
        return None
    try:
        with store_lock(uri):
            prepare_sqlite_store(uri)
            retry_locked(MlflowClient(uri).get_run)(run_id)
    except MlflowException as err:
        if given:
            raise ConfigError(f"logger.run_id={run_id!r} is invalid: no such run in {uri}") from err
        print(f"note: the run {run_id} of {cfg.ckpt_path} is not in {uri} (deleted?); the resumed training logs "
              "into a new run", flush=True)
        return None
    return run_id


def build_model_and_data(cfg: DictConfig) -> tuple[pl.LightningModule, pl.LightningDataModule, dict[str, str]]:
    """The model sized to the data's classes and the data in the model's preprocessing.

    The data config is instantiated first for its class count (cheap: no images are read),
    then the model (``head``: a pretrained head of another width is replaced), then the data
    again if the model's preprocessing changed its config. Returns the MLflow tags saying
    what was adapted; the same lines are printed.
    """
    datamodule = instantiate_data(cfg.data)
    classes = getattr(datamodule, "num_classes", None)
    if classes is not None and classes < 2:
        names = ", ".join(map(str, getattr(datamodule, "classes", ()))) or "?"
        raise ConfigError(f"the training data has {classes} class ({names}); a classifier needs at least two: "
                          "point data.train_path (and data.path) at folders with one subfolder per class")
    head_note = adapt_num_classes(cfg, getattr(datamodule, "num_classes", None))
    model: pl.LightningModule = instantiate_model(cfg.model)
    if apply_model_preprocessing(cfg, model):
        datamodule = instantiate_data(cfg.data)
    pre = preprocessing_of(model)
    notes = {"preprocessing": describe_preprocessing(pre) if cfg.get("preprocessing_from_model", True)
             else "the data config's own (preprocessing_from_model=false)"}
    adapted = getattr(getattr(model, "net", None), "adapted_head", None)
    if adapted is not None:
        head_note = (f"the checkpoint's {adapted[0]}-way head replaced by a fresh {adapted[1]}-way one "
                     "(the data's classes; every other weight loaded)")
    if head_note:
        notes["head"] = head_note
    print("\n".join(f"{key}: {value}" for key, value in notes.items()), flush=True)
    return model, datamodule, notes


def _print_summary(cfg: DictConfig, metrics: dict[str, Any], logger: Any, run_id: str | None) -> None:
    lines = ["", "== heatmapbench-train summary =="]
    for key in ("val/acc", "test/acc", "val/loss", "test/loss"):
        if key in metrics:
            lines.append(f"{key:>10}: {metrics[key]:.4f}")
    lines.append(f"outputs   : {cfg.paths.output_dir}")
    if run_id is not None:
        uri = logger._tracking_uri
        lines.append(f"MLflow run: {run_id} (experiment {cfg.logger.experiment_name!r})")
        lines.append(f"store     : {uri}")
        lines.append(f"artifacts : {cfg.logger.artifact_location}")
        lines.append("open the UI: make ui  (then http://127.0.0.1:5000)")
    print("\n".join(lines), flush=True)


def callback_cost(history) -> str | None:
    """One line: the callback's mean time per evaluation (scoring, logging, artifacts) as a share of
    a training epoch without it; None before any epoch was timed."""
    if "callback_seconds" not in history or "epoch_seconds" not in history:
        return None
    epochs = history.epoch_seconds[(history.epoch > 0) & (history.epoch_seconds > 0)].dropna()
    spent = history.callback_seconds.dropna()
    if epochs.empty or spent.empty:
        return None
    return (f"AOPC callback: {spent.mean():.1f} s per evaluation (scoring, logging, artifacts) = "
            f"{100 * spent.mean() / epochs.mean():.0f}% of a training epoch ({epochs.mean():.1f} s without it)")


def _print_aopc(callback: AOPCCallback) -> None:
    """Per epoch: AOPC relative to the random ordering first (the unsupervised measure), then the
    correlations of accuracy with each measure and a plain note when the random ordering correlates too."""
    history = callback.history_frame()
    names = mn.explainers_in(history.columns, measures=(mn.AOPC_REL,))
    columns = ["epoch", "step", "accuracy"] + [mn.explainer_metric(mn.AOPC_REL, n) for n in names]
    table = history[columns].rename(columns=lambda c: p.explainer if (p := mn.parse_explainer_metric(c)) else c)
    table["callback s"] = history.seconds
    table["epoch s"] = history.epoch_seconds
    print("\n== AOPC relative to the random ordering (MoRF), per epoch; accuracy = validation accuracy; "
          "callback s = time of this evaluation, epoch s = the training epoch's (with validation) ==")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="not measured"))
    cost = callback_cost(history)
    if cost:
        print(cost)
    print("\n== correlation of accuracy with AOPC across epochs ==")
    print(correlation_markdown(callback.correlations()), flush=True)
    if history["accuracy"].isna().all():
        print("(no validation images: accuracy not measured; set data.val_size or data.val_fraction)", flush=True)


@launchers_checked
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the test (or validation) accuracy for sweepers."""
    metrics = run_train(cfg)
    return metrics.get("test/acc", metrics.get("val/acc"))


if __name__ == "__main__":
    main()
