"""ROAD imputation, blur, summaries (AOPC relative to random, ABPC, bootstrap) and heatmap complexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from heatmapbench.perturbation import (
    Blur,
    PixelSpace,
    Road,
    abpc,
    heatmap_entropy,
    heatmap_jpeg_size,
    heatmap_png_size,
    mean_ci,
    paired_bootstrap_test,
    region_perturbation,
    relative_to_random,
    road_impute,
)
from tests.test_perturbation import linear_setup, ref_impute


def random_mask(n, h, w, frac, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, 1, h, w, generator=g) < frac
    # plus a solid block, the hard case for iterative solvers
    m[:, :, h // 4: h // 4 + h // 3, w // 4: w // 4 + w // 3] = True
    return m


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_road_impute_matches_direct_sparse_solve_rgb(frac):
    x = torch.rand(3, 3, 14, 13, dtype=torch.float64)
    m = random_mask(3, 14, 13, frac, seed=1)
    got = road_impute(x, m, tol=1e-10)
    for i in range(3):
        want = ref_impute(x[i].numpy(), m[i, 0].numpy())
        np.testing.assert_allclose(got[i].numpy(), want, rtol=0, atol=1e-8)
    assert torch.equal(got[~m.expand_as(x)], x[~m.expand_as(x)])  # kept pixels untouched


def test_road_impute_float32_and_grad_cam_agree():
    gc = pytest.importorskip("pytorch_grad_cam.metrics.road")
    x = torch.rand(2, 3, 16, 16)
    m = random_mask(2, 16, 16, 0.3, seed=2)
    got = road_impute(x, m)
    imp = gc.NoisyLinearImputer(noise=0.0)
    for i in range(2):
        want = imp(x[i], (~m[i, 0]).float())  # grad-cam's mask: 1 = keep
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-5)


def test_road_impute_per_channel_masks_thin_and_border_holes():
    # per-channel masks, a non-square image, holes touching every border and a 1-pixel-high image:
    # the conv-free stencil (shifted slices of a zero-framed flat image) must not wrap across rows
    g = torch.Generator().manual_seed(3)
    for h, w in ((7, 11), (1, 9), (12, 2)):
        x = torch.rand(2, 3, h, w, dtype=torch.float64, generator=g)
        m = torch.rand(2, 3, h, w, generator=g) < 0.4
        m[0, 0, 0, :] = True
        m[0, 1, :, -1] = True
        m[1, 2, -1, :] = True
        m[1, 0, :, 0] = True
        m[:, :, 0, 0] = False  # keep one pixel per channel so every system is solvable
        got = road_impute(x, m, tol=1e-12)
        for i in range(2):
            for ch in range(3):
                want = ref_impute(x[i, ch:ch + 1].numpy(), m[i, ch].numpy())
                np.testing.assert_allclose(got[i, ch:ch + 1].numpy(), want, rtol=0, atol=1e-9)


def test_road_impute_rejects_bad_mask_shape():
    with pytest.raises(ValueError, match=r"removed must have shape"):
        road_impute(torch.rand(2, 3, 8, 8), torch.zeros(2, 2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"removed must have shape"):
        road_impute(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))


def test_road_edge_cases():
    x = torch.rand(2, 3, 6, 6)
    none = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    assert torch.equal(road_impute(x, none), x)
    allm = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    assert torch.isfinite(road_impute(x, allm)).all()
    # a constant image is imputed as that constant
    c = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(road_impute(c, random_mask(1, 9, 9, 0.5, 0)), c)


def test_road_noise_scale_and_space():
    x = torch.zeros(8, 3, 32, 32)
    sp = PixelSpace.build(3, [127.0] * 3, [128.0] * 3, (0.0, 255.0), x.device, x.dtype)
    eps = Road(noise=0.01).prepare(x, sp, torch.Generator().manual_seed(0))
    # σ = 0.01 of the [0, 1] intensity range → 0.01 · 255 / 128 in model space
    assert abs(eps.std().item() - 0.01 * 255 / 128) < 2e-4


def test_blur_matches_scipy():
    x = torch.rand(2, 3, 20, 17, dtype=torch.float64)
    sp = PixelSpace.build(3, None, None, (0, 1), x.device, x.dtype)
    got = Blur().prepare(x, sp, torch.Generator())
    want = np.stack([[scipy.ndimage.gaussian_filter(x[i, c].numpy(), 3.0, mode="nearest", truncate=3.0)
                      for c in range(3)] for i in range(2)])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


# --------------------------------------------------------------------------------- summaries
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
