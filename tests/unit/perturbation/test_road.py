"""ROAD imputation and blur (summaries and complexity: tests/unit/metrics/test_summary.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.ndimage
import torch

from heatmapbench.perturbation import Blur, PixelSpace, Road, RoadWalk, region_perturbation, road_impute, select_regions
from tests.helpers import ref_impute, tiny_net


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


def test_road_impute_warns_when_max_iter_stops_it_before_tol():
    x = torch.rand(2, 3, 32, 32)
    m = random_mask(2, 32, 32, 0.5, seed=3)
    with pytest.warns(RuntimeWarning, match=r"stopped at max_iter=3 with a relative residual of .* > tol=1e-06 "
                                            r"\(images 2, size 32x32\); raise max_iter or tol$"):
        road_impute(x, m, max_iter=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged at the default max_iter: silent
        road_impute(x, m)


def test_road_builds_large_chunks_but_the_model_sees_its_batch_size():
    """Road.fill_chunk: inputs built 256 image-steps at a time, forwards still in batch_size."""
    net = tiny_net(h=16, w=16)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64)
    heat = torch.rand(3, 16, 16, generator=g, dtype=torch.float64)
    seen = []
    handle = net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    kw = dict(region_size=4, steps=12, order="morf", batch_size=5)
    built = []
    fill = RoadWalk.fill

    def recording(self, k0, k1, b0, b1, out):
        built.append((k1 - k0) * (b1 - b0))
        return fill(self, k0, k1, b0, b1, out)

    RoadWalk.fill = recording
    try:
        got = region_perturbation(net, x, heat, perturbation=Road(), **kw)
    finally:
        handle.remove()
        RoadWalk.fill = fill
    assert sum(seen) == 3 + 3 * 12 and max(seen) <= 5 and seen.count(5) >= 7
    assert sum(built) == 3 * 12 and max(built) == 3 * 12  # all 36 image-steps in one block
    narrow = Road()
    narrow.fill_chunk = None  # built one forward batch at a time, as before
    want = region_perturbation(net, x, heat, perturbation=narrow, **kw)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-5)  # warm starts differ within tol


def test_road_impute_float32_and_grad_cam_agree():
    gc = pytest.importorskip("pytorch_grad_cam.metrics.road")
    x = torch.rand(2, 3, 16, 16)
    m = random_mask(2, 16, 16, 0.3, seed=2)
    got = road_impute(x, m)
    imp = gc.NoisyLinearImputer(noise=0.0)
    for i in range(2):
        want = imp(x[i], (~m[i, 0]).float())  # grad-cam's mask: 1 = keep
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile needs a C++ compiler")
def test_road_compiled_iterations_equal_the_direct_solve_and_the_eager_walk():
    # compile=True runs the same CG through torch.compile (fused passes): the direct sparse solve and
    # the eager engine's curves, to the solver's tolerance; check_every=2 keeps the compiled graph small
    x = torch.rand(2, 3, 14, 13)
    m = random_mask(2, 14, 13, 0.4, seed=3)
    got = road_impute(x, m, tol=1e-7, check_every=2, compile=True)
    for i in range(2):
        want = ref_impute(x[i].double().numpy(), m[i, 0].numpy())
        np.testing.assert_allclose(got[i].numpy(), want, rtol=0, atol=2e-5)
    model = tiny_net(c=3, h=14, w=13).float()
    hm = torch.randn(2, 14, 13, generator=torch.Generator().manual_seed(4))
    kw = dict(region_size=3, steps=10, order="morf", repeats=1, seed=1)
    eager = region_perturbation(model, x, hm, perturbation=Road(tol=1e-7), **kw)
    compiled = region_perturbation(model, x, hm, perturbation=Road(tol=1e-7, compile=True), **kw)
    torch.testing.assert_close(compiled.scores, eager.scores, rtol=0, atol=1e-5)


def test_road_compile_without_a_compiler_is_refused_at_once(monkeypatch):
    import heatmapbench.perturbation.road as road

    monkeypatch.setattr(road.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"Road\(compile=True\) needs a C\+\+ compiler"):
        Road(compile=True)
    assert Road().compile is False  # the default needs none


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


def test_road_impute_valid_and_warm_start():
    # a crop padded into a larger canvas (valid marks the crop) solves exactly like the crop alone,
    # and a warm start (any values) changes nothing beyond the tolerance
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 9, 7, dtype=torch.float64, generator=g)
    m = random_mask(2, 9, 7, 0.4, seed=5)
    want = road_impute(x, m, tol=1e-12)
    canvas = torch.rand(2, 3, 16, 12, dtype=torch.float64, generator=g)  # garbage outside the crop
    canvas[:, :, :9, :7] = x
    mc = torch.zeros(2, 1, 16, 12, dtype=torch.bool)
    mc[:, :, :9, :7] = m
    valid = torch.zeros(2, 1, 16, 12, dtype=torch.bool)
    valid[:, :, :9, :7] = True
    got = road_impute(canvas, mc, tol=1e-12, valid=valid)[:, :, :9, :7]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    start = (torch.rand(2, 3, 9, 7, dtype=torch.float64, generator=g) * 5, torch.rand(2, 1, 9, 7, generator=g) < 0.5)
    torch.testing.assert_close(road_impute(x, m, tol=1e-12, start=start), want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="valid must have shape"):
        road_impute(x, m, valid=valid)


def test_road_impute_images_that_converge_early_leave_the_batch_with_their_solution():
    # one batch mixing a trivial system (converged after a few iterations) with hard ones: each
    # image's result is the one it gets when solved alone, whatever the order in the batch
    g = torch.Generator().manual_seed(8)
    x = torch.rand(4, 3, 24, 24, dtype=torch.float64, generator=g)
    m = torch.zeros(4, 1, 24, 24, dtype=torch.bool)
    m[0, :, 5, 5] = True  # one pixel: done at the first check
    m[1, :, 2:22, 2:22] = True  # a large block: the slowest
    m[2] = random_mask(1, 24, 24, 0.3, seed=9)[0]
    m[3, :, 10:13, 3:20] = True
    want = torch.cat([road_impute(x[i:i + 1], m[i:i + 1], tol=1e-12) for i in range(4)])
    for perm in ([0, 1, 2, 3], [1, 3, 0, 2]):
        got = road_impute(x[perm], m[perm], tol=1e-12, check_every=1)
        torch.testing.assert_close(got, want[perm], rtol=0, atol=1e-10)
    # per-image stopping: no image is stopped above tol (relative residual of its own system)
    got = road_impute(x.float(), m, tol=1e-5)
    for i in range(4):
        alone = road_impute(x[i:i + 1], m[i:i + 1], tol=1e-12).float()
        assert (got[i] - alone[0]).abs().max() < 1e-3


def test_road_crops_wider_than_tall_are_solved_transposed_and_agree():
    # the crop solver pads a wide crop to (long, short) transposed; its imputation must equal the
    # whole-image solve of the same removed pixels, for wide, tall and square components
    from heatmapbench.perturbation.road import _solve_crops

    g = torch.Generator().manual_seed(10)
    x = torch.rand(2, 3, 30, 41, dtype=torch.float64, generator=g)
    labels = torch.zeros(2, 30, 41, dtype=torch.long)
    labels[0, 3:6, 2:30] = 1  # wide
    labels[0, 10:28, 33:37] = 2  # tall
    labels[1, 0:9, 30:41] = 1  # wide, at the image corner (clipped crop)
    labels[1, 15:22, 4:11] = 2  # square
    items = [(0, 1), (0, 2), (1, 1), (1, 2)]
    bi = torch.tensor([b for b, _ in items])
    wanted = torch.zeros(4, 3, dtype=torch.bool)
    boxes = []
    for i, (b, lab) in enumerate(items):
        wanted[i, lab] = True
        ys, xs = (labels[b] == lab).nonzero().unbind(1)
        boxes.append([max(int(ys.min()) - 1, 0), min(int(ys.max()) + 2, 30),
                      max(int(xs.min()) - 1, 0), min(int(xs.max()) + 2, 41)])
    boxes = torch.tensor(boxes)
    assert ((boxes[:, 3] - boxes[:, 2]) > (boxes[:, 1] - boxes[:, 0])).sum() == 2  # two transposed
    xf = x.permute(0, 2, 3, 1).reshape(-1, 3)
    item, q, vals = _solve_crops(xf, tuple(x.shape), bi, boxes, labels, wanted, tol=1e-12, max_iter=None)
    bs, ys, xs = q // (30 * 41), q % (30 * 41) // 41, q % 41
    for i, (b, lab) in enumerate(items):
        m = (labels[b] == lab)[None, None]
        want = road_impute(x[b:b + 1], m, tol=1e-12)[0]
        sel = item == i
        assert int(sel.sum()) == int(m.sum())  # every removed pixel once
        assert torch.equal(bs[sel], torch.full_like(bs[sel], b))
        assert m[0, 0, ys[sel], xs[sel]].all()
        torch.testing.assert_close(vals[sel], want[:, ys[sel], xs[sel]].t(), rtol=0, atol=1e-10)


def _walk_setup(mode, order, seed=0, b=3, h=29, w=26, p=3, steps=45):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, dtype=torch.float64, generator=g)
    hm = torch.nn.functional.avg_pool2d(torch.randn(b, 1, h, w, generator=g, dtype=torch.float64), 5, 1, 2)[:, 0]
    _, ps = select_regions(hm, region_size=p, steps=steps, order=order, regions=mode, repeats=1,
                           generator=torch.Generator().manual_seed(seed))
    return x, ps[0], steps


@pytest.mark.parametrize("mode,order", [("grid", "morf"), ("grid", "random"), ("sliding", "morf"),
                                        ("sliding", "random")])
def test_road_walk_components_match_scipy_label(mode, order):
    # The union-find over regions must give, after each step k, exactly the 8-connected component
    # (scipy.ndimage.label) of the removed pixels that contains region k, and its bounding box + 1.
    x, ps, steps = _walk_setup(mode, order)
    walk = RoadWalk(Road(), x, torch.zeros_like(x), ps, steps)
    eight = np.ones((3, 3), dtype=int)
    merges = 0
    for bi in range(x.shape[0]):
        psn = ps[bi].numpy()
        for k in range(1, steps + 1):
            lab, _ = scipy.ndimage.label(psn <= k, structure=eight)
            comp = lab == lab[psn == k][0]
            want = set(np.unique(psn[comp]).tolist())
            got = set(walk.member[bi, k].nonzero().flatten().tolist())
            assert got == want, (bi, k)
            merges += len(want) > 1
            ys, xs = np.nonzero(comp)
            box = [max(ys.min() - 1, 0), min(ys.max() + 2, psn.shape[0]),
                   max(xs.min() - 1, 0), min(xs.max() + 2, psn.shape[1])]
            assert walk.crops[bi, k].tolist() == box
    assert merges > steps  # the case is not trivial: components do merge


class WholeImageRoad(Road):
    """ROAD without the walk: every (step, image) solved on the whole image (Road.apply)."""

    def walk(self, x, state, pixel_step, steps):
        return None


@pytest.mark.parametrize("mode,order", [("grid", "morf"), ("grid", "random"), ("sliding", "lerf")])
def test_road_walk_equals_whole_image_solves(mode, order):
    # per-component solves, warm starts and chunks that split steps give the whole-image result
    x, ps, steps = _walk_setup(mode, order, seed=2)
    model = tiny_net(c=3, h=29, w=26)
    hm = torch.randn(3, 29, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(region_size=3, steps=steps, order=order, regions=mode, repeats=2, seed=3)
    want = region_perturbation(model, x, hm, perturbation=WholeImageRoad(tol=1e-11), **kw)
    for bs in (None, 7, 200):
        got = region_perturbation(model, x, hm, perturbation=Road(tol=1e-11), batch_size=bs, **kw)
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-9)


def test_road_walk_falls_back_to_whole_image_solves_when_tables_are_too_big(monkeypatch):
    x, ps, steps = _walk_setup("grid", "morf", seed=7, steps=12)
    assert isinstance(Road().walk(x, torch.zeros_like(x), ps, steps), RoadWalk)
    monkeypatch.setattr(Road, "WALK_TABLE_LIMIT", x.shape[0] * (steps + 2) ** 2 - 1)
    assert Road().walk(x, torch.zeros_like(x), ps, steps) is None
    model = tiny_net(c=3, h=29, w=26)
    kw = dict(region_size=3, steps=steps, seed=1)
    hm = torch.randn(3, 29, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = region_perturbation(model, x, hm, perturbation=Road(tol=1e-11), **kw)
    want = region_perturbation(model, x, hm, perturbation=WholeImageRoad(tol=1e-11), **kw)
    assert torch.equal(got.scores, want.scores)  # the same code path: whole-image solves


def test_road_walk_inputs_and_going_back():
    # fill() writes where(mask_k, impute(x, mask_k) + noise, x); asking for earlier steps
    # again (not what the engine does) restarts those images and still gives the right inputs
    x, ps, steps = _walk_setup("grid", "morf", seed=6, steps=30)
    noise = 0.01 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    walk = Road(tol=1e-12).walk(x, noise, ps, steps)

    def expect(k0, k1):
        masks = torch.stack([(ps <= k).unsqueeze(1).to(x.dtype) for k in range(k0, k1)])  # (K, B, 1, H, W)
        return torch.stack([road_impute(x, m.bool(), tol=1e-12) + noise * m for m in masks])

    for k0, k1 in ((1, 6), (6, 7), (7, 19), (3, 9), (9, 31)):  # (3, 9) goes back
        want = expect(k0, k1)
        out = torch.empty_like(want)
        walk.fill(k0, k1, 0, x.shape[0], out)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    want = expect(10, 12)  # one image only, behind its cursor
    out = torch.empty_like(want[:, 1:2])
    walk.fill(10, 12, 1, 2, out)
    torch.testing.assert_close(out, want[:, 1:2], rtol=0, atol=1e-10)


def test_blur_matches_scipy():
    x = torch.rand(2, 3, 20, 17, dtype=torch.float64)
    sp = PixelSpace.build(3, None, None, (0, 1), x.device, x.dtype)
    got = Blur().prepare(x, sp, torch.Generator())
    want = np.stack([[scipy.ndimage.gaussian_filter(x[i, c].numpy(), 3.0, mode="nearest", truncate=3.0)
                      for c in range(3)] for i in range(2)])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_road_compile_without_a_compiler_names_its_argument_as_python_spells_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match=r"^Road\(compile=True\) needs a C\+\+ compiler .*: install one or leave "
                                         r"compile=False$"):
        Road(compile=True)
