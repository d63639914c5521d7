"""``heatmapbench-train``: fit a classifier with Lightning, tracked in MLflow.

    python -m heatmapbench.train data=fashion_mnist model=small_cnn trainer.max_epochs=3
"""

from __future__ import annotations

from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from heatmapbench import metric_names as mn
from heatmapbench.callbacks import AOPCCallback
from heatmapbench.cli import instantiate_callbacks, user_errors_exit
from heatmapbench.config import validate
from heatmapbench.evaluation.artifacts import correlations
from heatmapbench.registry import conf_dir
from heatmapbench.tracking import make_logger, run_identity, tracked_run


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, fit (and test) from a composed ``train`` config; return the final metrics.

    Everything that can be wrong with the config or the data fails before an MLflow run exists.
    """
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    model: pl.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    run_name = run_identity(cfg)[0] if cfg.get("logger") and cfg.logger.get("run_name") is None else None
    logger = make_logger(cfg.logger, **({"run_name": run_name} if run_name else {})) if cfg.get("logger") else None
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)

    def fit_and_test() -> dict[str, Any]:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.get("test"):
            for results in trainer.test(model, datamodule=datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in results.items()})
        return metrics

    if logger is None:
        metrics = fit_and_test()
        run_id = None
    else:
        with tracked_run(logger, cfg, extra_tags={"task": "train", **run_identity(cfg)[1]}):
            metrics = fit_and_test()
        run_id = logger.run_id
    _print_summary(cfg, metrics, logger, run_id)
    for callback in callbacks:
        if isinstance(callback, AOPCCallback) and callback.history:
            _print_aopc(callback)
    return {"run_id": run_id, **metrics}


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
    history = callback.history_frame()
    names = mn.explainers_in(history.columns, measures=(mn.AOPC,))
    columns = ["epoch", "accuracy"] + [mn.explainer_metric(mn.AOPC, n) for n in names] + ["seconds", "epoch_seconds"]
    table = history[columns].rename(columns=lambda c: p.explainer if (p := mn.parse_explainer_metric(c)) else c)
    print("\n== AOPC (MoRF) per epoch; accuracy = validation accuracy; seconds = callback time, epoch_seconds = training epoch time ==")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    cost = callback_cost(history)
    if cost:
        print(cost)
    corr = correlations(history)
    print("\n== correlation of accuracy and AOPC across epochs ==")
    print(corr.to_string(index=False, float_format=lambda v: f"{v:+.3f}"), flush=True)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the test (or validation) accuracy for sweepers."""
    metrics = run_train(cfg)
    return metrics.get("test/acc", metrics.get("val/acc"))


if __name__ == "__main__":
    main()
