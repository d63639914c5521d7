"""heatmapbench-roar's bookkeeping: one parent run, a child per retraining, resumed without redoing work.

The retraining itself is replaced by a stand-in that records its calls (the real loop is tested in
test_roar.py), so this runs in seconds with the real configs and a temporary MLflow store.
"""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from heatmapbench.app import roar as roar_app
from heatmapbench.app.schema import ConfigError
from heatmapbench.metrics import names as mn
from tests.helpers import compose_config, store_uri

CALLS: list[str] = []
#: Run inside the first retraining of the next job: another job of the same sweep, working at the same time.
DURING: list = []


class FakeRetrainer:
    def __init__(self, cfg, settings, folder):
        pass

    def run(self, job):
        CALLS.append(job.key)
        if DURING:
            DURING.pop()()
        if job.method == "roar" and job.explainer == "boom" or job.seed == 7:
            raise RuntimeError("boom")
        # ROAR accuracy falls with t for the explainer, not for the random ranking
        drop = job.fraction if job.explainer == "sensitivity_l2" and job.method == "roar" else 0.0
        return {mn.TEST_ACC: 0.9 - drop + 0.01 * job.seed}


@pytest.fixture
def roar_cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(roar_app, "Retrainer", FakeRetrainer)
    CALLS.clear()
    DURING.clear()

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


# -- jobs of a sweep that run at once share the parent; the last one closes it -----------------------
def _parent(cfg, run_id):
    run = MlflowClient(store_uri(cfg)).get_run(run_id)
    workers = {k: v for k, v in run.data.tags.items() if k.startswith(roar_app.WORKER_TAG)}
    return run, workers


def _concurrent(roar_cfg, other_seed):
    """The job of seed 0 with the job of ``other_seed`` run during its first retraining; the parent's status
    and workers as the other job ended, and the outer job's result."""
    cfg, other = roar_cfg("roar.seeds=[0]", "roar.methods=[roar]"), roar_cfg(f"roar.seeds=[{other_seed}]",
                                                                              "roar.methods=[roar]")
    seen = {}

    def other_job():
        try:
            seen["result"] = roar_app.run_roar(other)
        except RuntimeError as err:
            seen["error"] = err
        parent = MlflowClient(store_uri(cfg)).search_runs(
            [MlflowClient(store_uri(cfg)).get_experiment_by_name(cfg.logger.experiment_name).experiment_id],
            "tags.roar_role = 'parent'")
        assert len(parent) == 1  # one parent, found by the job that started second
        seen["during"] = _parent(cfg, parent[0].info.run_id)

    DURING.append(other_job)
    return cfg, seen, roar_app.run_roar(cfg)


def test_a_job_that_ends_first_leaves_the_parent_to_the_last(roar_cfg):
    cfg, seen, first = _concurrent(roar_cfg, other_seed=1)
    assert seen["result"]["run_id"] == first["run_id"]
    run, workers = seen["during"]
    assert run.info.status == "RUNNING"  # the other job ended while this one worked: not closed by it
    assert sorted(v.split(":")[0] if not v.isdigit() else "running" for v in workers.values()) == ["FINISHED",
                                                                                                    "running"]
    run, workers = _parent(cfg, first["run_id"])
    assert run.info.status == "FINISHED" and "end_reason" not in run.data.tags
    assert [v.split(":")[0] for v in workers.values()] == ["FINISHED", "FINISHED"]
    assert sorted(first["table"].seed.unique()) == [0, 1]  # the last job's table holds both jobs' retrainings


def test_a_failed_job_makes_the_parent_failed_when_the_last_job_ends(roar_cfg):
    cfg, seen, first = _concurrent(roar_cfg, other_seed=7)
    assert "boom" in str(seen["error"])
    run, _ = seen["during"]
    assert run.info.status == "RUNNING"  # a failure of one job does not end the others' parent either
    run, workers = _parent(cfg, first["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["end_reason"].startswith("1 of 2 jobs of this ROAR did not finish; ")
    assert "FAILED: RuntimeError: boom" in run.data.tags["end_reason"]


def test_a_job_killed_outright_keeps_the_parent_from_finished(roar_cfg):
    cfg = roar_cfg("roar.seeds=[0]", "roar.methods=[roar]")
    client = MlflowClient(store_uri(cfg))

    def killed_job():  # registered as a worker, then no heartbeat for longer than heatmapbench-runs waits
        (parent,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id],
                                       "tags.roar_role = 'parent'")
        client.set_tag(parent.info.run_id, roar_app.WORKER_TAG + "node7.123.abcdef", str(int(time.time()) - 3600))

    DURING.append(killed_job)
    result = roar_app.run_roar(cfg)
    run, _ = _parent(cfg, result["run_id"])
    assert run.info.status == "KILLED"
    assert "node7.123.abcdef: stopped without closing" in run.data.tags["end_reason"]
    # a rerun starts a new round: the dead job's tag is dropped, and the parent ends FINISHED
    assert roar_app.run_roar(roar_cfg("roar.seeds=[0]", "roar.methods=[roar]"))["run_id"] == result["run_id"]
    run, workers = _parent(cfg, result["run_id"])
    assert run.info.status == "FINISHED" and len(workers) == 1 and "end_reason" not in run.data.tags


def test_parent_outcome_table():
    w = roar_app.WORKER_TAG
    now = 10_000.0
    tags = {w + "a": "FINISHED: ok", w + "b": str(int(now) - 30), w + "c": str(int(now) - 7200), "heartbeat": "1"}
    states = roar_app.worker_states(tags, now, stale_after_s=600)
    assert states == {w + "a": "FINISHED", w + "b": "running", w + "c": "stale"}
    assert roar_app.parent_outcome(tags, states) is None  # b still works
    del tags[w + "b"], states[w + "b"]
    assert roar_app.parent_outcome(tags, states)[0] == "KILLED"
    del tags[w + "c"], states[w + "c"]
    assert roar_app.parent_outcome(tags, states) == ("FINISHED", None)
    tags[w + "d"], states[w + "d"] = "KILLED: RunInterrupted: SIGTERM", "KILLED"
    tags[w + "e"], states[w + "e"] = "FAILED: OSError: x", "FAILED"
    status, reason = roar_app.parent_outcome(tags, states)
    assert status == "FAILED" and reason == ("2 of 3 jobs of this ROAR did not finish; d: KILLED: RunInterrupted: "
                                             "SIGTERM; e: FAILED: OSError: x")
