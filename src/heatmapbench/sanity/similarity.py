"""Similarity of two batches of heatmaps, per image: the measures of the randomisation test.

Adebayo et al., *Sanity checks for saliency maps* (NeurIPS 2018), Sec. 3, compare the heatmap of
the trained model with the heatmap of a randomised one by

* ``spearman_abs``: Spearman's rank correlation of the absolute values (ties share their mean
  rank, as ``scipy.stats.spearmanr``); NaN for an image whose heatmap is constant (no ranking);
* ``ssim``: the structural similarity (Wang et al. 2004) of the absolute heatmaps, each divided
  by its maximum (so ``data_range`` = 1), with ``skimage.metrics.structural_similarity``'s
  defaults: a 7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariances, the mean over the
  windows that lie inside the image;
* ``topk``: the fraction of the top-k locations by absolute value that both heatmaps share
  (k = ``fraction`` of the locations, at least 1; ties are broken by ``torch.topk``).

Every function takes ``(B, H, W)`` heatmaps and returns ``(B,)`` float64; 1 means identical up to
the measure's invariance, lower means the heatmap changed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SIMILARITIES", "average_ranks", "spearman_abs", "ssim", "topk_intersection", "similarity"]


def _check(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"similarities compare (B, H, W) heatmaps of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a.detach().to(torch.float64), b.detach().to(b.device, torch.float64)


def average_ranks(values: Tensor) -> Tensor:
    """(B, P) ranks 1..P of every row, ties given the mean of the ranks they span (scipy's ``average``)."""
    b, p = values.shape
    sorted_v, order = values.sort(dim=1)  # (B, P)
    new = torch.ones_like(sorted_v, dtype=torch.bool)
    new[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    group = new.cumsum(dim=1) - 1 + torch.arange(b, device=values.device).unsqueeze(1) * p  # unique per row
    pos = torch.arange(p, device=values.device, dtype=torch.float64).expand(b, p).reshape(-1)
    flat = group.reshape(-1)
    first = torch.full((b * p,), float(p), dtype=torch.float64, device=values.device).scatter_reduce(
        0, flat, pos, reduce="amin")
    last = torch.zeros(b * p, dtype=torch.float64, device=values.device).scatter_reduce(0, flat, pos, reduce="amax")
    mean_rank = (first[flat] + last[flat]) / 2 + 1  # (B*P,) in sorted order
    ranks = torch.empty(b, p, dtype=torch.float64, device=values.device)
    return ranks.scatter_(1, order, mean_rank.view(b, p))


def spearman_abs(a: Tensor, b: Tensor) -> Tensor:
    """(B,) Spearman's ρ of |a| and |b| per image; NaN where one heatmap is constant."""
    a, b = _check(a, b)
    ra, rb = average_ranks(a.abs().flatten(1)), average_ranks(b.abs().flatten(1))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return (ra * rb).sum(dim=1) / den  # 0/0 = NaN for a constant heatmap


def _by_max(h: Tensor) -> Tensor:
    """|h| / max |h| per image; an all-zero heatmap stays zero."""
    h = h.abs()
    top = h.flatten(1).amax(dim=1).view(-1, 1, 1)
    return h / torch.where(top > 0, top, torch.ones_like(top))


def ssim(a: Tensor, b: Tensor, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """(B,) mean SSIM of |a|/max|a| and |b|/max|b| (data range 1), as skimage computes it.

    skimage filters with a uniform window (reflect-padded) and averages the SSIM map over the
    windows that lie inside the image; those are exactly the valid positions of a ``win_size``
    average pooling. Covariances are sample covariances (``n / (n - 1)``), as skimage's default.
    """
    a, b = _check(a, b)
    if win_size % 2 == 0 or win_size < 3 or min(a.shape[1:]) < win_size:
        raise ValueError(f"ssim needs an odd win_size >= 3 no larger than the heatmap {tuple(a.shape[1:])}, "
                         f"got {win_size}")
    x, y = _by_max(a).unsqueeze(1), _by_max(b).unsqueeze(1)  # (B, 1, H, W)
    pool = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731
    n = win_size * win_size
    cov_norm = n / (n - 1)
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def topk_intersection(a: Tensor, b: Tensor, fraction: float = 0.1) -> Tensor:
    """(B,) |top-k(|a|) ∩ top-k(|b|)| / k with k = max(1, round(fraction · H · W))."""
    a, b = _check(a, b)
    if not 0 < fraction <= 1:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    p = a[0].numel()
    k = max(1, round(fraction * p))
    ia = a.abs().flatten(1).topk(k, dim=1).indices
    ib = b.abs().flatten(1).topk(k, dim=1).indices
    in_a = torch.zeros(a.shape[0], p, dtype=torch.bool, device=a.device).scatter_(1, ia, True)
    return in_a.gather(1, ib).sum(dim=1).to(torch.float64) / k


#: The measures by name; every entry maps ``(a, b)`` (B, H, W) to (B,).
SIMILARITIES: dict[str, Callable[..., Tensor]] = {
    "spearman_abs": spearman_abs,
    "ssim": ssim,
    "topk": topk_intersection,
}


def similarity(name: str, a: Tensor, b: Tensor, **kwargs) -> Tensor:
    """The measure ``name`` of :data:`SIMILARITIES`; an unknown name lists the known ones."""
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name](a, b, **kwargs)
