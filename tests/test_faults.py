"""Runs that survive faults, each tried for real: signals sent to real subprocesses, real sqlite
stores, the exit status and the store's state asserted (nothing left RUNNING, a reason tag)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
#: A tiny evaluation on a 32×32 RGB image folder with an untrained small CNN, long enough to be
#: interrupted (many random orderings), quick to start.
EVAL = ["data=imagefolder", "data.image_size=32", "data.resize=32", "data.batch_size=8", "model=small_cnn",
        "model.num_classes=3", "model.net.in_channels=3", "+model.net.image_size=32", "evaluation=small_images",
        "evaluation.explainers=[sensitivity_l2]", "device=cpu", "progress=false", "evaluation.n_boot=50", "gallery_size=0"]
#: A debug training: few batches, one cheap AOPC explainer on 4 images, no artifacts.
TRAIN = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.progress_bar=null", "data.eval_subset_size=4", "data.batch_size=32",
         "evaluation.explainers=[sensitivity_l2]", "evaluation.steps=4", "evaluation.random_repeats=1",
         "callbacks.aopc.artifacts=false", "callbacks.aopc.log_complexity=false"]


def make_images(root: Path, classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


def store(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlruns/mlflow.db"


def runs(tmp: Path) -> list:
    client = MlflowClient(store(tmp))
    return sorted(client.search_runs([e.experiment_id for e in client.search_experiments()]),
                  key=lambda r: r.info.start_time)


def start(tmp: Path, module: str, *overrides: str) -> subprocess.Popen:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m before the overrides
    args = [sys.executable, "-m", f"heatmapbench.{module}", *flags, f"paths.mlruns_dir={tmp}/mlruns",
            f"hydra.run.dir={tmp}/out", f"hydra.sweep.dir={tmp}/multirun",
            *(o for o in overrides if not o.startswith("-"))]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=tmp)


def wait_for_running(proc: subprocess.Popen, tmp: Path, timeout: float = 240.0) -> None:
    """Block until the process has an MLflow run RUNNING in its store (read with plain sqlite)."""
    db = tmp / "mlruns" / "mlflow.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before its run started:\n{proc.stdout.read()[-3000:]}")
        if db.is_file():
            with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(db, timeout=1)) as con:
                if con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]:
                    return
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no RUNNING run appeared")


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


# -- signals and exceptions end the run, with the right exit status ---------------------------
@pytest.mark.slow
def test_ctrl_c_during_evaluate_kills_the_run(tmp_path, images):
    signum = signal.SIGINT  # SIGTERM: the multirun test below
    proc = start(tmp_path, "evaluate", *EVAL, f"data.path={images}", "evaluation.random_repeats=400")
    wait_for_running(proc, tmp_path)
    proc.send_signal(signum)
    code, out = finish(proc)
    assert code == 128 + signum, out[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["end_reason"] == f"{signal.Signals(signum).name} received"
    assert "interrupted:" in out


@pytest.mark.slow
def test_sigterm_in_a_multirun_kills_the_job_and_stops_the_sweep(tmp_path, images):
    proc = start(tmp_path, "evaluate", "-m", *EVAL, f"data.path={images}", "evaluation.random_repeats=400",
                 "evaluation.region_size=4,8")
    wait_for_running(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out[-3000:]
    (run,) = runs(tmp_path)  # the second job never started
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_sigterm_during_train_kills_the_run_and_exits_143(tmp_path, data_dir):
    proc = start(tmp_path, "train", *TRAIN, f"paths.data_dir={data_dir}", "trainer.max_epochs=50", "trainer.limit_train_batches=50")
    wait_for_running(proc, tmp_path)
    time.sleep(2)  # inside Lightning's fit, where its own SIGTERM handler runs first
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "SIGTERM received"


# -- resume: same run, continued optimiser/epoch/step, AOPC history without gaps or duplicates --
@pytest.mark.slow
def test_resume_continues_the_same_run(train_cfg):
    from heatmapbench.models.checkpoints import KEY, load_checkpoint
    from heatmapbench.train import run_train

    first = run_train(train_cfg(*TRAIN))
    last = Path(train_cfg(*TRAIN).paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)  # weights_only=True: plain data only
    assert ckpt[KEY]["mlflow"]["run_id"] == first["run_id"] and ckpt["epoch"] == 0
    assert ckpt[KEY]["config"]["trainer"]["max_epochs"] == 1
    assert "optimizer" not in ckpt["hyper_parameters"]
    cfg = train_cfg(*TRAIN, "trainer.max_epochs=2", f"ckpt_path={last}")
    second = run_train(cfg)
    assert second["run_id"] == first["run_id"]
    client = MlflowClient(f"sqlite:///{cfg.paths.mlruns_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert "trainer.max_epochs" in run.data.tags["resume_1_changed"] and run.data.params["trainer.max_epochs"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "aopc/sensitivity_l2")]
    assert sorted(steps) == [0, 1, 2]  # epoch 0 (before training) once, then one per epoch
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert val_steps == [val_steps[0], val_steps[0] + 3]  # one per epoch; the global step continued (3 batches)
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * ckpt["global_step"]
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 2 * ckpt["optimizer_states"][0]["state"][0]["step"]


# -- checkpoints are plain data, loaded with weights_only=True ---------------------------------
class _Payload:
    """Unpickling this calls ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(tmp_path, train_cfg):
    import torch

    from heatmapbench.models import SmallCNN
    from heatmapbench.models.checkpoints import UnsafeCheckpointError
    from heatmapbench.models.zoo import from_checkpoint
    from heatmapbench.train import run_train

    marker = tmp_path / "pwned"
    crafted = tmp_path / "last.ckpt"
    torch.save({"state_dict": SmallCNN().state_dict(), "epoch": 0, "loops": {}, "optimizer_states": [],
                "hyper_parameters": {"x": _Payload(marker)}}, crafted)
    with pytest.raises(UnsafeCheckpointError, match="need code to unpickle"):
        from_checkpoint(str(crafted), SmallCNN())
    cfg = train_cfg(*TRAIN, f"ckpt_path={crafted}")
    with pytest.raises(UnsafeCheckpointError, match="ckpt_path="):
        run_train(cfg)
    assert not marker.exists()
    assert not Path(cfg.paths.mlruns_dir).exists()  # refused before any run (or store) exists
    # the same object does run code when unpickled without the allow-list: the test is sound
    torch.load(crafted, weights_only=False)
    assert marker.exists()
