"""heatmapbench.metrics: AOPC summaries and their statistics (against scipy and hand computations),
and heatmap complexity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation import Evaluation
from heatmapbench.evaluation.markdown import summary_markdown
from heatmapbench.metrics import (
    abpc,
    heatmap_entropy,
    heatmap_jpeg_size,
    heatmap_png_size,
    mean_ci,
    paired_bootstrap_test,
    relative_to_random,
)
from heatmapbench.metrics.summary import bootstrap_indices, format_p, holm, percentile_ci
from heatmapbench.perturbation import region_perturbation
from tests.helpers import linear_setup


def _normal(n, seed, loc=0.0):
    return torch.from_numpy(np.random.default_rng(seed).normal(loc, 1.0, n))


# ------------------------------------------------------------------------------ bootstrap
def test_one_percentile_helper_for_every_bootstrap_ci():
    """The tensors of the AOPC summaries and the arrays of the reliability tables end in the same helper:
    the linear-interpolation quantile of the finite replicates, whichever type comes in. It is torch's
    (the summaries' numbers stay bit for bit); numpy's, which the reliability tables took, differs from
    it by at most one unit in the last place (in about 1 of 800 quantiles)."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 500, 2000):
        boot = rng.normal(size=n)
        for level in (0.95, 0.9):
            q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
            ref = tuple(torch.quantile(torch.from_numpy(boot), q).tolist())
            assert percentile_ci(boot, level) == ref == percentile_ci(torch.from_numpy(boot), level)
            assert ref == pytest.approx(tuple(np.quantile(boot, q.numpy())), rel=1e-15, abs=1e-300)
    with_nan = np.array([np.nan, 1.0, np.inf, 2.0, 3.0, -np.inf])  # undefined replicates are left out
    assert percentile_ci(with_nan, 0.5) == (1.5, 2.5)
    assert all(math.isnan(v) for v in percentile_ci(np.array([np.nan, np.inf])))
    with pytest.raises(ValueError, match="level must be in"):
        percentile_ci(boot, 1.5)


def test_mean_ci_matches_scipy_bootstrap_percentile():
    v = _normal(100, 0, loc=2.0)
    mean, lo, hi = mean_ci(v, n_boot=20_000, seed=3)
    ref = stats.bootstrap((v.numpy(),), np.mean, n_resamples=20_000, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(5))
    assert mean == pytest.approx(float(v.mean()), abs=1e-12)
    # different random streams: Monte-Carlo error of a 2.5% quantile with B = 20000 is ~0.003
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.012)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.012)


def test_paired_test_agrees_with_scipy_paired_t_test():
    a = _normal(400, 1)
    b = a - 0.06 + 0.9 * _normal(400, 2)  # a beats b by 0.06 on average: p around 0.03
    t = paired_bootstrap_test(a, b, n_boot=20_000, seed=0)
    ref = stats.ttest_rel(a.numpy(), b.numpy(), alternative="greater")
    assert 0.01 < ref.pvalue < 0.1
    # Monte-Carlo error of the bootstrap p at 0.03 with B = 20000 is ~0.0012
    assert t.p_value == pytest.approx(ref.pvalue, abs=0.005)
    ci = stats.bootstrap(((a - b).numpy(),), np.mean, n_resamples=20_000, method="percentile",
                         rng=np.random.default_rng(1)).confidence_interval
    assert (t.lo, t.hi) == pytest.approx((ci.low, ci.high), abs=0.01)
    assert t.mean_diff == pytest.approx(float((a - b).mean()), abs=1e-12)
    # the other direction: p of "b beats a" is large, as scipy's
    assert paired_bootstrap_test(b, a, n_boot=20_000, seed=0).p_value == pytest.approx(
        stats.ttest_rel(b.numpy(), a.numpy(), alternative="greater").pvalue, abs=0.01)


def test_p_value_floor_is_printed_as_a_bound():
    a = _normal(50, 3)
    t = paired_bootstrap_test(a + 5.0, a, n_boot=999, seed=0)
    assert t.p_value == 1 / 1000 and t.n_boot == 999
    assert format_p(t.p_value, 999) == "< 1/1000"
    assert format_p(0.0123, 999) == "0.0123"


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max
    want = {0.005: 0.02, 0.01: 0.03, 0.03: 0.06, 0.04: 0.06}
    np.testing.assert_allclose(holm(p), [want[x] for x in p])
    np.testing.assert_allclose(holm([0.9, 0.5]), [1.0, 1.0])
    with pytest.raises(ValueError, match="p-values"):
        holm([0.1, float("nan")])


def test_bootstrap_indices_are_seeded_and_checked():
    assert torch.equal(bootstrap_indices(7, 5, seed=2), bootstrap_indices(7, 5, seed=2))
    assert not torch.equal(bootstrap_indices(7, 50, seed=2), bootstrap_indices(7, 50, seed=3))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_indices(7, 0)
    with pytest.raises(ValueError, match="do not resample"):
        mean_ci(torch.ones(4), indices=bootstrap_indices(5, 10))


# --------------------------------------------------------------------- Evaluation tables
@pytest.fixture
def evaluation():
    """Hand-made curves of 3 explainers on 60 images, L = 4; 'good' clearly beats 'bad'."""
    g = torch.Generator().manual_seed(0)
    n, steps = 60, 4
    ramp = torch.arange(steps + 1, dtype=torch.float64) / steps

    def curves(level):
        return (level + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)) * ramp

    return Evaluation(
        steps=steps,
        curves={"good": {"morf": curves(2.0), "lerf": curves(0.2)}, "mid": {"morf": curves(1.0), "lerf": curves(0.5)},
                "bad": {"morf": curves(0.5), "lerf": curves(0.4)}},
        random_curves=curves(0.4),
        complexity={name: {"png": torch.arange(n) + k} for k, name in enumerate(["good", "mid", "bad"])})


def test_summary_means_and_cis(evaluation):
    table = evaluation.summary(n_boot=500, seed=4).set_index("explainer")
    rand = evaluation.random_curves.numpy().mean(axis=1)
    idx = bootstrap_indices(60, 500, seed=4)
    for name in evaluation.explainers:
        morf = evaluation.curves[name]["morf"].numpy().mean(axis=1)
        lerf = evaluation.curves[name]["lerf"].numpy().mean(axis=1)
        row = table.loc[name]
        assert row.aopc == pytest.approx(morf.mean())
        assert row.aopc_rel == pytest.approx((morf - rand).mean())
        assert row.abpc == pytest.approx((morf - lerf).mean())
        assert row.aopc_lerf == pytest.approx(lerf.mean())
        # the CI is the 2.5/97.5% quantiles of the resampled means (numpy's linear quantile)
        boot = (morf - rand)[idx.numpy()].mean(axis=1)
        assert (row.aopc_rel_lo, row.aopc_rel_hi) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
        assert row.images == 60
    assert table.loc["mid", mn.COMPLEXITY_PNG] == pytest.approx(np.arange(60).mean() + 1)
    assert table.attrs[mn.random_ordering_metric(mn.AOPC)][0] == pytest.approx(rand.mean())


def test_pairwise_tests_are_holm_adjusted(evaluation):
    pw = evaluation.pairwise(n_boot=400, seed=1)
    assert len(pw) == 6 and set(pw.columns) >= {"p_value", "p_holm", "significant"}
    np.testing.assert_allclose(pw.p_holm, holm(pw.p_value))
    assert (pw.p_holm >= pw.p_value).all()
    assert (pw.significant == (pw.p_holm < 0.05)).all()
    row = pw[(pw.a == "good") & (pw.b == "bad")].iloc[0]
    good = evaluation.aopc_relative("good").numpy()
    bad = evaluation.aopc_relative("bad").numpy()
    assert row.mean_diff == pytest.approx((good - bad).mean())
    assert row.significant and row.p_value == 1 / 401
    assert not pw[(pw.a == "bad") & (pw.b == "good")].iloc[0].significant
    assert "< 1/401" in summary_markdown(evaluation.summary(n_boot=400, seed=1), pw)


def test_statistics_share_one_bootstrap(evaluation):
    s = evaluation.statistics(n_boot=300, seed=7)
    pd.testing.assert_frame_equal(s.summary, evaluation.summary(n_boot=300, seed=7))
    pd.testing.assert_frame_equal(s.pairwise, evaluation.pairwise(n_boot=300, seed=7))
    # a different seed moves the intervals: the seed is really used
    other = evaluation.statistics(n_boot=300, seed=8).summary
    assert not np.allclose(other.aopc_rel_lo, s.summary.aopc_rel_lo)


def test_curves_table_running_mean_and_sem(evaluation):
    table = evaluation.curves_table()
    assert set(table.order) == {"morf", "lerf"} and len(table) == 3 * 2 * 5
    part = table[(table.explainer == "mid") & (table.order == "morf")]
    c = evaluation.curves["mid"]["morf"].numpy()
    r = evaluation.random_curves.numpy()
    running = np.cumsum(c, axis=1) / np.arange(1, 6)
    rel = running - np.cumsum(r, axis=1) / np.arange(1, 6)
    np.testing.assert_allclose(part.aopc, running.mean(0))
    np.testing.assert_allclose(part.aopc_rel, rel.mean(0))
    np.testing.assert_allclose(part.aopc_rel_hi - part.aopc_rel, 1.96 * stats.sem(rel, axis=0), atol=1e-12)
    # the last step's running mean is the AOPC of the summary
    assert part.aopc.iloc[-1] == pytest.approx(float(evaluation.aopc("mid").mean()))


# ------------------------------------------------------------------- per-image summaries
@pytest.fixture(scope="module")
def three_orders():
    model, x, hm, tgt = linear_setup(b=24)
    kw = dict(target=tgt, region_size=4, steps=8, perturbation="constant", repeats=2)
    return {o: region_perturbation(model, x, hm, order=o, **kw) for o in ("morf", "lerf", "random")}


def test_abpc_and_relative_to_random(three_orders):
    m, l, r = three_orders["morf"], three_orders["lerf"], three_orders["random"]
    a = abpc(m, l)
    # eq. 13 written out: 1/(L+1) Σ_k f(x_LeRF^(k)) − f(x_MoRF^(k)), averaged over repeats
    want = (l.scores - m.scores).mean(dim=(0, 2))
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(a, m.aopc.mean(0) - l.aopc.mean(0))
    assert (a > 0).float().mean() > 0.9
    rel = relative_to_random(m, r)
    torch.testing.assert_close(rel, m.aopc.mean(0) - r.aopc.mean(0))
    assert rel.mean() > 0


def test_summaries_reject_mismatched_results(three_orders):
    model, x, hm, _ = linear_setup(b=5)
    other = region_perturbation(model, x, hm, region_size=4, steps=8, perturbation="constant")
    with pytest.raises(ValueError, match="same images"):
        abpc(three_orders["morf"], other)


def test_mean_ci_covers_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(400, generator=g) + 3.0
    mean, lo, hi = mean_ci(v, seed=1)
    assert lo < mean < hi and lo < 3.0 < hi
    # the CI width is about 2 · 1.96 σ/√n
    assert abs((hi - lo) - 2 * 1.96 / math.sqrt(400)) < 0.05
    assert mean_ci(v, seed=1) == (mean, lo, hi)
    with pytest.raises(ValueError, match="NaN"):
        mean_ci(torch.tensor([1.0, float("nan")]))


def test_paired_bootstrap_test():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g)
    better = base + 0.3 + 0.1 * torch.randn(200, generator=g)
    t = paired_bootstrap_test(better, base, seed=0)
    assert t.p_value < 0.01 and t.prob_a_better > 0.99 and t.lo < 0.3 < t.hi
    t2 = paired_bootstrap_test(base, better, seed=0)
    assert t2.p_value > 0.99
    same = paired_bootstrap_test(base + 0.01 * torch.randn(200, generator=g), base, seed=0)
    assert 0.01 < same.p_value < 0.99
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_test(base, base[:10])


# -------------------------------------------------------------------------------- complexity
def test_complexity_orders_smooth_below_noisy():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    smooth = torch.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 200)[None]
    noisy = torch.rand(1, 64, 64, generator=g)
    hms = torch.cat([smooth, noisy])
    png, jpg = heatmap_png_size(hms), heatmap_jpeg_size(hms)
    assert png.shape == (2,) and png[0] < png[1] and jpg[0] < jpg[1]
    assert (png > 50).all() and (jpg > 100).all()


def test_entropy_extremes():
    one = torch.zeros(1, 8, 8)
    one[0, 3, 3] = -2.0
    flat = torch.ones(1, 8, 8)
    e = heatmap_entropy(torch.cat([one, flat, torch.zeros(1, 8, 8)]))
    torch.testing.assert_close(e, torch.tensor([0.0, 6.0, 6.0]))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        heatmap_entropy(torch.ones(8, 8))
