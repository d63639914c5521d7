"""End-to-end ``train`` runs on real Fashion-MNIST, read back from MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
import yaml
from mlflow import MlflowClient

from heatmapbench.metrics import names as mn
from heatmapbench.app.train import run_train
from tests.helpers import SHRUNK_TRAIN, cli_env, compose_config, needs_fmnist, run_main, store_uri

pytestmark = [needs_fmnist, pytest.mark.slow]  # trainings and CLI runs


def _only_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, data_dir):
    """One tracked training of one epoch (config, result): its run and its checkpoint are read by two tests."""
    cfg = compose_config("train", [*SHRUNK_TRAIN, "logger.experiment_name=t-track"], tmp_path_factory.mktemp("track"),
                         data_dir)
    return cfg, run_train(cfg)


def test_one_epoch_run_is_tracked(one_epoch):
    cfg, result = one_epoch
    client, run = _only_run(store_uri(cfg), "t-track")
    assert run.info.run_id == result["run_id"]
    assert run.info.status == "FINISHED"
    # readable params (class names, no _target_ keys), the same tags as evaluate runs
    assert run.data.params["data"] == "FashionMNISTDataModule"
    assert run.data.tags["model"] == "SmallCNN" and run.data.tags["task"] == "train"
    assert run.data.tags["explainers"] and run.data.tags["perturbation"] == "uniform"
    assert run.data.params["trainer.max_epochs"] == "1"
    assert run.data.params["model.optimizer.lr"] == "0.001"
    # per-epoch metrics
    for key in ("train/loss", "val/loss", "test/acc"):
        history = client.get_metric_history(run.info.run_id, key)
        assert len(history) == 1, key
    val = sorted(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda m: m.step)
    assert [m.step for m in val][0] == 0 and len(val) == 2  # before training (the AOPC callback), after the epoch
    acc = val[-1].value
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(result["val/acc"])
    # provenance
    assert len(run.data.tags["git_commit"]) >= 7
    assert run.data.tags["heatmapbench_version"]
    # the config artifact is the resolved config
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                               tracking_uri=store_uri(cfg))
    saved = yaml.safe_load(Path(path).read_text())
    assert saved["trainer"]["max_epochs"] == 1
    assert saved["paths"]["mlruns_dir"] == cfg.paths.mlruns_dir


class _Boom(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("boom")


def test_run_that_raises_is_marked_failed(train_cfg):
    cfg = train_cfg("logger.experiment_name=t-fail",
                    "+callbacks.boom._target_=tests.integration.test_train._Boom")
    with pytest.raises(RuntimeError, match="boom"):
        run_train(cfg)
    _, run = _only_run(store_uri(cfg), "t-fail")
    assert run.info.status == "FAILED"


def _no_runs(db: Path) -> None:
    if db.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_a_bad_override_on_the_command_line_exits_clearly_and_creates_no_run(tmp_path):
    # the real command line: Hydra parses and composes (an option of no config group here), the process exits
    args = [sys.executable, "-m", "heatmapbench.app.train", f"paths.mlruns_dir={tmp_path}/mlruns",
            f"hydra.run.dir={tmp_path}/out", "trainer.max_epochs=1", "data=nope"]
    proc = subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: data=nope is not a choice of data: choose from cifar10, fashion_mnist, "
                                        "imagefolder, imagenet_samples, mnist"], proc.stderr[-2000:]
    _no_runs(tmp_path / "mlruns" / "mlflow.db")


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 is invalid"),
    ("data.batch_size=0", "data.batch_size=0 is invalid"),
    ("data=imagefolder", "data.path is required"),
    ("data.path=/no/such/folder", "data.path"),
])
def test_bad_overrides_exit_clearly_and_create_no_run(tmp_path, data_dir, override, message):
    overrides = [override] if override != "data.path=/no/such/folder" else ["data=imagefolder", override]
    cfg = compose_config("train", ["trainer.max_epochs=1", *overrides], tmp_path, data_dir)
    code, err = run_main("train", cfg)  # the command's main, as the CLI runs it on the composed config
    assert code == 2 and "error: " in err and message in err, (code, err[-2000:])
    _no_runs(tmp_path / "mlruns" / "mlflow.db")


def test_checkpoint_of_a_run_evaluates(one_epoch, tmp_path, data_dir):
    from heatmapbench.app.evaluate import run_evaluate

    cfg, result = one_epoch
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ev = compose_config("evaluate", ["model=small_cnn", "data=fashion_mnist", f"ckpt_path={last}", "num_images=8",
                                     "explainer=sensitivity_l2", "evaluation.steps=3", "evaluation.random_repeats=1",
                                     "progress=false", "evaluation.n_boot=100"], tmp_path / "ev", data_dir)
    metrics = run_evaluate(ev)
    # the trained weights were loaded: accuracy well above chance on the first test images
    assert metrics[mn.ACCURACY] >= 0.5 and result["test/acc"] > 0.5
