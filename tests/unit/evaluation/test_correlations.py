"""The unsupervised assessment: clean scores, AOPC / f(x0), correlations with bootstrap CIs, progress counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation import EvaluationSettings
from heatmapbench.evaluation import build_explainers, build_perturbation, engine_forwards, evaluate_batch
from heatmapbench.evaluation.correlation import correlations
from heatmapbench.evaluation.markdown import correlation_markdown
from heatmapbench.evaluation.style import RANDOM_ORDERING_LABEL
from heatmapbench.metrics.summary import correlation_ci
from heatmapbench.models.nets import SmallCNN


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_ci_matches_scipy(method):
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    r, lo, hi = correlation_ci(x, y, method, n_boot=2000, seed=3)
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    assert r == pytest.approx(fn(x, y)[0], abs=1e-12)
    ref = stats.bootstrap((x, y), lambda a, b: fn(a, b)[0], paired=True, vectorized=False, method="percentile",
                          n_resamples=2000, random_state=1).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.04) and hi == pytest.approx(ref.high, abs=0.04)
    assert lo < r < hi


def test_correlation_ci_degenerate_cases():
    assert all(np.isnan(correlation_ci([1, 2], [3, 4])))  # fewer than 3 pairs
    assert all(np.isnan(correlation_ci([1, 2, 3], [5, 5, 5])))  # constant
    r, lo, hi = correlation_ci([0.1, 0.5, 0.7], [1.0, 2.0, 3.5])  # 3 pairs: too few resamples have 3 distinct
    assert r == pytest.approx(stats.pearsonr([0.1, 0.5, 0.7], [1.0, 2.0, 3.5])[0]) and np.isnan(lo) and np.isnan(hi)
    with pytest.raises(ValueError, match="method"):
        correlation_ci([1, 2, 3], [1, 2, 3], "kendall")


def test_correlations_name_each_measure_and_flag_the_random_ordering():
    acc = [0.1, 0.4, 0.6, 0.7, 0.8, 0.85]
    history = pd.DataFrame({"epoch": range(6), "accuracy": acc,
                            mn.explainer_metric(mn.AOPC, "lrp"): [1, 2, 3, 4, 5, 6],
                            mn.explainer_metric(mn.AOPC_REL, "lrp"): [0.0, 0.1, 0.0, 0.1, 0.0, 0.1],
                            mn.random_ordering_metric(mn.AOPC): [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]})
    corr = correlations(history, measures=mn.CORRELATED_MEASURES, n_boot=500)
    assert set(zip(corr.explainer, corr.measure)) == {("lrp", mn.AOPC), ("lrp", mn.AOPC_REL),
                                                     (RANDOM_ORDERING_LABEL, mn.AOPC)}
    raw = corr[(corr.explainer == "lrp") & (corr.measure == mn.AOPC)].iloc[0]
    assert raw.pearson == pytest.approx(stats.pearsonr(acc, range(1, 7))[0])
    text = correlation_markdown(corr)
    assert text.index("relative to random") < text.index("raw")  # the relative measure leads
    assert "The random ordering correlates with accuracy too" in text
    quiet = correlations(history.drop(columns=mn.random_ordering_metric(mn.AOPC)), measures=mn.CORRELATED_MEASURES,
                         n_boot=100)
    assert "random ordering correlates" not in correlation_markdown(quiet)


def test_clean_scores_aopc_norm_and_progress_counts():
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10).eval()
    x = torch.rand(5, 1, 28, 28)
    settings = EvaluationSettings(explainers=["sensitivity_l2", "random"], region_size=7, steps=6, random_repeats=3,
                                  orders=["morf", "lerf"], complexity=False, n_boot=100)
    counted = []
    evaluation = evaluate_batch(net, x, build_explainers(settings.explainers), settings, build_perturbation("uniform"),
                                progress=counted.append)
    # + 1 per engine call: the automatic batch size forwards one image first
    assert sum(counted) == engine_forwards(settings, 5, 2) == 5 * (1 + 3 * 6) + 1 + 2 * 2 * (5 * (1 + 6) + 1)
    with torch.no_grad():
        f0 = net(x).gather(1, evaluation.target[:, None]).squeeze(1)
    torch.testing.assert_close(evaluation.clean_scores, f0)
    assert float(f0.mean()) > 0  # the predicted class's logit: the ratio is defined here
    want = evaluation.aopc("sensitivity_l2").double().mean() / f0.double().mean()
    assert evaluation.aopc_norm("sensitivity_l2") == pytest.approx(float(want))
    assert evaluation.aopc_norm() == pytest.approx(float(evaluation.random_aopc().double().mean() / f0.double().mean()))
    shifted = type(evaluation)(**{**evaluation.__dict__, "clean_scores": -f0.abs() - 1})
    assert np.isnan(shifted.aopc_norm("sensitivity_l2"))  # a non-positive mean score has no ratio
