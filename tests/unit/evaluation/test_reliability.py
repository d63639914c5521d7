"""Reliability statistics against hand computations, textbook examples and independent references."""

from __future__ import annotations

import sys

import krippendorff
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation import Evaluation
from heatmapbench.evaluation.reliability import (
    beats_random,
    cronbach_alpha,
    kendall_w,
    krippendorff_alpha,
    krippendorff_alpha_ci,
    order_agreement,
    per_image_table,
    ranking_stability,
    read_table,
    run_reliability,
    run_reliability_markdown,
    run_reliability_metrics,
    score_matrix,
    write_table,
)

# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", example C: 4 observers × 12 units
# with missing values; published α: nominal 0.743, interval 0.849.
KRIPPENDORFF_2011 = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
])
# Shrout & Fleiss (1979), Table 2: 6 targets × 4 judges; ICC(3,4) = .91 (= Cronbach's α, Table 4).
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
                         dtype=float)


def reference_alpha(data: np.ndarray, delta) -> float:
    """Krippendorff's α from the coincidence matrix (Krippendorff 2011, sec. C), loops in float64."""
    values = np.unique(data[np.isfinite(data)])
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in data.T:
        pairable = unit[np.isfinite(unit)]
        m = len(pairable)
        if m < 2:
            continue
        for i in range(m):
            for j in range(m):
                if i != j:
                    o[index[pairable[i]], index[pairable[j]]] += 1 / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    d = np.array([[delta(values, n_c, c, k) for k in range(len(values))] for c in range(len(values))])
    return 1 - (n - 1) * (o * d).sum() / (np.outer(n_c, n_c) * d).sum()


def nominal(values, n_c, c, k):
    return float(c != k)


def interval(values, n_c, c, k):
    return float(values[c] - values[k]) ** 2


def ordinal(values, n_c, c, k):
    lo, hi = min(c, k), max(c, k)
    return float(n_c[lo:hi + 1].sum() - (n_c[c] + n_c[k]) / 2) ** 2


def test_reference_alpha_reproduces_the_textbook_and_the_package():
    assert reference_alpha(KRIPPENDORFF_2011, nominal) == pytest.approx(0.743, abs=5e-4)
    assert reference_alpha(KRIPPENDORFF_2011, interval) == pytest.approx(0.849, abs=5e-4)
    assert reference_alpha(KRIPPENDORFF_2011, ordinal) == pytest.approx(
        krippendorff.alpha(reliability_data=KRIPPENDORFF_2011, level_of_measurement="ordinal"), abs=1e-12)


def test_krippendorff_alpha_of_ranks_by_hand():
    # images rank 3 explainers as (1, 2, 3) and (1, 3, 2); coincidences o11 = o23 = o32 = 2, n_v = 2 each,
    # ordinal δ²(2,3) = 2², δ²(1,2) = 2², δ²(1,3) = 4²: α = 1 − 5·16 / (2·(16 + 64 + 16)) = 7/12
    assert krippendorff_alpha(np.array([[3.0, 2.0, 1.0], [0.3, 0.1, 0.2]])) == pytest.approx(7 / 12, abs=1e-12)
    # higher scores rank first; the scale of a score does not matter, only its order on each image
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 5)) + np.linspace(0, 2, 5)
    ranks = stats.rankdata(-scores, axis=1)
    assert krippendorff_alpha(scores) == pytest.approx(reference_alpha(ranks, ordinal), abs=1e-12)
    assert krippendorff_alpha(np.exp(scores)) == pytest.approx(krippendorff_alpha(scores), abs=1e-12)


def test_krippendorff_alpha_extremes():
    rng = np.random.default_rng(0)
    same = np.tile(rng.normal(size=(1, 6)), (40, 1)) + 0.0
    assert krippendorff_alpha(same) == 1.0
    random = rng.random((3000, 5))
    assert abs(krippendorff_alpha(random)) < 0.02
    # two images that rank in opposite orders agree less than chance: α < 0
    opposed = np.vstack([np.arange(5.0), -np.arange(5.0)])
    assert krippendorff_alpha(opposed) == pytest.approx(reference_alpha(stats.rankdata(-opposed, axis=1), ordinal))
    assert krippendorff_alpha(opposed) < -0.3
    assert np.isnan(krippendorff_alpha(np.ones((4, 3))))  # all tied: nothing to agree on
    with pytest.raises(ValueError, match="at least 2 images × 2 explainers"):
        krippendorff_alpha(np.ones((1, 3)))


def test_krippendorff_alpha_bootstrap_ci():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(60, 4)) + np.array([0.0, 0.5, 1.0, 1.5])
    alpha, lo, hi = krippendorff_alpha_ci(scores, n_boot=400, seed=3)
    assert alpha == krippendorff_alpha(scores) and lo < alpha < hi
    # the resampled count matrices are the counts of the resampled images: one resample checked by hand
    from heatmapbench.evaluation.reliability import bootstrap_weights
    w = bootstrap_weights(60, 5, seed=3)
    assert (w.sum(axis=1) == 60).all()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 60, (5, 60), generator=g).numpy()
    assert (w[0] == np.bincount(idx[0], minlength=60)).all()
    assert krippendorff_alpha_ci(scores, n_boot=400, seed=3) == (alpha, lo, hi)  # seeded


def test_cronbach_alpha_textbook_and_anova_identity():
    assert cronbach_alpha(SHROUT_FLEISS) == pytest.approx(0.909, abs=5e-4)
    # Hoyt (1941): α = (MS_subjects − MS_residual) / MS_subjects of the two-way ANOVA without interaction
    rng = np.random.default_rng(4)
    x = rng.normal(size=(25, 1)) + 0.7 * rng.normal(size=(25, 4))
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_res = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    ms_rows, ms_res = ss_rows / (n - 1), ss_res / ((n - 1) * (k - 1))
    assert cronbach_alpha(x) == pytest.approx((ms_rows - ms_res) / ms_rows, abs=1e-12)
    assert cronbach_alpha(np.tile(rng.normal(size=(10, 1)), (1, 3))) == pytest.approx(1.0)
    assert abs(cronbach_alpha(rng.normal(size=(4000, 3)))) < 0.1  # independent items


def test_kendall_w_extremes_and_friedman():
    assert kendall_w(np.tile([1.0, 2, 3, 4], (5, 1))) == pytest.approx(1.0)
    assert kendall_w(np.array([[1.0, 2, 3, 4], [4, 3, 2, 1]])) == pytest.approx(0.0)
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(6, 5)).round(0)  # ties within raters
    ranks = stats.rankdata(scores, axis=1)
    chi2 = stats.friedmanchisquare(*ranks.T).statistic  # blocks = raters, treatments = objects
    m, n = ranks.shape
    assert kendall_w(ranks) == pytest.approx(chi2 / (m * (n - 1)), abs=1e-12)


def _evaluation(morf: np.ndarray, random: np.ndarray, lerf: np.ndarray | None = None,
                names: tuple[str, ...] = ("a", "b", "c")) -> Evaluation:
    """An evaluation whose per-image AOPCs are given: constant curves over L + 1 = 3 steps."""
    def curve(values):
        return torch.as_tensor(values, dtype=torch.float32)[:, None].repeat(1, 3)

    curves = {n: {"morf": curve(morf[:, i])} for i, n in enumerate(names)}
    if lerf is not None:
        for i, n in enumerate(names):
            curves[n]["lerf"] = curve(lerf[:, i])
    n_img = len(random)
    return Evaluation(steps=2, curves=curves, random_curves=curve(random),
                      target=torch.arange(n_img) % 3, label=torch.zeros(n_img, dtype=torch.long))


def test_per_image_table_and_files(tmp_path, monkeypatch):
    morf = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    lerf = np.array([[0.5, 1.5, 2.5], [2.0, 1.0, 0.25]])
    random = np.array([1.5, 2.5])
    table = per_image_table(_evaluation(morf, random, lerf))
    assert list(table.columns) == ["image", "explainer", "order", "aopc", "aopc_random", "aopc_rel", "target", "label"]
    assert len(table) == 2 * 3 * 2
    row = table[(table.image == 1) & (table.explainer == "c") & (table.order == "lerf")].iloc[0]
    assert (row.aopc, row.aopc_random, row.aopc_rel, row.target) == (0.25, 2.5, -2.25, 1)
    # oriented scores: LeRF and ABPC turn "lower AOPC is better" into "higher is better"
    assert score_matrix(table, "lerf").loc[1, "c"] == 2.25
    assert score_matrix(table, "abpc").loc[0, "a"] == 3.0 - 0.5
    with pytest.raises(ValueError, match="order='x' is invalid"):
        score_matrix(table, "x")
    with pytest.raises(ValueError, match=r"no 'lerf' rows: order='abpc' needs the lerf curves \(score with lerf among"):
        score_matrix(table[table.order == "morf"], "abpc")

    path = write_table(table, tmp_path)
    assert path.name == "per_image.parquet"
    pd.testing.assert_frame_equal(read_table(path), table)
    with monkeypatch.context() as patch:  # without pyarrow: CSV
        patch.setitem(sys.modules, "pyarrow", None)
        path = write_table(table, tmp_path)
    assert path.name == "per_image.csv"
    pd.testing.assert_frame_equal(read_table(path), table, check_dtype=False)


def test_beats_random_counts_and_exact_ci():
    table = pd.DataFrame({"image": np.arange(10).repeat(2), "explainer": ["a", "b"] * 10, "order": "morf",
                          "aopc_rel": [1.0, -1.0] * 9 + [0.0, -1.0]})
    wins = beats_random(table).set_index("explainer")
    assert wins.loc["a", "beats_random"] == 0.9 and wins.loc["b", "beats_random"] == 0.0  # a tie is no win
    # Clopper–Pearson with 0 successes in 10: upper = 1 − 0.025^(1/10)
    assert wins.loc["b", "beats_random_hi"] == pytest.approx(1 - 0.025 ** 0.1, abs=1e-9)
    assert wins.loc["b", "beats_random_lo"] == 0.0
    lerf = table.assign(order="lerf")
    assert beats_random(lerf).set_index("explainer").loc["b", "beats_random"] == 1.0  # below random is better


def test_ranking_stability_and_order_agreement():
    rng = np.random.default_rng(6)
    scores = pd.DataFrame(rng.normal(size=(40, 3)) * 0.1 + np.array([5.0, 0.0, 0.0]), columns=["a", "b", "c"])
    stability = ranking_stability(scores, n_boot=300, seed=0).set_index("explainer")
    assert stability.loc["a", "p_best"] == 1.0 and stability.loc["a", "rank"] == 1
    assert stability.p_best.sum() == pytest.approx(1.0)
    twins = pd.DataFrame({"a": np.ones(5), "b": np.ones(5)})
    assert list(ranking_stability(twins, n_boot=10).p_best) == [0.5, 0.5]  # a tie splits the win

    morf = rng.normal(size=(8, 3))
    random = np.zeros(8)
    same = order_agreement(per_image_table(_evaluation(morf, random, -morf)), n_boot=100)
    assert same["tau"] == pytest.approx(1.0) and same["tau_per_image"] == pytest.approx(1.0)
    flipped = order_agreement(per_image_table(_evaluation(morf, random, morf)), n_boot=100)
    assert flipped["tau"] == pytest.approx(-1.0) and flipped["tau_per_image"] == pytest.approx(-1.0)


def test_run_reliability_metrics_and_markdown():
    rng = np.random.default_rng(7)
    morf = rng.normal(size=(12, 3)) + np.array([2.0, 1.0, 0.0])
    lerf = -morf + rng.normal(size=(12, 3)) * 0.1
    result = run_reliability(per_image_table(_evaluation(morf, np.zeros(12), lerf)), n_boot=200, seed=0)
    assert list(result["alpha"].order) == ["morf", "lerf", "abpc"]
    metrics = run_reliability_metrics(result)
    ranks = stats.rankdata(-morf, axis=1)
    alpha = mn.reliability_metric("krippendorff_alpha", "morf")
    assert metrics[alpha] == pytest.approx(reference_alpha(ranks, ordinal))
    assert metrics[mn.reliability_metric("krippendorff_alpha", "morf", "lo")] <= metrics[alpha]
    assert metrics[mn.ranking_metric(mn.BEATS_RANDOM, "a")] == np.mean(morf[:, 0] > 0)
    assert metrics[mn.ranking_metric(mn.BEATS_RANDOM, "a", "lerf")] == np.mean(lerf[:, 0] < 0)
    assert mn.ranking_metric(mn.P_BEST, "a", "abpc") in metrics and mn.reliability_metric("morf_lerf_tau") in metrics
    md = run_reliability_markdown(result)
    assert "| morf | a | 1 |" in md and "MoRF vs LeRF ranking" in md
    # one explainer: nothing to rank, said so, no α logged
    single = run_reliability(per_image_table(_evaluation(morf[:, :1], np.zeros(12), names=("a",))), n_boot=10)
    assert not len(single["alpha"]) and "nothing to rank" in run_reliability_markdown(single)
    assert not any("krippendorff" in k for k in run_reliability_metrics(single))


# -- across runs (heatmapbench-report) -------------------------------------------------------------
def _runs_tables(settings: dict[tuple[str, int], dict[str, np.ndarray]], order: str = "morf"):
    """Per-image tables of one run per setting × explainer (one explainer per sweep job) and the runs."""
    tables, runs = [], []
    for (perturbation, region), scores in settings.items():
        for name, values in scores.items():
            run_id = f"{perturbation}-{region}-{name}"
            runs.append({"run_id": run_id, "perturbation": perturbation, "region_size": float(region)})
            rel = values if order == "morf" else -values
            tables.append(pd.DataFrame({"image": np.arange(len(values)), "explainer": name, "order": order,
                                        "aopc": rel + 1.0, "aopc_random": 1.0, "aopc_rel": rel, "run_id": run_id}))
    return pd.concat(tables, ignore_index=True), pd.DataFrame(runs)


def test_cross_run_agreement_extremes():
    from heatmapbench.evaluation.reliability import cross_run_reliability, cross_run_reliability_metrics, setting_scores

    rng = np.random.default_rng(8)
    base = rng.normal(size=12)
    same = {(p, r): {"a": base, "b": base + 1.0, "c": 2 * base + 3.0} for p in ("uniform", "blur") for r in (4, 9)}
    per_image, runs = _runs_tables(same)
    scores = setting_scores(per_image, runs)
    assert list(dict.fromkeys(scores.setting)) == ["blur 4px morf", "blur 9px morf", "uniform 4px morf",
                                                   "uniform 9px morf"]
    result = cross_run_reliability(scores, n_boot=50)
    assert result.agreement["kendall_w"] == pytest.approx(1.0)
    assert result.agreement["kendall_w_lo"] == pytest.approx(1.0) and result.agreement["tau_min"] == pytest.approx(1.0)
    assert (result.tau.to_numpy() == 1.0).all()
    consistency = result.consistency.set_index("explainer")
    assert consistency.cronbach_alpha.to_numpy() == pytest.approx(1.0)  # every setting orders the images alike
    assert list(consistency.index) == ["c", "b", "a"] and list(consistency.first_in) == [4, 0, 0]
    assert list(result.settings.ranking) == ["c > b > a"] * 4
    metrics = cross_run_reliability_metrics(result)
    assert metrics["reliability/kendall_w"] == pytest.approx(1.0)  # the documented names
    assert metrics["reliability/cronbach_alpha/a"] == pytest.approx(1.0)

    # LeRF runs are oriented (random − AOPC): a heatmap that is better under LeRF ranks first there too
    lerf_tables, lerf_runs = _runs_tables({("uniform", 4): same["uniform", 4]}, order="lerf")
    both = setting_scores(pd.concat([per_image, lerf_tables]), pd.concat([runs, lerf_runs]))
    assert set(cross_run_reliability(both, n_boot=20).settings.ranking) == {"c > b > a"}

    flipped = {("uniform", 4): {"a": base, "b": base + 1.0}, ("blur", 4): {"a": base + 1.0, "b": base}}
    result = cross_run_reliability(setting_scores(*_runs_tables(flipped)), n_boot=50)
    assert result.agreement["kendall_w"] == pytest.approx(0.0)
    assert result.agreement["tau_min"] == pytest.approx(-1.0)
    assert list(result.settings["rank/a"]) == [1.0, 2.0]  # blur first (sorted), where a leads


def test_cross_run_pools_jobs_averages_replicates_and_says_what_it_leaves_out():
    from heatmapbench.evaluation.reliability import cross_run_reliability, cross_run_reliability_markdown, setting_scores

    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 10, 2))  # settings × images × explainers
    grid = {("uniform", r): {"a": x[i, :, 0], "b": x[i, :, 1]} for i, r in enumerate((4, 9, 16))}
    grid["uniform", 16]["c"] = rng.normal(size=10)  # only one setting scores c
    per_image, runs = _runs_tables(grid)
    # a replicate of (uniform, 4, a) with other scores: the two runs are averaged per image
    extra = per_image[per_image.run_id == "uniform-4-a"].assign(run_id="again", aopc_rel=lambda t: t.aopc_rel + 2.0)
    runs = pd.concat([runs, pd.DataFrame([{"run_id": "again", "perturbation": "uniform", "region_size": 4.0}])])
    per_image = pd.concat([per_image, extra])
    x[0, :, 0] += 1.0
    per_image = per_image[~((per_image.run_id == "uniform-9-b") & (per_image.image == 3))]  # one image missing
    result = cross_run_reliability(setting_scores(per_image, runs), n_boot=50)
    assert result.explainers == ["a", "b"]
    assert any("['c']" in note for note in result.notes) and any("1 images" in note for note in result.notes)
    keep = np.arange(10) != 3
    means = x[:, keep].mean(axis=1)
    ranks = stats.rankdata(-means, axis=1)
    assert result.settings[["rank/a", "rank/b"]].to_numpy() == pytest.approx(ranks)
    assert result.agreement["kendall_w"] == pytest.approx(kendall_w(ranks))
    for j, name in enumerate(["a", "b"]):
        alpha = result.consistency.set_index("explainer").loc[name, "cronbach_alpha"]
        assert alpha == pytest.approx(cronbach_alpha(x[:, keep, j].T))
    assert result.tau.iloc[0, 2] == pytest.approx(stats.kendalltau(means[0], means[2]).statistic)
    assert "Kendall's W of the 3 settings" in cross_run_reliability_markdown(result)

    single = cross_run_reliability(setting_scores(*_runs_tables({("uniform", 4): grid["uniform", 4]})), n_boot=10)
    assert "kendall_w" not in single.agreement and any("one setting" in n for n in single.notes)
