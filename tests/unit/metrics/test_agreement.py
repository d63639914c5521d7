"""Metric agreement: τ_b against scipy, the agreement table on runs whose rankings are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from heatmapbench.app.report.agreement import agreement_markdown, agreement_reports, write_agreement
from heatmapbench.metrics.agreement import Measure, kendall_tau_b, measure_agreement, rankings

EXPLAINERS = ["a", "b", "c", "d"]


def _scores(order: list[float], n: int, noise: float, seed: int) -> pd.DataFrame:
    """n units × explainers: each explainer's true score plus noise."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(np.asarray(order) + noise * rng.standard_normal((n, len(order))), columns=EXPLAINERS)


def test_kendall_tau_b_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.integers(0, 4, 6).astype(float), rng.integers(0, 4, 6).astype(float)
        want = stats.kendalltau(a, b).statistic
        got = kendall_tau_b(a, b)
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-12)
    batched = kendall_tau_b(rng.normal(size=(7, 5)), rng.normal(size=(7, 5)))
    assert batched.shape == (7,)


def test_known_rankings_agree_and_disagree():
    same = Measure("A", _scores([4, 3, 2, 1], 40, 0.3, 1))
    also = Measure("B", _scores([40, 30, 20, 10], 40, 3.0, 2).set_axis(range(100, 140)))  # other images
    reverse = Measure("C", _scores([1, 2, 3, 4], 40, 0.3, 3))
    ranks = rankings([same, also, reverse])
    assert ranks[ranks.measure == "A"].set_index("explainer")["rank"].to_dict() == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert ranks[ranks.measure == "C"].set_index("explainer")["rank"].to_dict() == {"a": 4, "b": 3, "c": 2, "d": 1}
    tau = measure_agreement([same, also, reverse], n_boot=300, seed=0).set_index(["measure_a", "measure_b"])
    assert tau.loc[("A", "B"), "tau"] == 1.0 and tau.loc[("A", "C"), "tau"] == -1.0
    assert tau.loc[("A", "B"), "tau_lo"] > 0.5 and tau.loc[("A", "C"), "tau_hi"] < -0.5
    assert tau.loc[("A", "B"), "tau_lo"] <= tau.loc[("A", "B"), "tau"] <= tau.loc[("A", "B"), "tau_hi"]
    assert not tau.loc[("A", "B"), "paired"]  # different images: resampled independently
    # indistinguishable explainers: the CI says the ranking is not determined
    flat = Measure("D", _scores([0, 0, 0, 0], 10, 1.0, 4))
    wide = measure_agreement([same, flat], n_boot=300, seed=0).iloc[0]
    assert wide.tau_hi - wide.tau_lo >= 0.5  # a wide interval, unlike the determined pairs above


def test_measures_on_the_same_units_are_resampled_together():
    scores = _scores([4, 3, 2, 1], 30, 1.0, 5)
    a, b = Measure("A", scores), Measure("B", scores * 2)  # the same images, the same ranking per resample
    row = measure_agreement([a, b], n_boot=200, seed=0).iloc[0]
    assert row.paired and row.tau == row.tau_lo == row.tau_hi == 1.0


def _per_image(run_id: str, order_scores: dict[str, list[float]], n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for order, means in order_scores.items():
        for name, mean in zip(EXPLAINERS, means):
            aopc = mean + 0.05 * rng.standard_normal(n)
            frames.append(pd.DataFrame({"image": range(n), "explainer": name, "order": order, "aopc": aopc,
                                        "aopc_random": 0.0, "aopc_rel": aopc, "run_id": run_id}))
    return pd.concat(frames, ignore_index=True)


def test_report_agreement_on_runs_with_known_rankings(tmp_path):
    n = 20
    # uniform: MoRF a > b > c > d; LeRF agrees (a lowest); road: MoRF reversed
    per_image = pd.concat([
        _per_image("r1", {"morf": [4, 3, 2, 1], "lerf": [1, 2, 3, 4]}, n, 0),
        _per_image("r2", {"morf": [1, 2, 3, 4]}, n, 1),
    ])
    long = pd.DataFrame({"run_id": ["r1", "r2"], "model": "smallcnn", "data": "fashion_mnist",
                         "perturbation": ["uniform", "road"], "region_size": 4.0})
    artifacts = tmp_path / "r1"
    (artifacts / "sanity").mkdir(parents=True)
    mprt = pd.DataFrame([{"image": i, "explainer": e, "mode": "cascading", "measure": "spearman_abs", "depth": d,
                          "layer": "x", "similarity": s + (0.5 if d == 1 else 0.0)}
                         for i in range(8) for e, s in zip(EXPLAINERS, [0.1, 0.2, 0.3, 0.4]) for d in (1, 2)])
    mprt.to_csv(artifacts / "sanity" / "mprt_per_image.csv", index=False)  # a changes most: best under MPRT
    roar = tmp_path / "r3"
    (roar / "roar").mkdir(parents=True)  # a ROAR parent run: d's removal hurts most, a's least
    pd.DataFrame([{"method": m, "explainer": e, "fraction": t, "seed": s, "accuracy": acc - 0.1 * t}
                  for m in ("roar", "kar") for e, acc in zip(EXPLAINERS, [0.8, 0.7, 0.6, 0.5])
                  for t in (0.1, 0.5) for s in (0, 1)]).to_csv(roar / "roar" / "roar_accuracy.csv", index=False)
    runs = pd.DataFrame({"run_id": ["r1", "r2", "r3"], "artifact_uri": [str(artifacts), str(tmp_path / "r2"), str(roar)],
                         "tags.task": ["evaluate", "evaluate", "roar"], "tags.roar_role": [None, None, "parent"],
                         "tags.model": ["from_checkpoint", "from_checkpoint", "SmallCNN"],
                         "params.model.net.net": ["SmallCNN"] * 2 + [None],  # as the runs log it
                         "tags.weights": ["ckpts/last.ckpt"] * 2 + [None], "params.ckpt_path": [None] * 2 + ["ckpts/last.ckpt"],
                         "tags.data": "fashion_mnist"})
    (agreement,) = agreement_reports(long, per_image, runs, n_boot=200, seed=0)
    # the checkpoint's network joins the ROAR run that explained the same checkpoint
    assert agreement.group == "SmallCNN / fashion_mnist / ckpts/last.ckpt"
    assert [m.name for m in agreement.measures] == ["MoRF uniform", "LeRF uniform", "ABPC uniform", "MoRF road",
                                                     "MPRT", "ROAR"]
    assert agreement.measures[-1].unit == "seed" and agreement.measures[-1].scores.shape == (2, 4)
    tau = agreement.tau.set_index(["measure_a", "measure_b"]).tau
    assert tau[("MoRF uniform", "LeRF uniform")] == 1.0
    assert tau[("MoRF uniform", "ABPC uniform")] == 1.0
    assert tau[("MoRF uniform", "MoRF road")] == -1.0
    assert tau[("MoRF uniform", "MPRT")] == 1.0  # the last (whole-net) step counts, not the first
    assert tau[("MoRF road", "ROAR")] == 1.0  # ROAR: lower accuracy after retraining = better (d best)
    ranks = agreement.rankings.set_index(["measure", "explainer"])["rank"]
    assert ranks[("MoRF road", "d")] == 1 and ranks[("MPRT", "a")] == 1
    (tmp_path / "report").mkdir()
    files = write_agreement([agreement], tmp_path / "report")
    assert files["agreement_png"].stat().st_size > 0
    assert "MoRF road" in agreement_markdown([agreement])
