"""Sweeps: parallel jobs on one sqlite store, failing jobs, and a real MLflow tracking server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from heatmapbench.metrics import names as mn
from heatmapbench.perturbation import Perturbation
from tests.helpers import cli_env, needs_fmnist

pytestmark = [pytest.mark.slow, needs_fmnist]

# A tiny evaluation: the small CNN (random weights) on 4 Fashion-MNIST test images.
TINY = ["model=small_cnn", "data=fashion_mnist", "num_images=4", "data.batch_size=4", "evaluation.steps=3",
        "evaluation.random_repeats=1", "evaluation.n_boot=100", "progress=false", "gallery_size=0"]


class Exploding(Perturbation):
    """A perturbation that fails inside the run (after the MLflow run exists)."""

    name = "exploding"

    def prepare(self, x, space, generator):
        raise RuntimeError("exploding perturbation")


def _evaluate(tmp_path: Path, data_dir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = cli_env(PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "heatmapbench.app.evaluate", *args, f"paths.data_dir={data_dir}",
           f"paths.mlruns_dir={tmp_path}/mlruns", f"hydra.sweep.dir={tmp_path}/multirun",
           f"hydra.run.dir={tmp_path}/run", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def _runs(uri: str, experiment: str = "heatmapbench-evaluate"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_parallel_joblib_sweep_records_every_run(tmp_path, data_dir):
    proc = _evaluate(tmp_path, data_dir, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "explainer=sensitivity_l2,lrp_epsilon_0.01", "evaluation.region_size=4,7",
                     "perturbation=uniform,blur")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(runs) == 8
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert sorted(int(r.data.tags["sweep_job"]) for r in runs) == list(range(8))
    grid = {(r.data.tags["explainers"], r.data.params["evaluation.region_size"], r.data.tags["perturbation"])
            for r in runs}
    assert grid == {(e, s, p) for e in ("sensitivity_l2", "lrp_epsilon_0.01") for s in ("4", "7")
                    for p in ("uniform", "blur")}
    for run in runs:
        name = run.data.tags["explainers"]
        assert mn.explainer_metric(mn.AOPC_REL, name) in run.data.metrics
        assert mn.explainer_metric(mn.AOPC, name) in run.data.metrics
        assert run.info.run_name.startswith("evaluate ") and f"explainer={name}" in run.info.run_name  # what ran
        assert set(run.data.metrics) >= {mn.random_ordering_metric(mn.AOPC), mn.IMAGES, mn.SECONDS}
    # the comparison report over this sweep: one row per job, with each run's own numbers
    from heatmapbench.app.report import run_report
    from tests.helpers import compose_config

    sweep_id = runs[0].data.tags["sweep_id"]
    cfg = compose_config("report", [f"sweep_id={sweep_id}", f"tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"],
                         tmp_path / "report", data_dir)
    table = run_report(cfg)["report"].comparison
    assert len(table) == 8
    for run in runs:
        name = run.data.tags["explainers"]
        row = table[(table.explainer == name) & (table.region_size.astype(int) == int(run.data.params["evaluation.region_size"]))
                    & (table.perturbation == run.data.tags["perturbation"])]
        assert len(row) == 1
        assert float(row.aopc_rel.iloc[0]) == pytest.approx(run.data.metrics[mn.explainer_metric(mn.AOPC_REL, name)])


def test_sweep_with_a_failing_job_keeps_the_others(tmp_path, data_dir):
    proc = _evaluate(tmp_path, data_dir, "-m", "explainer=sensitivity_l2",
                     "perturbation._target_=heatmapbench.perturbation.Uniform,tests.integration.test_sweep.Exploding")
    assert proc.returncode != 0
    assert "exploding perturbation" in proc.stderr
    runs = _runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    status = {r.data.params["perturbation"]: r.info.status for r in runs}
    assert status == {"uniform": "FINISHED", "exploding": "FAILED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_evaluate_against_a_real_mlflow_server(tmp_path, data_dir):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {server.stderr.read()[-2000:] if server.stderr else ''}")
            time.sleep(0.5)
        proc = _evaluate(tmp_path, data_dir, "explainer=sensitivity_l2", f"logger.tracking_uri={base}",
                         "logger.artifact_location=null", "logger.experiment_name=remote")
        assert proc.returncode == 0, proc.stderr[-3000:]
        experiment = _rest(base, "experiments/get-by-name?experiment_name=remote")["experiment"]
        found = _rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(found) == 1
        run = found[0]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert mn.explainer_metric(mn.AOPC_REL, "sensitivity_l2") in metrics and metrics[mn.IMAGES] == 4
        artifacts = _rest(base, f"artifacts/list?run_id={run['info']['run_id']}&path=evaluation")
        assert "evaluation/summary.csv" in {f["path"] for f in artifacts.get("files", [])}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
