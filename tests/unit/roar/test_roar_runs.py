"""heatmapbench-roar's bookkeeping: one parent run, a child per retraining, resumed without redoing work.

The retraining itself is replaced by a stand-in that records its calls (the real loop is tested in
test_roar.py), so this runs in seconds with the real configs and a temporary MLflow store.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from heatmapbench.app import roar as roar_app
from heatmapbench.app.schema import ConfigError
from heatmapbench.metrics import names as mn
from tests.helpers import compose_config, store_uri

CALLS: list[str] = []


class FakeRetrainer:
    def __init__(self, cfg, settings, folder):
        pass

    def run(self, job):
        CALLS.append(job.key)
        if job.method == "roar" and job.explainer == "boom":
            raise RuntimeError("boom")
        # ROAR accuracy falls with t for the explainer, not for the random ranking
        drop = job.fraction if job.explainer == "sensitivity_l2" and job.method == "roar" else 0.0
        return {mn.TEST_ACC: 0.9 - drop + 0.01 * job.seed}


@pytest.fixture
def roar_cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(roar_app, "Retrainer", FakeRetrainer)
    CALLS.clear()

    def make(*overrides):
        return compose_config("roar", ["experiment=roar_fashion_mnist", "roar.explainers=[sensitivity_l2]",
                                       "roar.fractions=[0.1,0.5]", "roar.seeds=[0,1]",
                                       f"roar.cache_dir={tmp_path / 'cache'}", *overrides], tmp_path, data_dir)

    return make


def test_parent_children_and_resume(roar_cfg):
    cfg = roar_cfg()
    first = roar_app.run_roar(cfg)
    assert len(CALLS) == 2 + 2 * 2 * 2 * 2  # unmodified per seed + methods × {explainer, random} × t × seeds
    client = MlflowClient(store_uri(cfg))
    parent = client.get_run(first["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["roar_role"] == "parent"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(CALLS) and all(c.info.status == "FINISHED" for c in children)
    m = parent.data.metrics
    assert m[mn.roar_metric("roar", "sensitivity_l2")] == pytest.approx(0.9 - 0.3 + 0.005)
    assert m[mn.roar_metric("roar", "random")] == pytest.approx(0.905)
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "roar")}
    assert artifacts == {"roar/roar_accuracy.csv", "roar/roar_accuracy.png"}
    # the same recipe again, one more seed: only the new seed's retrainings run, into the same parent
    CALLS.clear()
    second = roar_app.run_roar(roar_cfg("roar.seeds=[0,1,2]"))
    assert second["run_id"] == first["run_id"] and second["roar_id"] == first["roar_id"]
    assert CALLS and all(key.endswith("seed2") for key in CALLS) and len(CALLS) == 1 + 8
    assert len(second["table"]) == 27


def test_a_failed_retraining_marks_its_child_and_the_parent_failed(roar_cfg, monkeypatch):
    monkeypatch.setattr(roar_app.RoarSettings, "all_explainers", property(lambda self: ["boom"]))
    cfg = roar_cfg("roar.methods=[roar]")
    with pytest.raises(RuntimeError, match="boom"):
        roar_app.run_roar(cfg)
    client = MlflowClient(store_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    statuses = {r.data.tags.get("roar_job", "parent"): r.info.status for r in runs}
    assert statuses["parent"] == "FAILED" and statuses["roar/boom/t0.10/seed0"] == "FAILED"
    assert "RUNNING" not in statuses.values()


def test_bad_roar_config_fails_before_any_run(roar_cfg, tmp_path):
    with pytest.raises(ConfigError, match="roar.fractions"):
        roar_app.run_roar(roar_cfg("roar.fractions=[0,0.5]"))
    with pytest.raises(ConfigError, match="roar.explainers"):
        roar_app.run_roar(roar_cfg("roar.explainers=[nope]"))
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
