"""ROAR/KAR: removal masks against a direct top-k, the fills, and the retraining loop on a 2-class toy set."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from heatmapbench.models import ClassifierModule
from heatmapbench.perturbation.perturbations import PixelSpace, Uniform
from heatmapbench.roar import jobs, removal_mask, remove, retrain


def test_removal_masks_equal_a_direct_top_k():
    h = torch.tensor([[[0.9, 0.1, 0.5], [0.3, 0.8, 0.2], [0.0, 0.7, 0.4]]])  # distinct values
    flat = h.flatten().tolist()
    by_value = sorted(range(9), key=lambda i: -flat[i])
    for t in (0.0, 1 / 9, 0.3, 0.5, 1.0):
        k = round(t * 9)
        roar = removal_mask(h, t, "roar").flatten()
        kar = removal_mask(h, t, "kar").flatten()
        assert set(torch.nonzero(roar).flatten().tolist()) == set(by_value[:k])  # the k highest
        assert set(torch.nonzero(kar).flatten().tolist()) == set(by_value[9 - k:])  # the k lowest
        assert roar.sum() == kar.sum() == k


def test_remove_fills_only_the_masked_locations_in_every_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    h = torch.rand(2, 4, 4, generator=g)
    mean = torch.tensor([0.1, -0.2, 0.3])
    out = remove(x, h, 0.25, "roar", fill=mean)
    mask = removal_mask(h, 0.25, "roar").bool().expand_as(x)
    assert torch.equal(out[~mask], x[~mask])
    assert torch.equal(out[mask], mean.view(1, 3, 1, 1).expand_as(x)[mask])
    space = PixelSpace.build(3, None, None, (0.0, 1.0), x.device, x.dtype)
    noisy = remove(x, h, 0.25, "kar", fill=Uniform(), space=space, generator=torch.Generator().manual_seed(1))
    kept = ~removal_mask(h, 0.25, "kar").bool().expand_as(x)
    assert torch.equal(noisy[kept], x[kept]) and bool(((noisy[~kept] >= 0) & (noisy[~kept] < 1)).all())
    with pytest.raises(ValueError, match="method"):
        removal_mask(h, 0.1, "morf")


def test_jobs_cover_the_grid_once():
    grid = jobs(["roar", "kar"], ["a", "random"], [0.1, 0.5], [0, 1])
    assert len(grid) == 2 + 2 * 2 * 2 * 2 and len({j.key for j in grid}) == len(grid)
    assert grid[0].key == "none/-/t0.00/seed0"


def _toy(n: int, seed: int):
    """2 classes of 8×8 images: faint noise; class 1 adds a bright 2×2 patch at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 2
    for i in torch.nonzero(y).flatten().tolist():
        r, c = torch.randint(0, 7, (2,), generator=g).tolist()
        x[i, 0, r:r + 2, c:c + 2] = 1.0
    return x, y


def test_retraining_on_a_toy_set_follows_the_oracle_heatmap():
    (xtr, ytr), (xte, yte) = _toy(256, 0), _toy(128, 1)
    fill = xtr.mean(dim=(0, 2, 3))  # Hooker: the per-channel training mean
    module = lambda: ClassifierModule(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), num_classes=2,  # noqa: E731
                                      optimizer=partial(torch.optim.Adam, lr=0.1))
    trainer = lambda: pl.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,  # noqa: E731
                                 enable_progress_bar=False, enable_model_summary=False)

    def accuracy(heat_tr, heat_te, t, method, seed=0):
        train = (remove(xtr, heat_tr, t, method, fill=fill), ytr)
        test = (remove(xte, heat_te, t, method, fill=fill), yte)
        return retrain(module, trainer, train, None, test, seed=seed, batch_size=64)[1]["test/acc"]

    oracle_tr, oracle_te = xtr[:, 0], xte[:, 0]  # the patch is the brightest: an oracle heatmap
    g = torch.Generator().manual_seed(2)
    random_tr, random_te = torch.rand(256, 8, 8, generator=g), torch.rand(128, 8, 8, generator=g)
    clean = accuracy(oracle_tr, oracle_te, 0.0, "roar")
    assert clean > 0.9
    assert accuracy(oracle_tr, oracle_te, 0.1, "roar") < 0.65  # the evidence is gone: near chance
    assert accuracy(random_tr, random_te, 0.1, "roar") > 0.8  # random removal mostly misses the patch
    assert accuracy(oracle_tr, oracle_te, 0.9, "kar") > 0.9  # keeping the top 10% keeps the patch
    assert accuracy(oracle_tr, oracle_te, 0.0, "roar", seed=0) == clean  # same recipe and seed: same result
