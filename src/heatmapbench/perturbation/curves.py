"""What a perturbation curve sums to: the area over it (AOPC, paper eq. 11).

Here, below both the engine (which reports it with every curve) and :mod:`heatmapbench.metrics`
(which summarises it over images, against random orderings and with confidence intervals).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["aopc"]


def aopc(curves: Tensor) -> Tensor:
    """Per-image AOPC of perturbation curves ``(..., L+1)``: ``1/(L+1) Σ_{k=0..L} curve_k`` (eq. 11)."""
    return curves.mean(dim=-1)
