"""``heatmapbench-report`` over a temporary MLflow store filled with runs of known metrics."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from heatmapbench.metrics import names as mn
from heatmapbench.app.schema import ConfigError
from heatmapbench.app.report import build_report, filter_string, run_report
from tests.helpers import cli_env, compose_config, run_main

EXPLAINERS = ("sensitivity_l2", "lrp_epsilon_0.01")
REGIONS = (4, 9)
PERTURBATIONS = {"uniform": "heatmapbench.perturbation.Uniform", "blur": "heatmapbench.perturbation.Blur"}
SWEEP = "multirun/2025-01-31_12-00-00"
OTHER_SWEEP = "multirun/2025-02-01_08-00-00"


def expected(explainer: str, region: int, perturbation: str) -> dict[str, float]:
    """Distinct, exactly representable metric values for every grid cell."""
    rel = 0.25 * (EXPLAINERS.index(explainer) + 1) + 0.0625 * region / 4 + (0.5 if perturbation == "blur" else 0.0)
    return {"aopc_rel": rel, "aopc_rel_lo": rel - 0.125, "aopc_rel_hi": rel + 0.25, "aopc": rel + 1.0,
            "abpc": 2 * rel, "abpc_lo": 2 * rel - 0.5, "abpc_hi": 2 * rel + 0.5}


def _store(tmp_path: Path) -> tuple[MlflowClient, str]:
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    return MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db"), str(tmp_path / "mlruns" / "artifacts")


def _experiment(client: MlflowClient, name: str, artifacts: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifacts)


def _metric(key: str, explainer: str) -> str:
    """The metric name of a report column (a measure, or a measure with ``_lo``/``_hi``)."""
    for bound in mn.BOUNDS:
        if key.endswith(f"_{bound}"):
            return mn.explainer_metric(key[: -len(bound) - 1], explainer, bound)
    return mn.explainer_metric(key, explainer)


def log_eval_run(client: MlflowClient, exp_id: str, explainer: str, region: int, perturbation: str, *,
                 sweep: str | None, values: dict[str, float] | None = None, status: str = "FINISHED",
                 model: str = "SmallCNN", seed: int = 0) -> str:
    """An evaluate run shaped like ``heatmapbench-evaluate`` logs it (one explainer per job)."""
    values = values or expected(explainer, region, perturbation)
    tags = {"task": "evaluate", "model": model.lower(), "data": "fashionmnistdatamodule",
            "perturbation": perturbation, "explainers": explainer}
    if sweep:
        tags.update(sweep_id=sweep, sweep_job="0", sweep_overrides=f"explainer={explainer}")
    run = client.create_run(exp_id, tags=tags, run_name=f"explainer={explainer},region={region},{perturbation}")
    params = {"evaluation.region_size": str(region), "evaluation.steps": "16", "evaluation.seed": str(seed),
              "seed": str(seed), "evaluation.explainers": f"['{explainer}']", "num_images": "64",
              "perturbation._target_": PERTURBATIONS[perturbation], "model.net._target_": f"heatmapbench.models.{model}",
              "data._target_": "heatmapbench.data.FashionMNISTDataModule", "paths.output_dir": f"/tmp/{run.info.run_id}"}
    if perturbation == "blur":  # a param only some perturbations have must not split the table
        params["perturbation.sigma"] = "2.0"
    ts = int(time.time() * 1000)
    metrics = [Metric(_metric(k, explainer), v, ts, 0) for k, v in values.items()]
    metrics += [Metric(mn.random_ordering_metric(mn.AOPC), 1.0, ts, 0), Metric(mn.IMAGES, 64.0, ts, 0),
                Metric(mn.ACCURACY, 0.875, ts, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    """8 finished runs of one sweep, one run of another sweep, a FAILED run of the first sweep."""
    client, artifacts = _store(tmp_path)
    exp_id = _experiment(client, "heatmapbench-evaluate", artifacts)
    ids = {}
    for explainer, region, perturbation in itertools.product(EXPLAINERS, REGIONS, PERTURBATIONS):
        ids[explainer, region, perturbation] = log_eval_run(client, exp_id, explainer, region, perturbation,
                                                            sweep=SWEEP)
    other = log_eval_run(client, exp_id, "sensitivity_l2", 4, "uniform", sweep=OTHER_SWEEP,
                         values={"aopc_rel": 10.0, "aopc_rel_lo": 9.0, "aopc_rel_hi": 11.0, "aopc": 11.0})
    failed = log_eval_run(client, exp_id, "sensitivity_l2", 9, "blur", sweep=SWEEP, status="FAILED",
                          values={"aopc_rel": -100.0, "aopc": -99.0})
    return {"client": client, "ids": ids, "other": other, "failed": failed}


def _cfg(tmp_path: Path, data_dir: Path, *overrides: str):
    return compose_config("report", list(overrides), tmp_path, data_dir)


def _summary_runs(client: MlflowClient):
    exp = client.get_experiment_by_name("heatmapbench-report")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _check_grid(table: pd.DataFrame, ids: dict) -> None:
    assert len(table) == 8
    assert set(zip(table.explainer, table.region_size, table.perturbation)) == set(ids)
    for _, row in table.iterrows():
        want = expected(row.explainer, int(row.region_size), row.perturbation)
        for key, value in want.items():
            assert row[key] == pytest.approx(value), (row.explainer, row.region_size, row.perturbation, key)
        assert row.runs == 1 and row.run_ids == ids[row.explainer, int(row.region_size), row.perturbation]
        assert row.random_ordering_aopc == 1.0


def test_sweep_report_in_process(store, tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, f"sweep_id={SWEEP}")
    result = run_report(cfg)
    report = result["report"]
    assert report.split_by == []  # perturbation.sigma and the seeds do not split cells
    _check_grid(report.comparison, store["ids"])
    # within a perturbation × region block the best explainer comes first
    for _, block in report.comparison.groupby(["perturbation", "region_size"]):
        assert list(block.aopc_rel) == sorted(block.aopc_rel, reverse=True)
    assert len(report.runs) == 8 and store["failed"] not in set(report.runs.run_id)

    out = Path(cfg.output_dir)
    csv = pd.read_csv(out / "comparison.csv")
    _check_grid(csv, store["ids"])
    assert len(pd.read_csv(out / "runs_long.csv")) == 8
    md = (out / "comparison.md").read_text()
    assert md.count("\n| sensitivity_l2 |") + md.count("\n| lrp_epsilon_0.01 |") == 8
    want = expected("lrp_epsilon_0.01", 9, "blur")
    assert f"{want['aopc_rel']:.4g} [{want['aopc_rel_lo']:.4g}, {want['aopc_rel_hi']:.4g}]" in md
    with Image.open(out / "aopc_vs_region_size.png") as img:
        assert img.format == "PNG" and img.width > 400
    assert not (out / "aopc_vs_accuracy.png").exists()  # no training runs selected

    client = store["client"]
    (summary,) = _summary_runs(client)
    assert summary.info.run_id == result["run_id"] and summary.info.status == "FINISHED"
    assert summary.data.tags["task"] == "report" and summary.data.tags["sweep_id"] == SWEEP
    assert summary.data.tags["report_filter"] == filter_string(SWEEP)
    assert summary.data.metrics["rows"] == 8 and summary.data.metrics["runs"] == 8
    logged = {Path(f.path).name for f in client.list_artifacts(summary.info.run_id, "report")}
    assert {"comparison.md", "comparison.csv", "runs_long.csv", "aopc_vs_region_size.png"} <= logged
    local = client.download_artifacts(summary.info.run_id, "report/comparison.csv", str(tmp_path / "dl"))
    _check_grid(pd.read_csv(local), store["ids"])

    # a second report over the whole experiment ignores the summary run, averages the other sweep's run in
    everything = run_report(_cfg(tmp_path, data_dir, "log_summary=false", "experiments=[]"))["report"].comparison
    assert len(everything) == 8
    cell = everything[(everything.explainer == "sensitivity_l2") & (everything.region_size == 4)
                      & (everything.perturbation == "uniform")].iloc[0]
    first = expected("sensitivity_l2", 4, "uniform")["aopc_rel"]
    assert cell.runs == 2 and cell.aopc_rel == pytest.approx((first + 10.0) / 2)
    assert np.isnan(cell.aopc_rel_lo) and cell.aopc_rel_std == pytest.approx(np.std([first, 10.0], ddof=1))
    assert len(_summary_runs(client)) == 1


def test_filters_by_tags_raw_filter_and_status(store, tmp_path, data_dir):
    blur = run_report(_cfg(tmp_path, data_dir, "log_summary=false", f"sweep_id={SWEEP}", "+tags.perturbation=blur"))
    assert set(blur["report"].comparison.perturbation) == {"blur"} and len(blur["report"].comparison) == 4
    raw = run_report(_cfg(tmp_path, data_dir, "log_summary=false",
                          "filter=\"params.`evaluation.region_size` = '9' and metrics.`aopc_rel/sensitivity_l2` > 0\""))
    table = raw["report"].comparison
    assert len(table) == 2 and set(table.region_size) == {9} and set(table.explainer) == {"sensitivity_l2"}
    with_failed = run_report(_cfg(tmp_path, data_dir, "log_summary=false", f"sweep_id={SWEEP}", "include_failed=true"))
    cell = with_failed["report"].comparison.query("explainer == 'sensitivity_l2' and region_size == 9 "
                                                  "and perturbation == 'blur'").iloc[0]
    assert cell.runs == 2 and store["failed"] in cell.run_ids
    assert _summary_runs(store["client"]) == []


def test_other_varying_params_split_cells_and_seeds_average():
    """``build_report`` alone: a second model becomes a column; runs differing only in seed (and in
    ``evaluation.fuse``, a speed switch older runs did not log) are averaged."""
    rows = []
    for i, (model, seed) in enumerate(itertools.product(["SmallCNN", "VGGSmall"], [0, 1])):
        rows.append({"run_id": f"r{i}", "experiment": "e", "status": "FINISHED", "tags.task": "evaluate",
                     "tags.model": model.lower(), "tags.perturbation": "uniform",
                     "params.model.net._target_": f"heatmapbench.models.{model}", "params.seed": str(seed),
                     "params.evaluation.seed": str(seed), "params.evaluation.region_size": "9",
                     # a speed switch logged only by newer runs: it must not split their cells
                     **({"params.evaluation.fuse": "True"} if seed else {}),
                     f"metrics.{mn.explainer_metric(mn.AOPC_REL, 'gradient')}": float(i),
                     f"metrics.{mn.explainer_metric(mn.AOPC, 'gradient')}": float(i) + 1,
                     f"metrics.{mn.random_ordering_metric(mn.AOPC)}": 1.0})
    report = build_report(pd.DataFrame(rows))
    assert report.split_by == ["model"]
    table = report.comparison.set_index("model")
    assert list(table.runs) == [2, 2]
    assert table.loc["smallcnn", "aopc_rel"] == 0.5 and table.loc["vggsmall", "aopc_rel"] == 2.5
    assert table.loc["smallcnn", "run_ids"] == "r0;r1"
    assert report.markdown().startswith("| explainer | region | perturbation | model | AOPC rel. random")


def log_train_run(client: MlflowClient, exp_id: str, history: dict[str, list[float]], final: dict[str, float]) -> str:
    run = client.create_run(exp_id, run_name="train")
    ts = int(time.time() * 1000)
    metrics = []
    for key, values in history.items():
        # the last epoch is logged before the one before it: "final" means the last step, not the last write
        order = list(range(len(values) - 2)) + [len(values) - 1, len(values) - 2]
        metrics += [Metric(key, values[step], ts + j, step) for j, step in enumerate(order)]
    metrics += [Metric(k, v, ts, 0) for k, v in final.items()]
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param("model.net._target_", "heatmapbench.models.SmallCNN"),
                             Param("trainer._target_", "pytorch_lightning.Trainer")])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_training_runs_give_one_point_per_run_and_explainer(store, tmp_path, data_dir):
    client, artifacts = _store(tmp_path)
    exp_id = _experiment(client, "heatmapbench-train", artifacts)
    truth = {}
    for r in range(3):
        history = {mn.ACCURACY: [0.5, 0.6, 0.7 + r / 10], mn.SECONDS: [3.0, 3.0, 3.0]}
        for e, name in enumerate(EXPLAINERS):
            history[mn.explainer_metric(mn.AOPC, name)] = [0.1, 0.2, 1.0 + r + e / 2]
            history[mn.explainer_metric(mn.AOPC_REL, name)] = [0.0, 0.1, 0.5 + r + e / 2]
        final = {mn.VAL_ACC: 0.7 + r / 10} | ({mn.TEST_ACC: 0.65 + r / 10} if r < 2 else {})
        run_id = log_train_run(client, exp_id, history, final)
        for e, name in enumerate(EXPLAINERS):
            truth[run_id, name] = (final.get("test/acc", final["val/acc"]), 1.0 + r + e / 2, 0.5 + r + e / 2)

    with pytest.raises(ConfigError):  # train runs carry no sweep id here: the filter applies to every experiment
        run_report(_cfg(tmp_path, data_dir, "experiments=[heatmapbench-train]", f"sweep_id={SWEEP}"))
    cfg = _cfg(tmp_path, data_dir, "experiments=[heatmapbench-evaluate,heatmapbench-train]")
    result = run_report(cfg)
    training = result["report"].training
    assert len(training) == 6 and set(zip(training.run_id, training.explainer)) == set(truth)
    assert "accuracy" not in set(training.explainer) and "seconds" not in set(training.explainer)
    for _, row in training.iterrows():
        acc, aopc, rel = truth[row.run_id, row.explainer]
        assert (row.accuracy, row.aopc, row.aopc_rel) == pytest.approx((acc, aopc, rel))
        assert row.accuracy_metric == ("test/acc" if acc < 0.85 else "val/acc")
    corr = result["report"].training_correlation.set_index("explainer")
    assert list(corr.runs) == [3, 3] and corr.loc["sensitivity_l2", "spearman"] == pytest.approx(1.0)
    assert len(result["report"].comparison) == 8  # the evaluate runs of both sweeps, averaged where they meet

    out = Path(cfg.output_dir)
    assert len(pd.read_csv(out / "aopc_vs_accuracy.csv")) == 6
    with Image.open(out / "aopc_vs_accuracy.png") as img:
        assert img.format == "PNG"
    (summary,) = _summary_runs(client)
    logged = {Path(f.path).name for f in client.list_artifacts(summary.info.run_id, "report")}
    assert {"aopc_vs_accuracy.csv", "aopc_vs_accuracy.png", "comparison.md"} <= logged


@pytest.mark.parametrize("overrides, message", [
    (["sweep_id=multirun/nope"], "no runs match"),
    (["experiments=[heatmapbench-evaluate,nope]"], "no experiment ['nope']"),
    (['filter="metrics.images >>> 1"'], "is invalid"),
])
def test_bad_selection_raises_and_logs_nothing(store, tmp_path, data_dir, overrides, message):
    with pytest.raises(ConfigError) as err:
        run_report(_cfg(tmp_path, data_dir, *overrides))
    assert message in str(err.value)
    assert _summary_runs(store["client"]) == []
    assert not Path(tmp_path / "out" / "comparison.md").exists()


def test_only_failed_runs_say_so(tmp_path, data_dir):
    client, artifacts = _store(tmp_path)
    exp_id = _experiment(client, "heatmapbench-evaluate", artifacts)
    log_eval_run(client, exp_id, "sensitivity_l2", 4, "uniform", sweep=SWEEP, status="FAILED")
    with pytest.raises(ConfigError, match="1 FAILED.*include_failed=true"):
        run_report(_cfg(tmp_path, data_dir, f"sweep_id={SWEEP}"))


def test_missing_store_is_not_created(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="no MLflow store"):
        run_report(_cfg(tmp_path, data_dir))
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = cli_env()
    args = [sys.executable, "-m", "heatmapbench.app.report", f"paths.mlruns_dir={tmp_path}/mlruns",
            f"hydra.run.dir={tmp_path}/cli_out", *overrides]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.slow  # a CLI subprocess
def test_cli(store, tmp_path, data_dir):
    proc = _cli(tmp_path, f"sweep_id={SWEEP}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| explainer | region | perturbation |" in proc.stdout and f"files in {tmp_path}/cli_out" in proc.stdout
    _check_grid(pd.read_csv(tmp_path / "cli_out" / "comparison.csv"), store["ids"])
    (summary,) = _summary_runs(store["client"])
    assert summary.info.run_id in proc.stdout and summary.data.tags["sweep_id"] == SWEEP
    assert summary.data.params["sweep_id"] == SWEEP  # the resolved config is logged too

    # a user error: one line and exit status 2 (the command's main, as the CLI runs it; no new interpreter)
    code, err = run_main("report", _cfg(tmp_path, data_dir, "sweep_id=multirun/nope"))
    assert code == 2 and "error: no runs match" in err and "Traceback" not in err, err[-2000:]
    assert len(_summary_runs(store["client"])) == 1


def test_reliability_across_runs_from_per_image_tables(store, tmp_path, data_dir):
    """The sweep's jobs (one explainer each) with per-image tables: the ranking flips in one setting."""
    from heatmapbench.evaluation.reliability import cronbach_alpha, kendall_w, write_table

    client = store["client"]
    base = np.linspace(-1.0, 1.0, 10)
    flipped = ("blur", 9)
    truth = {}  # (perturbation, region) → (I, E) scores in EXPLAINERS order
    for (explainer, region, perturbation), run_id in store["ids"].items():
        e = EXPLAINERS.index(explainer)
        if (perturbation, region) == flipped:
            scores = base * (1 - 0.5 * e) + (1.0 - 2.0 * e)  # the second explainer falls behind here
        else:
            scores = base * (1 + 0.25 * e) + 0.1 * region + e
        truth.setdefault((perturbation, region), np.zeros((10, 2)))[:, e] = scores
        folder = tmp_path / "tables" / run_id
        folder.mkdir(parents=True)
        table = pd.DataFrame({"image": np.arange(10), "explainer": explainer, "order": "morf", "aopc": scores + 1.0,
                              "aopc_random": 1.0, "aopc_rel": scores, "target": 0})
        client.log_artifact(run_id, str(write_table(table, folder)), "evaluation")

    cfg = _cfg(tmp_path, data_dir, f"sweep_id={SWEEP}", "n_boot=100")
    result = run_report(cfg)
    rel = result["report"].reliability
    settings = sorted(truth)  # blur before uniform, 4 before 9
    assert list(rel.settings.setting) == [f"{p} {r}px morf" for p, r in settings]
    ranks = np.array([stats_rank(truth[s].mean(axis=0)) for s in settings])
    assert rel.settings[[f"rank/{n}" for n in EXPLAINERS]].to_numpy() == pytest.approx(ranks)
    assert rel.agreement["kendall_w"] == pytest.approx(kendall_w(ranks)) and rel.agreement["kendall_w"] < 1
    assert rel.agreement["tau_min"] == pytest.approx(-1.0)
    for e, name in enumerate(EXPLAINERS):
        items = np.stack([truth[s][:, e] for s in settings], axis=1)
        assert rel.consistency.set_index("explainer").loc[name, "cronbach_alpha"] == pytest.approx(
            cronbach_alpha(items))

    out = Path(cfg.output_dir)
    assert len(pd.read_csv(out / "reliability_settings.csv")) == 4
    with Image.open(out / "rank_per_setting.png") as img:
        assert img.format == "PNG"
    (summary,) = _summary_runs(client)
    assert summary.data.metrics[mn.reliability_metric("kendall_w")] == pytest.approx(rel.agreement["kendall_w"])
    assert mn.explainer_reliability_metric("cronbach_alpha", EXPLAINERS[0]) in summary.data.metrics
    logged = {Path(f.path).name for f in client.list_artifacts(summary.info.run_id, "report")}
    assert {"reliability.md", "reliability_settings.csv", "reliability_consistency.csv", "reliability_tau.csv",
            "rank_per_setting.png"} <= logged


def stats_rank(means: np.ndarray) -> np.ndarray:
    """Rank 1 = highest mean."""
    from scipy.stats import rankdata

    return rankdata(-means)
