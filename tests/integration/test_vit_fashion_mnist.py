"""``experiment=vit_fashion_mnist`` on tiny settings: a small ViT trains with cp_lrp and attnlrp tracked."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from heatmapbench.app.train import run_train
from heatmapbench.metrics import names as mn
from tests.helpers import needs_fmnist, store_uri

pytestmark = [needs_fmnist, pytest.mark.slow]  # a training


def test_vit_fashion_mnist_experiment_runs_on_tiny_settings(train_cfg):
    cfg = train_cfg("experiment=vit_fashion_mnist", "logger.experiment_name=t-vit", "trainer.limit_train_batches=2",
                    "evaluation.steps=3", "evaluation.random_repeats=1", "callbacks.aopc.subset_size=4",
                    "evaluation.explainers=[cp_lrp,attnlrp,sensitivity_l2,random]")
    assert cfg.model.net._target_ == "heatmapbench.models.SmallViT"
    result = run_train(cfg)
    client = MlflowClient(tracking_uri=store_uri(cfg))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for name in ("cp_lrp", "attnlrp", "sensitivity_l2"):
        history = client.get_metric_history(run.info.run_id, mn.explainer_metric(mn.AOPC, name))
        assert len(history) == 2, name  # before training and after the one epoch
