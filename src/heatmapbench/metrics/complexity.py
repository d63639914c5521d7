"""Heatmap complexity (Samek et al., Table I): compressed file size and entropy.

The paper argues that a good heatmap is less noisy, hence compresses better and has lower
entropy. Heatmaps are rendered as 8-bit grey images with a symmetric scale: ``0 ↦ 128``,
``±max|h| ↦ 255/0`` (per heatmap), so signed and unsigned methods are rendered alike.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["render_heatmaps", "heatmap_png_size", "heatmap_jpeg_size", "heatmap_entropy"]


def _check(heatmaps: Tensor) -> Tensor:
    if not isinstance(heatmaps, Tensor) or heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must be a (B, H, W) tensor, got {getattr(heatmaps, 'shape', type(heatmaps))}")
    if not bool(torch.isfinite(heatmaps).all()):
        raise ValueError("heatmaps contain NaN or inf")
    return heatmaps.detach().double().cpu()


def render_heatmaps(heatmaps: Tensor) -> np.ndarray:
    """(B, H, W) → uint8 (B, H, W): ``round(127.5 + 127.5 · h / max|h|)``; an all-zero map is 128."""
    h = _check(heatmaps)
    scale = h.abs().amax(dim=(1, 2), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(127.5 + 127.5 * h / scale).clamp(0, 255).to(torch.uint8).numpy()


def _sizes(heatmaps: Tensor, fmt: str, **kw) -> Tensor:
    out = []
    for img in render_heatmaps(heatmaps):  # encoders are per image; not a hot path
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format=fmt, **kw)
        out.append(buf.tell())
    return torch.tensor(out, dtype=torch.long)


def heatmap_png_size(heatmaps: Tensor) -> Tensor:
    """PNG size in bytes of each rendered heatmap (Pillow defaults), (B,)."""
    return _sizes(heatmaps, "PNG")


def heatmap_jpeg_size(heatmaps: Tensor, quality: int = 90) -> Tensor:
    """JPEG size in bytes of each rendered heatmap at ``quality`` (paper: 90), (B,)."""
    return _sizes(heatmaps, "JPEG", quality=quality)


def heatmap_entropy(heatmaps: Tensor, base: float = 2.0) -> Tensor:
    """Shannon entropy of each normalised heatmap, (B,).

    The heatmap is normalised to a distribution over pixels, ``p = |h| / Σ|h|``, and
    ``H = −Σ p log p`` (bits by default): 0 for all relevance on one pixel, log(H·W) for a
    uniform map. An all-zero heatmap counts as uniform.
    """
    h = _check(heatmaps).abs().flatten(1)
    tot = h.sum(dim=1, keepdim=True)
    p = torch.where(tot > 0, h / tot.clamp_min(1e-300), torch.full_like(h, 1.0 / h.shape[1]))
    ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=1)
    return (ent / np.log(base)).float()
