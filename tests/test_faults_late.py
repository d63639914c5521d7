"""Faults late in a run, where they cost most: a store that dies while finished results are logged,
inputs that pass a header check but not a decode, a full disk, runs left RUNNING by a killed process.
Each case is tried for real where this machine allows (real stores, files, subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_faults import EVAL, eval_cfg, images, runs  # noqa: F401  (fixtures)


# -- results first, then logging ---------------------------------------------------------------
def test_results_are_kept_when_logging_them_fails(eval_cfg, monkeypatch):
    from pytorch_lightning.loggers import MLFlowLogger

    from heatmapbench.evaluate import run_evaluate
    from heatmapbench.tracking import LoggingFailedError

    def server_gone(self, *args, **kwargs):
        raise ConnectionError("API request to http://store:5000/api/2.0/mlflow/runs/log-batch failed: "
                              "Max retries exceeded (Connection refused)")

    monkeypatch.setattr(MLFlowLogger, "log_metrics", server_gone)
    cfg = eval_cfg()
    folder = Path(cfg.paths.output_dir) / "evaluation"
    with pytest.raises(LoggingFailedError, match=f"logging to MLflow failed .*Connection refused.*; the results are "
                                                 f"saved in {folder}$") as err:
        run_evaluate(cfg)
    assert "\n" not in str(err.value)
    for name in ("summary.csv", "summary.md", "aopc_curves.csv", "reliability.md", "metrics.json"):
        assert (folder / name).stat().st_size > 0, name
    assert list(folder.glob("per_image.*")), sorted(p.name for p in folder.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["eval/images"] == 12.0
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FAILED" and "Connection refused" in run.data.tags["end_reason"]


def test_http_retries_are_bounded_to_about_a_minute(monkeypatch):
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)

    from heatmapbench.tracking import HTTP_RETRIES, bound_http_retries, worst_case_http_seconds

    for key in HTTP_RETRIES:
        monkeypatch.delenv(key, raising=False)
    assert worst_case_http_seconds() > 600  # MLflow's defaults: minutes per call against a dead server
    bound_http_retries()
    # MLflow reads these per request: its own accessors see the bounded values
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
            MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (3, 1, 10)
    assert worst_case_http_seconds() <= 60
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # what a user exported wins
    bound_http_retries()
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 30
