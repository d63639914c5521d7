"""``AOPCCallback``: heatmap quality (AOPC) tracked against accuracy while a network trains.

Paper Fig. 7: on CIFAR-10, AOPC rises with test accuracy during training, so heatmap
quality can assess a network without labels. The callback measures AOPC once before
training (epoch 0) and after every ``every_n_epochs`` training epochs, whether or not the
trainer validates, on the data module's fixed evaluation subset, with the predicted classes
as targets, and logs everything to the trainer's MLflow run. The accuracy beside it is
measured on the held-out validation images (never trained on); without any, it is NaN
("not measured"), never 0.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation.settings import EvaluationSettings
from heatmapbench.perturbation.engine import eval_mode
from heatmapbench.accel.precision import check_precision
from heatmapbench.evaluation import (
    ExplainerSpec,
    ModelScoresNotFinite,
    build_explainers,
    build_perturbation,
    build_settings,
    engine_forwards,
    evaluate_batch,
)
from heatmapbench.evaluation.correlation import correlations
from heatmapbench.evaluation.figures import plot_accuracy_vs_aopc, write_figures
from heatmapbench.evaluation.markdown import correlation_markdown
from heatmapbench.evaluation.style import RANDOM_ORDERING_LABEL, epoch_label, settings_title
from heatmapbench.evaluation.writer import write_evaluation

FIGURES = ("ends", "every")
#: What the history and the run say for an evaluation of a model whose scores are NaN or inf.
NOT_FINITE = "not measured: the model's scores are not finite"


class AOPCCallback(pl.Callback):
    """Per-epoch region-perturbation evaluation of several explainers.

    Parameters
    ----------
    settings
        :class:`EvaluationSettings` or a mapping of its fields: the explainers (default:
        random, sensitivity, deconvnet, two LRPs), region size, steps, orders, …
    perturbation
        A perturbation name, config node or instance (default: the paper's uniform noise).
    explainers
        Explainer objects or names (see :func:`~heatmapbench.evaluation.build_explainers`) that
        replace ``settings.explainers``, e.g. ``{"mine": MyExplainer()}``.
    every_n_epochs
        Evaluate after every n-th validation epoch (epoch 0, before training, always).
    subset_size
        Images of the data module's ``eval_subset()``; ``None`` takes the data module's ``eval_subset_size``.
    log_abpc, log_complexity
        Also log ``abpc/<explainer>`` (runs LeRF too) and ``complexity_png/<explainer>``.
    artifacts
        Write the tables of every evaluation (curves, summary, tests, per-image AOPC, reliability).
    figures
        When to draw the Fig. 4 plot and the heatmap gallery (about two thirds of the cost of the
        artifacts): ``"ends"`` (default) before training and for the last weights (the last
        evaluation; drawn at the end of training if that was not known in advance), ``"every"``
        every evaluation.
    gallery_size
        Images in the gallery.
    output_dir
        Where the tables and figures are written before they are logged (``<run folder>/aopc`` in
        ``heatmapbench-train``): per evaluation ``epoch_<nnn>/``, at the end the history and the
        correlations. ``None``: a temporary folder (MLflow keeps the only copy).
    progress
        Show a progress bar (with ETA, per forward chunk) when an evaluation runs longer than a
        few seconds; ``False`` keeps it quiet.

    Notes
    -----
    Metrics are logged at Lightning's logging step (the step of ``val/acc``), so they overlay
    ``val/acc`` on the Step axis of the MLflow UI; ``eval/epoch`` gives the epoch beside them.
    Names: :mod:`heatmapbench.metrics.names`.
    """

    def __init__(self, settings: EvaluationSettings | Mapping[str, Any] | None = None,
                 perturbation: Any = "uniform", every_n_epochs: int = 1, subset_size: int | None = None,
                 log_abpc: bool = False, log_complexity: bool = True, artifacts: bool = True,
                 gallery_size: int = 6, explainers: ExplainerSpec | None = None, progress: bool = True,
                 figures: str = "ends", output_dir: str | None = None) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if figures not in FIGURES:
            raise ValueError(f"figures={figures!r} is invalid: choose one of {', '.join(FIGURES)}")
        self.settings = build_settings(settings)
        check_precision(self.settings.precision, "cuda" if torch.cuda.is_available() else "cpu")
        if log_abpc and "lerf" not in self.settings.orders:
            self.settings.orders = list(self.settings.orders) + ["lerf"]
        self.settings.complexity = log_complexity
        # names resolved once, before training starts
        self.explainers = build_explainers(self.settings.explainers if explainers is None else explainers)
        self.perturbation = build_perturbation(perturbation)
        self.every_n_epochs = every_n_epochs
        self.subset_size = subset_size
        self.log_abpc = log_abpc
        self.log_complexity = log_complexity
        self.artifacts = artifacts
        self.gallery_size = gallery_size
        self.figures = figures
        self.progress = progress
        self.output_dir = Path(output_dir) if output_dir else None
        self._undrawn: tuple | None = None  # (evaluation, epoch) whose figures are still to draw
        self.history: list[dict[str, float]] = []
        self._subset: tuple[torch.Tensor, torch.Tensor] | None = None
        self._epoch_start = 0.0

    # -- helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _files(self, sub: str) -> Iterator[Path]:
        """The folder the files of ``sub`` are written to: ``output_dir/sub`` (kept), else a temporary one."""
        if self.output_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                yield Path(tmp)
            return
        folder = self.output_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        yield folder

    @staticmethod
    def _net(pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)
        return net if isinstance(net, nn.Module) else pl_module

    @staticmethod
    def _mlflow(trainer: pl.Trainer):
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                return logger
        return None

    @staticmethod
    def _step(trainer: pl.Trainer) -> int:
        """The step Lightning logs ``val/acc`` at (batches that stepped the optimizer), else the global step."""
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        step = getattr(loop, "_batches_that_stepped", None)
        return int(trainer.global_step if step is None else step)

    def _held_out_accuracy(self, trainer: pl.Trainer, net: nn.Module) -> float:
        """Accuracy on the validation batches Lightning would use; NaN without validation images."""
        dm = trainer.datamodule
        has_val = getattr(dm, "has_validation", None)
        if has_val is None or not has_val():
            return float("nan")
        loader = dm.val_dataloader()
        limit = trainer.limit_val_batches
        n_batches = min(int(limit), len(loader)) if isinstance(limit, int) else int(len(loader) * limit)
        correct = total = 0
        # in eval mode, with the RNG forked: training must not notice the measurement; every
        # module gets its own mode back (net.train() would put a fine-tuned backbone's kept
        # BatchNorm layers in train mode)
        with eval_mode(net), torch.no_grad(), \
                torch.random.fork_rng(devices=[] if self._device.type == "cpu" else [self._device]):
            for i, (x, y) in enumerate(loader):
                if i >= n_batches:
                    break
                x, y = x.to(self._device), y.to(self._device)
                correct += int((net(x).argmax(1) == y).sum())
                total += len(y)
        return correct / total if total else float("nan")

    # -- hooks ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_subset"):
            raise ValueError("AOPCCallback needs a heatmapbench data module (with eval_subset(), mean, std)")
        self._device = pl_module.device
        x, y = dm.eval_subset(self.subset_size)
        self._subset = (x.to(self._device), y.to(self._device))
        self._norm = dm.normalization
        self._classes = tuple(getattr(dm, "classes", ()))
        self._validated_epoch = -1
        if trainer.is_global_zero and not self.history:  # a resumed training has its history back
            self._evaluate(trainer, pl_module, epoch=0,
                           accuracy=self._held_out_accuracy(trainer, self._net(pl_module)))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._busy = 0.0  # seconds of this callback inside the epoch, kept out of the epoch's time

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch
            # the step val/acc is logged at: Lightning validates inside the epoch's last batch,
            # before it counts that batch, so by on_train_epoch_end the counter is one further
            self._validated_step = self._step(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning validates at the end of the epoch before this hook, so val/acc (when the
        # trainer validated this epoch) belongs to the weights scored here.
        if not trainer.is_global_zero:
            return
        # Lightning validates inside the training epoch (before on_train_epoch_end): the epoch's
        # time so far, training and validation, is measured here, before this callback's own work
        epoch_seconds = time.perf_counter() - self._epoch_start
        epoch = trainer.current_epoch + 1  # epochs of training behind these weights
        if epoch % self.every_n_epochs:
            return
        acc = trainer.callback_metrics.get(mn.VAL_ACC)
        step = None
        if self._validated_epoch == trainer.current_epoch and acc is not None:
            accuracy, step = float(acc), self._validated_step  # one chart with val/acc in the UI
        else:  # no validation this epoch (check_val_every_n_epoch, or no validation images)
            accuracy = self._held_out_accuracy(trainer, self._net(pl_module))
        self._evaluate(trainer, pl_module, epoch=epoch, accuracy=accuracy, epoch_seconds=epoch_seconds, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        if self._undrawn is not None:  # training ended before the epoch count said it would
            start = time.perf_counter()
            self._draw(trainer, *self._undrawn)
            self.history[-1]["callback_seconds"] = self.history[-1].get("callback_seconds", 0.0) + \
                time.perf_counter() - start
        history = self.history_frame()
        corr = self.correlations()
        logger = self._mlflow(trainer)
        if logger is None and self.output_dir is None:
            return
        # one number per run: a few metrics (Pearson's r of AOPC relative to random per explainer, and of the
        # random ordering's AOPC, the confound check); the rest (Spearman, CIs, other measures) in the table
        # artifact aopc/aopc_accuracy_correlation.{csv,md}, not dozens of one-dot charts in the UI
        metrics = {}
        for _, row in corr.iterrows():
            baseline = row.explainer == RANDOM_ORDERING_LABEL
            if row.measure != (mn.AOPC if baseline else mn.AOPC_REL) or math.isnan(row.pearson):
                continue
            name = (mn.random_ordering_correlation("pearson", row.measure) if baseline
                    else mn.correlation_metric("pearson", row.measure, row.explainer))
            metrics[name] = float(row.pearson)
        with self._files("") as folder:  # the files first, then the store
            files = [folder / "aopc_history.csv", folder / "aopc_accuracy_correlation.csv",
                     folder / "aopc_accuracy_correlation.md", folder / "accuracy_vs_aopc.png"]
            history.to_csv(files[0], index=False)
            corr.to_csv(files[1], index=False)
            files[2].write_text(correlation_markdown(corr))
            plot_accuracy_vs_aopc(history, files[3], corr=corr,
                                  title=settings_title(self.settings, self.perturbation, len(self._subset[0]),
                                                       "Accuracy and AOPC during training · "))
            if logger is None:
                return
            if metrics:
                logger.log_metrics(metrics, step=int(history.step.max()))
            for file in files:
                logger.experiment.log_artifact(logger.run_id, str(file), artifact_path="aopc")

    # -- the evaluation ------------------------------------------------------------------
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int,
                  accuracy: float | None, epoch_seconds: float = 0.0, step: int | None = None) -> None:
        """Score, log and write artifacts; ``callback_seconds`` is the whole cost to training."""
        start = time.perf_counter()
        try:
            self._score_and_log(trainer, pl_module, epoch, accuracy, epoch_seconds, step)
        finally:
            spent = time.perf_counter() - start
            self._busy = getattr(self, "_busy", 0.0) + spent
            if self.history and self.history[-1]["epoch"] == epoch:
                self.history[-1]["callback_seconds"] = spent

    def _score_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int,
                       accuracy: float | None, epoch_seconds: float, step: int | None = None) -> None:
        assert self._subset is not None
        start = time.perf_counter()
        x, y = self._subset
        net = self._net(pl_module)
        total = engine_forwards(self.settings, len(x), len(self.explainers), x.device.type)
        # shown only when the evaluation takes longer than a few seconds
        with tqdm(total=total, desc=f"AOPC epoch {epoch}", unit="img", unit_scale=True, leave=False, delay=3,
                  disable=not self.progress, dynamic_ncols=True) as bar:
            # the callback must not disturb training: its random draws use a forked RNG state
            with torch.random.fork_rng(devices=[] if self._device.type == "cpu" else [self._device]):
                try:
                    evaluation = evaluate_batch(net, x, self.explainers, self.settings, self.perturbation,
                                                label=y, gallery_size=self.gallery_size if self.artifacts else 0,
                                                progress=bar.update, **self._norm)
                except ModelScoresNotFinite as err:  # a diverged training: its own business, not the callback's
                    self._not_measured(trainer, epoch, accuracy, epoch_seconds, step, err, time.perf_counter() - start)
                    return
        seconds = time.perf_counter() - start
        subset_acc = float((evaluation.target == y.cpu()).double().mean())
        step = self._step(trainer) if step is None else step
        row: dict[str, float] = {"epoch": epoch, "step": step,
                                 "accuracy": accuracy if accuracy is not None else float("nan"),
                                 "subset_accuracy": subset_acc, "seconds": seconds, "epoch_seconds": epoch_seconds}
        metrics = {mn.EPOCH: float(epoch), mn.SECONDS: seconds, mn.SUBSET_ACCURACY: subset_acc,
                   mn.random_ordering_metric(mn.AOPC): float(evaluation.random_aopc().mean()),
                   mn.random_ordering_metric(mn.AOPC_NORM): evaluation.aopc_norm()}
        row.update({k: metrics[k] for k in (mn.random_ordering_metric(mn.AOPC), mn.random_ordering_metric(mn.AOPC_NORM))})
        for name in evaluation.explainers:
            for measure, value in ((mn.AOPC_REL, float(evaluation.aopc_relative(name).mean())),
                                   (mn.AOPC_NORM, evaluation.aopc_norm(name)),
                                   (mn.AOPC, float(evaluation.aopc(name).mean()))):
                row[mn.explainer_metric(measure, name)] = metrics[mn.explainer_metric(measure, name)] = value
            if self.log_abpc:
                metrics[mn.explainer_metric(mn.ABPC, name)] = float(evaluation.abpc(name).mean())
            if self.log_complexity and name in evaluation.complexity:
                metrics[mn.explainer_metric(mn.COMPLEXITY_PNG, name)] = float(
                    evaluation.complexity[name]["png"].double().mean())
        if accuracy is not None and not math.isnan(accuracy):
            metrics[mn.ACCURACY] = accuracy
            if epoch == 0:  # val/acc before training too, on the same chart as Lightning's later values
                metrics[mn.VAL_ACC] = accuracy
        self.history.append(row)
        logger = self._mlflow(trainer)
        if self.artifacts and (logger is not None or self.output_dir is not None):  # the files first
            last = trainer.should_stop or (trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch)
            draw = self.figures == "every" or epoch == 0 or last
            with self._files(f"epoch_{epoch:03d}") as folder:
                statistics = evaluation.statistics(n_boot=self.settings.n_boot, seed=self.settings.seed)
                write_evaluation(evaluation, folder, self._classes, title=self._title(evaluation, epoch),
                                 statistics=statistics, figures=draw)
                if logger is not None:
                    logger.experiment.log_artifacts(logger.run_id, str(folder), artifact_path=f"aopc/epoch_{epoch:03d}")
            self._undrawn = None if draw else (evaluation, epoch)
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)

    def _not_measured(self, trainer: pl.Trainer, epoch: int, accuracy: float | None, epoch_seconds: float,
                      step: int | None, err: ModelScoresNotFinite, seconds: float) -> None:
        """Record an evaluation the model's own NaN/inf scores made impossible; training goes on."""
        step = self._step(trainer) if step is None else step
        accuracy = float("nan") if accuracy is None else accuracy
        self.history.append({"epoch": epoch, "step": step, "accuracy": accuracy, "seconds": seconds,
                             "epoch_seconds": epoch_seconds, "note": NOT_FINITE})
        print(f"warning: AOPC at epoch {epoch} {NOT_FINITE} ({err})", flush=True)
        logger = self._mlflow(trainer)
        if logger is None:
            return
        metrics = {mn.EPOCH: float(epoch), mn.SECONDS: seconds}
        if not math.isnan(accuracy):
            metrics[mn.ACCURACY] = accuracy
        logger.log_metrics(metrics, step=step)
        logger.experiment.log_text(logger.run_id, f"{NOT_FINITE}\n{err}\n", f"aopc/epoch_{epoch:03d}/not_measured.txt")

    def _title(self, evaluation, epoch: int) -> str:
        return settings_title(self.settings, self.perturbation, evaluation.num_images, f"{epoch_label(epoch)} · ")

    def _draw(self, trainer: pl.Trainer, evaluation, epoch: int) -> None:
        """The figures of an evaluation logged without them (the last one, when training stopped early)."""
        logger = self._mlflow(trainer)
        if logger is None and self.output_dir is None:
            return
        with self._files(f"epoch_{epoch:03d}") as folder:
            files = write_figures(evaluation, folder, self._classes, self._title(evaluation, epoch))
            for file in files.values() if logger is not None else ():
                logger.experiment.log_artifact(logger.run_id, str(file), artifact_path=f"aopc/epoch_{epoch:03d}")
        self._undrawn = None

    def state_dict(self) -> dict[str, Any]:
        """The history (plain numbers), saved in checkpoints so that a resumed training continues it."""
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.history = [dict(row) for row in state_dict.get("history", [])]

    def history_frame(self) -> pd.DataFrame:
        """One row per evaluation: epoch, step, accuracy, seconds and the measures by metric name
        (``aopc_rel/<explainer>``, ``aopc_norm/<explainer>``, ``aopc/<explainer>``, ``eval/random_ordering/…``)."""
        return pd.DataFrame(self.history)

    def correlations(self) -> pd.DataFrame:
        """Correlation of accuracy with every measure across the evaluations so far, with bootstrap CIs."""
        return correlations(self.history_frame(), measures=mn.CORRELATED_MEASURES, n_boot=self.settings.n_boot,
                            seed=self.settings.seed)
