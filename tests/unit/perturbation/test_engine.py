"""Region-perturbation engine against a slow per-image, per-step reference, plus oracles and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import nn

from heatmapbench.perturbation import (
    Constant,
    PixelSpace,
    Uniform,
    region_perturbation,
)
from tests.helpers import linear_setup, ref_impute, tiny_net

ORDERS = ["morf", "lerf", "random"]
PERTS = ["uniform", "mean", "constant", "blur", "road"]
REGIONS = ["grid", "sliding"]


# --------------------------------------------------------------------------- the slow reference
def ref_regions(hm: np.ndarray, p: int, mode: str) -> list[tuple[int, int, int, int]]:
    """Candidate regions as (top, left, height, width), in index order."""
    h, w = hm.shape
    if mode == "grid":
        return [(t, l, min(p, h - t), min(p, w - l)) for t in range(0, h, p) for l in range(0, w, p)]
    return [(t, l, p, p) for t in range(h - p + 1) for l in range(w - p + 1)]


def overlaps(a, b) -> bool:
    return not (a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1])


def ref_order(hm, p, mode, order, steps, keys):
    cands = ref_regions(hm, p, mode)
    s = [float(hm[t:t + hh, l:l + ww].astype(np.float64).sum()) for t, l, hh, ww in cands]
    if order == "morf":
        idx = sorted(range(len(cands)), key=lambda i: -s[i])
    elif order == "lerf":
        idx = sorted(range(len(cands)), key=lambda i: s[i])
    else:
        idx = sorted(range(len(cands)), key=lambda i: float(keys[i]))
    taken = []
    for i in idx:  # the paper's greedy walk; on a grid nothing ever overlaps
        if all(not overlaps(cands[i], cands[j]) for j in taken):
            taken.append(i)
        if len(taken) == steps:
            break
    return [cands[i] for i in taken], taken


def reference(model, x, hm, *, p, steps, order, pert, mode, repeats, seed, mean=None, std=None,
              value_range=(0.0, 1.0)):
    b, c, h, w = x.shape
    lo, hi = value_range
    mu = torch.zeros(c, dtype=x.dtype) if mean is None else torch.tensor(mean, dtype=x.dtype)
    sd = torch.ones(c, dtype=x.dtype) if std is None else torch.tensor(std, dtype=x.dtype)
    mu, sd = mu.view(c, 1, 1), sd.view(c, 1, 1)
    n_cand = len(ref_regions(hm[0].numpy(), p, mode))
    g_order = torch.Generator().manual_seed(2 * seed)
    keys = torch.rand((repeats, b, n_cand), generator=g_order) if order == "random" else None
    g_pert = torch.Generator().manual_seed(2 * seed + 1)
    curves = torch.zeros(repeats, b, steps + 1, dtype=x.dtype)
    orders = torch.zeros(repeats, b, steps, dtype=torch.long)
    with torch.no_grad():
        f0 = model(x)  # per image below; this only fixes the target
        tgt = f0.argmax(1)
        for r in range(repeats):
            if pert == "uniform":
                fill = ((lo + torch.rand(x.shape, generator=g_pert, dtype=x.dtype) * (hi - lo)) - mu) / sd
            elif pert == "road":
                noise = torch.randn(x.shape, generator=g_pert, dtype=x.dtype) * 0.01 * (hi - lo) / sd
            elif pert == "mean":
                fill = x.mean(dim=(0, 2, 3)).view(1, c, 1, 1).expand_as(x) if mean is None else \
                    torch.zeros_like(x)
            elif pert == "constant":
                fill = ((lo - mu) / sd).expand_as(x)
            elif pert == "blur":
                fill = torch.from_numpy(np.stack([[scipy.ndimage.gaussian_filter(
                    x[i, j].numpy(), sigma=3.0, mode="nearest", truncate=3.0) for j in range(c)]
                    for i in range(b)]))
            for i in range(b):
                regs, idx = ref_order(hm[i].numpy(), p, mode, order,
                                      steps, None if keys is None else keys[r, i])
                orders[r, i] = torch.tensor(idx)
                s0 = model(x[i:i + 1])[0, tgt[i]]
                xk = x[i].clone()
                removed = np.zeros((h, w), dtype=bool)
                for k, (t, l, hh, ww) in enumerate(regs, start=1):
                    removed[t:t + hh, l:l + ww] = True
                    if pert == "road":
                        xk = torch.from_numpy(ref_impute(x[i].numpy(), removed))
                        xk = xk + noise[i] * torch.from_numpy(removed)
                    else:
                        xk[:, t:t + hh, l:l + ww] = fill[i, :, t:t + hh, l:l + ww]
                    curves[r, i, k] = s0 - model(xk[None])[0, tgt[i]]
    return curves, orders


@pytest.mark.parametrize("order,pert,mode", list(itertools.product(ORDERS, PERTS, REGIONS)))
def test_engine_matches_reference(order, pert, mode):
    torch.manual_seed(1)
    model = tiny_net()
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    hm = torch.randn(2, 10, 10, dtype=torch.float64)
    steps = 6 if mode == "grid" else 4
    kw = dict(p=3, steps=steps, order=order, pert=pert, mode=mode, repeats=2, seed=5)
    want, want_order = reference(model, x, hm, **kw)
    got = region_perturbation(model, x, hm, region_size=3, steps=steps, order=order, perturbation=pert,
                              regions=mode, repeats=2, seed=5, batch_size=5)
    assert torch.equal(got.order, want_order)  # tile / window (top * (W - P + 1) + left) indices
    tol = dict(rtol=1e-7, atol=1e-7) if pert in ("road", "blur") else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.curves, want, **tol)
    assert torch.all(got.curves[..., 0] == 0)
    torch.testing.assert_close(got.aopc, want.mean(-1), **tol)


def test_sliding_order_is_window_index_and_disjoint():
    torch.manual_seed(0)
    hm = torch.randn(3, 12, 11)
    model = tiny_net(h=12, w=11)
    res = region_perturbation(model, torch.rand(3, 3, 12, 11).double(), hm.double(), region_size=3,
                              steps=5, regions="sliding", perturbation="constant")
    ww = 11 - 3 + 1
    for i in range(3):
        regs, idx = ref_order(hm[i].double().numpy(), 3, "sliding", "morf", 5, None)
        assert res.order[0, i].tolist() == [t * ww + l for t, l, _, _ in regs]
        # MoRF's first window is the best-scoring window
        sums = torch.nn.functional.avg_pool2d(hm[i][None, None].double(), 3, stride=1).flatten()
        assert res.order[0, i, 0] == sums.argmax()


@pytest.mark.parametrize("pert", ["constant", "uniform"])
@pytest.mark.parametrize("mode", REGIONS)
def test_oracle_morf_beats_random_beats_lerf(pert, mode):
    model, x, hm, tgt = linear_setup()
    kw = dict(target=tgt, region_size=2, steps=20, perturbation=pert, regions=mode, repeats=3, seed=0)
    a = {o: region_perturbation(model, x, hm, order=o, **kw).aopc.mean().item() for o in ORDERS}
    assert a["morf"] > a["random"] > a["lerf"], a


def test_seed_reproducible_and_varies():
    model, x, hm, _ = linear_setup(c=3)
    kw = dict(region_size=2, steps=10, order="random", perturbation="uniform", repeats=2)
    r1 = region_perturbation(model, x, hm, seed=3, **kw)
    r2 = region_perturbation(model, x, hm, seed=3, **kw)
    r3 = region_perturbation(model, x, hm, seed=4, **kw)
    assert torch.equal(r1.curves, r2.curves) and torch.equal(r1.order, r2.order)
    assert not torch.equal(r1.curves, r3.curves)
    # a random order of its own per image and per repeat
    assert not torch.equal(r1.order[0], r1.order[1])
    assert not torch.equal(r1.order[0, 0], r1.order[0, 1])
    # another seed changes the uniform draw even with a fixed (MoRF) order
    kw["order"] = "morf"
    m1 = region_perturbation(model, x, hm, seed=3, **kw)
    m2 = region_perturbation(model, x, hm, seed=4, **kw)
    assert torch.equal(m1.order, m2.order) and not torch.equal(m1.curves, m2.curves)
    # repeats draw anew
    assert not torch.equal(m1.curves[0], m1.curves[1])


def test_uniform_per_pixel_per_channel_in_range():
    x = torch.zeros(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    space = PixelSpace.build(3, None, None, (0.0, 1.0), x.device, x.dtype)
    u = Uniform().prepare(x, space, g)
    assert u.shape == x.shape
    assert 0 <= u.min() and u.max() <= 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    patch = u[:, :, :9, :9]
    assert (patch.flatten(2).std(-1) > 0.2).all()  # not one scalar per patch
    assert (u[:, 0] != u[:, 1]).float().mean() > 0.99  # channels independent
    assert abs(torch.corrcoef(torch.stack([u[:, 0].flatten(), u[:, 1].flatten()]))[0, 1]) < 0.01
    # EfficientNet-style pixels in [0, 255], model = (px - 127) / 128
    sp = PixelSpace.build(3, [127.0] * 3, [128.0] * 3, (0.0, 255.0), x.device, x.dtype)
    m = Uniform().prepare(x, sp, torch.Generator().manual_seed(0))
    px = m * 128 + 127
    assert px.min() >= 0 and px.max() <= 255 and abs(px.mean().item() - 127.5) < 1.5


class Recorder(nn.Module):
    """Records every batch it is fed and scores it with a fixed linear map."""

    def __init__(self, c, h, w, k=3):
        super().__init__()
        self.lin = nn.Linear(c * h * w, k)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.lin(x.flatten(1))


def test_engine_inputs_are_paper_uniform_in_model_space():
    b, c, h, w = 4, 3, 8, 8
    model = Recorder(c, h, w)
    x = torch.full((b, c, h, w), 0.25)
    hm = torch.randn(b, h, w)
    res = region_perturbation(model, (x - 0.5) / 0.25, hm, region_size=2, steps=16, mean=[0.5],
                              std=[0.25], batch_size=1000)
    last = torch.cat(model.seen[1:])[-b:]  # the inputs at step L (step-major)
    px = last * 0.25 + 0.5
    changed = (px - 0.25).abs() > 1e-6
    assert changed.float().mean() > 0.2  # 16 of 16 2x2 tiles = a quarter of the pixels
    assert px.min() >= 0 and px.max() <= 1
    assert res.curves.shape == (1, b, 17)


def test_chunking_bounds_batch_and_keeps_results():
    b, c, h, w = 5, 2, 8, 8
    torch.manual_seed(0)
    x, hm = torch.rand(b, c, h, w).double(), torch.randn(b, h, w).double()
    results = []
    for bs in (1, 3, 5, 7, 1000):
        model = Recorder(c, h, w).double()
        torch.manual_seed(1)
        model.lin.reset_parameters()
        res = region_perturbation(model, x, hm, region_size=2, steps=9, batch_size=bs, repeats=2)
        assert max(t.shape[0] for t in model.seen) <= bs
        assert sum(t.shape[0] for t in model.seen) == b + 2 * b * 9  # step 0 once, then R·B·L
        results.append(res.curves)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-12)


def test_automatic_batch_size_follows_the_largest_activation(monkeypatch):
    """batch_size=None: one probe forward of one image, then chunks of budget // largest tensor per image."""
    from heatmapbench.perturbation import engine

    b, c, h, w = 6, 2, 8, 8
    torch.manual_seed(0)
    x, hm = torch.rand(b, c, h, w).double(), torch.randn(b, h, w).double()
    model = Recorder(c, h, w).double()
    widest = nn.Conv2d(c, 16, 3, padding=1).double()  # the largest tensor: 16·8·8 float64 = 8192 bytes/image
    full = nn.Sequential(widest, nn.Conv2d(16, c, 1).double(), model)
    monkeypatch.setattr(engine, "AUTO_BATCH_BYTES", 3 * 8192 + 100)
    auto = region_perturbation(full, x, hm, region_size=2, steps=9, repeats=2)
    assert [t.shape[0] for t in model.seen][0] == 1  # the probe
    assert max(t.shape[0] for t in model.seen[1:]) == 3
    assert sum(t.shape[0] for t in model.seen) == 1 + b + 2 * b * 9
    model.seen.clear()
    fixed = region_perturbation(full, x, hm, region_size=2, steps=9, repeats=2, batch_size=1000)
    torch.testing.assert_close(auto.curves, fixed.curves, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(engine, "AUTO_BATCH_BYTES", 10)  # below one image: one per forward
    model.seen.clear()
    region_perturbation(full, x, hm, region_size=2, steps=3)
    assert max(t.shape[0] for t in model.seen) == 1


def test_mode_restored_and_probability_score():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4), nn.Dropout(0.5))
    model.train()
    x, hm = torch.rand(3, 3, 4, 4), torch.randn(3, 4, 4)
    r1 = region_perturbation(model, x, hm, region_size=2, steps=3, perturbation="constant")
    r2 = region_perturbation(model, x, hm, region_size=2, steps=3, perturbation="constant")
    assert model.training and model[2].training
    assert torch.equal(r1.curves, r2.curves)  # dropout was off
    rp = region_perturbation(model, x, hm, region_size=2, steps=3, perturbation="constant",
                             score="probability")
    assert (rp.scores > 0).all() and (rp.scores < 1).all()
    model.eval()
    with torch.no_grad():
        p0 = model(x).softmax(1).max(1).values
    torch.testing.assert_close(rp.scores[0, :, 0], p0)


def test_instance_and_mean_std_constant():
    model, x, hm, _ = linear_setup(c=3, b=2, h=6, w=6)
    r = region_perturbation(model, x, hm, region_size=3, steps=4, perturbation=Constant(0.5),
                            mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2], value_range=(0, 1))
    # constant 0.5 of [0, 1] is the mean → 0 in model space: the last step feeds all zeros
    with torch.no_grad():
        want = model(torch.zeros_like(x)).gather(1, r.target[:, None]).squeeze(1)
    torch.testing.assert_close(r.scores[0, :, -1], want)


# ----------------------------------------------------------------------------- bad input
class Exploding(nn.Module):
    def forward(self, x):  # pragma: no cover - must never run
        raise AssertionError("forward pass ran before input validation")


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=17), "exceeds"),
    (dict(steps=10, regions="sliding", region_size=5), "exceeds"),
    (dict(region_size=0), "region_size"),
    (dict(region_size=17), "larger than the image"),
    (dict(order="best"), "Unknown order"),
    (dict(perturbation="noise"), "Unknown perturbation"),
    (dict(regions="hex"), "Unknown regions"),
    (dict(score="loss"), "Unknown score"),
    (dict(repeats=0), "repeats"),
    (dict(batch_size=0), "batch_size"),
    (dict(mean=[0.1, 0.2]), "mean"),
    (dict(value_range=(1.0, 0.0)), "value_range"),
])
def test_bad_arguments_fail_before_forward(kwargs, match):
    x, hm = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16)
    kw = dict(region_size=4, steps=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        region_perturbation(Exploding(), x, hm, **kw)


@pytest.mark.parametrize("hm,match", [
    (torch.rand(2, 3, 16, 16), r"\(B, H, W\)"),
    (torch.rand(2, 16, 15), r"\(B, H, W\)"),
    (torch.rand(3, 16, 16), r"\(B, H, W\)"),
    (torch.tensor(float("nan")).expand(2, 16, 16), "NaN or inf"),
    (torch.tensor(float("inf")).expand(2, 16, 16), "NaN or inf"),
])
def test_bad_heatmap_fails_before_forward(hm, match):
    with pytest.raises(ValueError, match=match):
        region_perturbation(Exploding(), torch.rand(2, 3, 16, 16), hm, region_size=4, steps=4)


def test_sliding_out_of_windows_fails_before_forward():
    # 4 windows of 3x3 fit in 6x6, but a greedy walk from the centre blocks them all after one
    hm = torch.zeros(1, 6, 6)
    hm[0, 1:5, 1:5] = 1.0
    hm[0, 2:4, 2:4] = 5.0
    with pytest.raises(ValueError, match="ran out of free windows"):
        region_perturbation(Exploding(), torch.rand(1, 1, 6, 6), hm, region_size=3, steps=4,
                            regions="sliding")
