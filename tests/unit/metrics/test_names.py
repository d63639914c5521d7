"""Metric names: built and parsed in one place; explainer metrics never collide with bookkeeping."""

from __future__ import annotations

import pytest

from heatmapbench.metrics import names as mn
from heatmapbench.registry import available


def test_explainer_metrics_round_trip():
    for measure in mn.MEASURES:
        for bound in (None, *mn.BOUNDS):
            name = mn.explainer_metric(measure, "lrp_epsilon_0.01", bound)
            assert mn.parse_explainer_metric(name) == (measure, "lrp_epsilon_0.01", bound)
    assert mn.explainer_metric(mn.AOPC_REL, "gradient", "lo") == "aopc_rel_lo/gradient"
    assert mn.explainer_metric(mn.COMPLEXITY_PNG, "random") == "complexity_png/random"


def test_correlations_round_trip_and_are_not_explainer_metrics():
    name = mn.correlation_metric("pearson", mn.AOPC_REL, "lrp_epsilon_0.01")
    assert name == "corr_pearson/aopc_rel/lrp_epsilon_0.01"
    assert mn.parse_correlation_metric(name) == ("pearson", mn.AOPC_REL, "lrp_epsilon_0.01", None)
    assert mn.parse_correlation_metric(mn.correlation_metric("spearman", mn.AOPC_NORM, "x", "hi")) == (
        "spearman", mn.AOPC_NORM, "x", "hi")
    assert mn.parse_explainer_metric(name) is None
    assert mn.parse_correlation_metric("aopc_rel/x") is None


def test_bookkeeping_and_the_random_ordering_are_never_explainers():
    bookkeeping = [mn.SECONDS, mn.IMAGES, mn.ACCURACY, mn.SUBSET_ACCURACY, mn.EPOCH, mn.VAL_ACC, mn.TEST_ACC]
    bookkeeping += [mn.random_ordering_metric(m, b) for m in (mn.AOPC, mn.AOPC_NORM) for b in (None, *mn.BOUNDS)]
    bookkeeping += [mn.random_ordering_correlation(k, m, b) for k in mn.CORRELATION_METHODS
                    for m in (mn.AOPC, mn.AOPC_NORM) for b in (None, *mn.BOUNDS)]
    assert len(set(bookkeeping)) == len(bookkeeping)
    for name in bookkeeping:
        assert mn.parse_explainer_metric(name) is None, name
        assert mn.parse_correlation_metric(name) is None, name
    for name in bookkeeping[:5] + bookkeeping[7:]:
        assert name.startswith(mn.NAMESPACE + "/"), name
    # the random *heatmap* explainer is an explainer; the random *ordering* is bookkeeping
    assert "random" in available("explainer")
    assert mn.parse_explainer_metric(mn.explainer_metric(mn.AOPC, "random")).explainer == "random"
    assert mn.random_ordering_metric(mn.AOPC) == "eval/random_ordering/aopc"
    names = [mn.explainer_metric(mn.AOPC, "random"), mn.explainer_metric(mn.AOPC_REL, "gradient"), *bookkeeping,
             mn.correlation_metric("pearson", mn.AOPC, "other")]
    assert mn.explainers_in(names) == ["random", "gradient"]


def test_no_explainer_config_collides_with_a_measure_or_the_namespace():
    for name in available("explainer"):
        parsed = mn.parse_explainer_metric(mn.explainer_metric(mn.AOPC, name))
        assert parsed == (mn.AOPC, name, None)
        assert name != mn.NAMESPACE


@pytest.mark.parametrize("call, message", [
    (lambda: mn.explainer_metric("aopc_random", "x"), "unknown"),
    (lambda: mn.explainer_metric(mn.AOPC, "a/b"), "no '/'"),
    (lambda: mn.explainer_metric(mn.AOPC, "x", "mid"), "bound"),
    (lambda: mn.correlation_metric("kendall", mn.AOPC, "x"), "unknown"),
    (lambda: mn.random_ordering_metric(mn.AOPC_REL), "0 by definition"),
])
def test_bad_names_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_ranking_and_reliability_names():
    assert mn.ranking_metric(mn.BEATS_RANDOM, "a") == "beats_random/a"
    assert mn.ranking_metric(mn.P_BEST, "a", "abpc") == "p_best_abpc/a"
    assert mn.parse_explainer_metric(mn.ranking_metric(mn.BEATS_RANDOM, "a", "lerf")) == ("beats_random_lerf", "a", None)
    assert mn.reliability_metric("krippendorff_alpha", "morf", "lo") == "reliability/krippendorff_alpha_lo/morf"
    assert mn.reliability_metric("morf_lerf_tau") == "reliability/morf_lerf_tau"
    assert mn.parse_explainer_metric(mn.reliability_metric("morf_lerf_tau")) is None
    with pytest.raises(ValueError, match="order"):
        mn.ranking_metric(mn.P_BEST, "a", "random")
