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
