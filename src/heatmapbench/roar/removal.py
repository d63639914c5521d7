"""Which pixels ROAR and KAR replace, and with what (Hooker et al., NeurIPS 2019, Sec. 3).

For a fraction t of the H·W locations, k = round(t·H·W):

* ``roar`` (remove and retrain) replaces the k locations with the *highest* heatmap values, all
  channels of each (the order of MoRF in region perturbation);
* ``kar`` (keep and retrain) replaces the k locations with the *lowest* values, keeping the top ones.

Hooker et al. replace by the per-channel mean of the training images (:func:`remove` with a ``fill``
of shape (C,)); any perturbation of the engine (:mod:`heatmapbench.perturbation`) can be given
instead: its ``prepare`` draws the replacement image and ``apply`` pastes it where the mask is set
(ROAD's ``apply`` imputes the removed pixels of the whole image, Rong et al.'s ROAR variant).
Ties among heatmap values are broken by ``torch.topk``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from heatmapbench.perturbation.perturbations import Perturbation, PixelSpace

__all__ = ["METHODS", "removal_mask", "remove"]

#: ROAR replaces the top-t locations, KAR the bottom-t.
METHODS = ("roar", "kar")


def removal_mask(heatmap: Tensor, fraction: float, method: str = "roar") -> Tensor:
    """(N, 1, H, W) mask in the heatmap's float dtype: 1 where a location is replaced, 0 elsewhere."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: choose one of {', '.join(METHODS)}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction} is invalid: a fraction of the locations in [0, 1]")
    n, h, w = heatmap.shape
    k = round(fraction * h * w)
    mask = torch.zeros(n, h * w, dtype=torch.float32, device=heatmap.device)
    if k:
        idx = heatmap.reshape(n, -1).topk(k, dim=1, largest=method == "roar").indices  # (N, k)
        mask.scatter_(1, idx, 1.0)
    return mask.view(n, 1, h, w)


def remove(x: Tensor, heatmap: Tensor, fraction: float, method: str = "roar", *,
           fill: Tensor | Perturbation, space: PixelSpace | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """``x`` (N, C, H, W, model space) with the locations of :func:`removal_mask` replaced.

    ``fill``: a (C,) per-channel value in model space (Hooker: the training mean), or a
    :class:`~heatmapbench.perturbation.Perturbation` with the data's ``space`` and a seeded ``generator``.
    """
    mask = removal_mask(heatmap, fraction, method).to(x.dtype)  # (N, 1, H, W)
    if isinstance(fill, Perturbation):
        if space is None or generator is None:
            raise ValueError("a perturbation fill needs the data's PixelSpace and a seeded torch.Generator")
        return fill.apply(x, mask, fill.prepare(x, space, generator))
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if value.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"fill has {value.shape[1]} values for {x.shape[1]} channels")
    return torch.lerp(x, value.expand_as(x), mask)
