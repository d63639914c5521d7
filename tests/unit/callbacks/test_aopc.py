"""The per-epoch AOPC callback: metrics, artifacts and correlations in MLflow; training undisturbed."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from PIL import Image
from scipy import stats

from heatmapbench.metrics import names as mn
from heatmapbench.app.train import run_train
from tests.helpers import SHRUNK_TRAIN, compose_config, needs_fmnist, store_uri

pytestmark = [needs_fmnist, pytest.mark.slow]

EXPLAINERS = ["random", "sensitivity_l2", "deconvnet_l2", "lrp_epsilon_0.01", "lrp_alpha2_beta1"]
SMALL = ["trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "data.eval_subset_size=12",
         "evaluation.steps=6", "evaluation.random_repeats=2"]


def _run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return run


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def _values(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_epochs_log_aopc_artifacts_and_correlations(train_cfg, tmp_path):
    cfg = train_cfg("trainer.max_epochs=2", "logger.experiment_name=t-aopc", *SMALL)
    run_train(cfg)
    client = MlflowClient(store_uri(cfg))
    run = _run(client, "t-aopc")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # every evaluation metric is logged at the step Lightning logs val/acc at (one chart in the UI)
    all_val_steps = _steps(client, run_id, mn.VAL_ACC)
    assert all_val_steps[0] == 0  # val/acc before training too (the callback's held-out accuracy)
    val_steps = all_val_steps[1:]
    assert len(val_steps) == 2 and val_steps[0] > 0
    steps = [0, *val_steps]  # step 0: before training
    for name in EXPLAINERS:
        for measure in (mn.AOPC, mn.AOPC_REL, mn.AOPC_NORM, mn.COMPLEXITY_PNG):
            assert _steps(client, run_id, mn.explainer_metric(measure, name)) == steps, (measure, name)
        # the logged correlations are those of the logged per-epoch accuracy and measures (scipy)
        accuracy = _values(client, run_id, mn.ACCURACY)
        values = _values(client, run_id, mn.explainer_metric(mn.AOPC_REL, name))
        logged = run.data.metrics[mn.correlation_metric("pearson", mn.AOPC_REL, name)]
        assert logged == pytest.approx(float(stats.pearsonr(accuracy, values)[0]), abs=1e-9)
        # one number per run: the rest lives in the table artifact, not as one-dot charts
        assert mn.correlation_metric("spearman", mn.AOPC_REL, name) not in run.data.metrics
        assert mn.correlation_metric("pearson", mn.AOPC, name, "lo") not in run.data.metrics
    for key in (mn.SECONDS, mn.ACCURACY, mn.SUBSET_ACCURACY, mn.random_ordering_metric(mn.AOPC)):
        assert _steps(client, run_id, key) == steps, key
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, mn.EPOCH)}
    assert epochs == {steps[0]: 0.0, steps[1]: 1.0, steps[2]: 2.0}
    assert mn.random_ordering_correlation("pearson", mn.AOPC) in run.data.metrics
    # epoch 0 is the untrained net, the later ones use val/acc of the same step
    acc = {m.step: m.value for m in client.get_metric_history(run_id, mn.ACCURACY)}
    val = {m.step: m.value for m in client.get_metric_history(run_id, mn.VAL_ACC)}
    for step in val_steps:
        assert acc[step] == pytest.approx(val[step])
    # AOPC relative to random is the raw AOPC minus the random ordering's, at every step
    raw = {m.step: m.value for m in client.get_metric_history(run_id, mn.explainer_metric(mn.AOPC, "sensitivity_l2"))}
    rel = {m.step: m.value for m in client.get_metric_history(run_id, mn.explainer_metric(mn.AOPC_REL, "sensitivity_l2"))}
    rnd = {m.step: m.value for m in client.get_metric_history(run_id, mn.random_ordering_metric(mn.AOPC))}
    for step in steps:
        assert rel[step] == pytest.approx(raw[step] - rnd[step], abs=1e-6)
    # artifacts of every evaluation epoch
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="aopc",
                                                     tracking_uri=store_uri(cfg), dst_path=str(tmp_path)))
    for epoch in (0, 1, 2):
        folder = local / f"epoch_{epoch:03d}"
        curves = pd.read_csv(folder / "aopc_curves.csv")
        assert set(curves.explainer) == set(EXPLAINERS)
        assert sorted(curves.step.unique()) == list(range(7))
        assert (curves[curves.step == 0].aopc == 0).all()  # f(x0) − f(x0)
        assert (folder / "summary.csv").exists() and (folder / "reliability.csv").exists()
        for png in ("aopc_curves.png", "heatmap_gallery.png"):  # figures="ends": before training and the last
            if epoch == 1:
                assert not (folder / png).exists(), png
                continue
            with Image.open(folder / png) as im:
                assert im.size[0] >= 1200 and im.info["dpi"][0] == pytest.approx(150, abs=1), png
    history = pd.read_csv(local / "aopc_history.csv")
    assert history.epoch.tolist() == [0, 1, 2] and history.step.tolist() == steps
    assert (history.callback_seconds >= history.seconds).all()  # the whole cost: scoring + logging + artifacts
    assert (history.epoch_seconds[1:] > 0).all()  # measured in the epoch it belongs to (no NaN, no lag)
    corr = pd.read_csv(local / "aopc_accuracy_correlation.csv")
    assert set(corr.explainer) == set(EXPLAINERS) | {"random ordering"}
    row = corr[(corr.explainer == "lrp_epsilon_0.01") & (corr.measure == mn.AOPC_REL)].iloc[0]
    assert row.pearson == pytest.approx(run.data.metrics[mn.correlation_metric("pearson", mn.AOPC_REL, "lrp_epsilon_0.01")])
    column = mn.explainer_metric(mn.AOPC_REL, "lrp_epsilon_0.01")
    assert row.pearson == pytest.approx(np.corrcoef(history.accuracy, history[column])[0, 1])
    with Image.open(local / "accuracy_vs_aopc.png") as im:
        assert im.size[0] >= 1200


@pytest.fixture(scope="module")
def every_second_epoch(tmp_path_factory, data_dir):
    """One training of 3 epochs evaluated every 2nd epoch, with artifacts: read by the two tests below."""
    cfg = compose_config("train", [*SHRUNK_TRAIN, "trainer.max_epochs=3", "callbacks.aopc.every_n_epochs=2",
                                   "logger.experiment_name=t-every", "evaluation.explainers=[random,sensitivity_l2]",
                                   *SMALL], tmp_path_factory.mktemp("every"), data_dir)
    run_train(cfg)
    return cfg


def test_every_n_epochs(every_second_epoch):
    cfg = every_second_epoch
    client = MlflowClient(store_uri(cfg))
    run = _run(client, "t-every")
    val_steps = [s for s in _steps(client, run.info.run_id, mn.VAL_ACC) if s > 0]  # three epochs; evaluated before and after the 2nd
    assert len(val_steps) == 3
    for name in ("random", "sensitivity_l2"):
        assert _steps(client, run.info.run_id, mn.explainer_metric(mn.AOPC, name)) == [0, val_steps[1]]
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, mn.EPOCH)]
    assert epochs == [0.0, 2.0]
    assert mn.explainer_metric(mn.AOPC, "deconvnet_l2") not in run.data.metrics


def test_figures_of_the_last_evaluation_drawn_at_the_end(every_second_epoch, tmp_path):
    # evaluated after epoch 2 of 3: not known to be the last then, so drawn when training ends
    cfg = every_second_epoch
    client = MlflowClient(store_uri(cfg))
    run_id = _run(client, "t-every").info.run_id
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="aopc",
                                                     tracking_uri=store_uri(cfg), dst_path=str(tmp_path)))
    assert sorted(p.name for p in local.glob("epoch_*")) == ["epoch_000", "epoch_002"]
    for epoch in (0, 2):
        assert {"aopc_curves.png", "heatmap_gallery.png", "aopc_curves.csv"} <= {
            p.name for p in (local / f"epoch_{epoch:03d}").iterdir()}
    with pytest.raises(ValueError, match="figures='some' is invalid"):
        from heatmapbench.callbacks import AOPCCallback
        AOPCCallback(figures="some")


class CaptureWeights(pl.Callback):
    weights: list[dict[str, torch.Tensor]] = []

    def on_fit_end(self, trainer, pl_module):
        CaptureWeights.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_callback_does_not_disturb_training(train_cfg):
    CaptureWeights.weights.clear()
    capture = "+callbacks.capture._target_=tests.unit.callbacks.test_aopc.CaptureWeights"
    common = ["trainer.max_epochs=2", capture, *SMALL]
    run_train(train_cfg(*common, "logger.experiment_name=t-with", "evaluation.explainers=[random,smoothgrad]"))
    run_train(train_cfg(*common, "logger.experiment_name=t-without", "callbacks.aopc=null"))
    with_cb, without_cb = CaptureWeights.weights
    assert with_cb.keys() == without_cb.keys()
    for key in with_cb:
        assert torch.equal(with_cb[key], without_cb[key]), key


def test_callback_cost_line():
    from heatmapbench.app.train import callback_cost

    history = pd.DataFrame({"epoch": [0, 1, 2], "seconds": [1.5, 1.5, 2.5], "callback_seconds": [2.0, 2.0, 3.0],
                            "epoch_seconds": [0.0, float("nan"), 10.0]})
    assert callback_cost(history) == ("AOPC callback: 2.3 s per evaluation (scoring, logging, artifacts) = "
                                      "23% of a training epoch (10.0 s without it)")
    assert callback_cost(history.assign(epoch_seconds=[0.0, float("nan"), float("nan")])) is None
