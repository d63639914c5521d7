"""Which regions are perturbed, in which order (Samek et al., Sec. 3: O = (r_1, …, r_L)).

Both region modes return, for every repeat r and image b,

``order`` (R, B, L)
    the region perturbed at step k = 1..L (``order[..., k-1]``): a tile index
    ``row_tile * n_tile_cols + col_tile`` for ``grid``, a window index
    ``top * (W - P + 1) + left`` for ``sliding``;
``pixel_step`` (R, B, H, W) int32
    the step at which each pixel is perturbed (1..L), or L + 1 if it never is. The input at
    step k is ``where(pixel_step <= k, perturbed, x)``.

Orders: ``morf`` sorts by region score, highest first; ``lerf`` lowest first (appendix eq. 12);
ties keep the index order in both (stable sorts). ``random`` is a seeded permutation per image
and repeat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ORDERS", "REGION_MODES", "grid_shape", "max_regions", "grid_scores", "window_scores",
           "select_regions"]

ORDERS = ("morf", "lerf", "random")
REGION_MODES = ("grid", "sliding")


def grid_shape(h: int, w: int, p: int) -> tuple[int, int]:
    """Tiles per column and row of the grid: ceil(H/P), ceil(W/P) (edge tiles may be cropped)."""
    return -(-h // p), -(-w // p)


def max_regions(h: int, w: int, p: int, regions: str) -> int:
    """The most regions a mode can perturb: all grid tiles, or floor(H/P)·floor(W/P) windows."""
    if regions == "grid":
        nh, nw = grid_shape(h, w, p)
        return nh * nw
    return (h // p) * (w // p)


def grid_scores(heatmap: Tensor, p: int) -> Tensor:
    """Sum of the heatmap in each P×P grid tile, float64: (B, H, W) → (B, nh·nw).

    Tiles start at the top-left corner. When P does not divide H (or W), the last row (column)
    of tiles is cropped at the image border: those smaller tiles are regions like the others,
    scored by the sum over the pixels they have.
    """
    b, h, w = heatmap.shape
    nh, nw = grid_shape(h, w, p)
    hm = F.pad(heatmap.double(), (0, nw * p - w, 0, nh * p - h))  # zeros add nothing to sums
    return hm.view(b, nh, p, nw, p).sum(dim=(2, 4)).reshape(b, nh * nw)


def window_scores(heatmap: Tensor, p: int) -> Tensor:
    """Sum of the heatmap in every P×P window at stride 1, float64: (B, H, W) → (B, (H-P+1)(W-P+1)).

    Two separable box convolutions, so windows of zeros sum to exactly zero.
    """
    b = heatmap.shape[0]
    ones = torch.ones(1, 1, 1, p, dtype=torch.float64, device=heatmap.device)
    s = F.conv2d(heatmap.double()[:, None], ones)
    s = F.conv2d(s, ones.transpose(2, 3))
    return s.reshape(b, -1)


def _rank(scores: Tensor, order: str, repeats: int, generator: torch.Generator) -> Tensor:
    """Region indices in perturbation order, (R, B, N)."""
    b, n = scores.shape
    if order == "random":
        keys = torch.rand((repeats, b, n), generator=generator, device=scores.device)
        return keys.argsort(dim=-1)
    idx = torch.sort(scores, dim=-1, descending=(order == "morf"), stable=True).indices
    return idx.unsqueeze(0).expand(repeats, b, n)


def _grid(heatmap: Tensor, p: int, steps: int, order: str, repeats: int,
          generator: torch.Generator) -> tuple[Tensor, Tensor]:
    b, h, w = heatmap.shape
    nh, nw = grid_shape(h, w, p)
    ranked = _rank(grid_scores(heatmap, p), order, repeats, generator)  # (R, B, N)
    n = ranked.shape[-1]
    step_of_tile = torch.full((repeats, b, n), steps + 1, dtype=torch.int32, device=heatmap.device)
    k = torch.arange(1, steps + 1, dtype=torch.int32, device=heatmap.device).expand(repeats, b, steps)
    step_of_tile.scatter_(-1, ranked[..., :steps], k)
    rows = torch.arange(h, device=heatmap.device) // p
    cols = torch.arange(w, device=heatmap.device) // p
    tile_id = (rows[:, None] * nw + cols[None, :]).view(-1)  # (H·W,)
    pixel_step = step_of_tile[..., tile_id].view(repeats, b, h, w)
    return ranked[..., :steps].contiguous(), pixel_step


def _sliding(heatmap: Tensor, p: int, steps: int, order: str, repeats: int,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    b, h, w = heatmap.shape
    ww = w - p + 1
    ranked = _rank(window_scores(heatmap, p), order, repeats, generator)  # (R, B, Nw)
    g = repeats * b
    ranked = ranked.reshape(g, -1)
    top, left = ranked // ww, ranked % ww  # (G, Nw) window corners in perturbation order
    blocked = torch.zeros_like(ranked, dtype=torch.bool)
    chosen = torch.empty(g, steps, dtype=torch.long, device=heatmap.device)
    ok = torch.ones(g, dtype=torch.bool, device=heatmap.device)
    # Greedy: at each step take the first window (in order) that overlaps no earlier choice.
    # Equivalent to walking the sorted list once; batched over images, L iterations.
    for k in range(steps):
        first = (~blocked).to(torch.uint8).argmax(dim=1, keepdim=True)  # (G, 1) first free
        ok &= ~blocked.gather(1, first).squeeze(1)
        chosen[:, k] = ranked.gather(1, first).squeeze(1)
        t0, l0 = top.gather(1, first), left.gather(1, first)
        blocked |= ((top - t0).abs() < p) & ((left - l0).abs() < p)
    if not bool(ok.all()):
        bad = (~ok).view(repeats, b).any(0).nonzero().flatten().tolist()
        raise ValueError(
            f"steps={steps} sliding {p}x{p} windows do not fit without overlap in image(s) {bad[:10]}: "
            "the greedy selection ran out of free windows. Use fewer steps or a smaller region_size."
        )
    # Paint each chosen window's P×P pixels with its step number (windows do not overlap).
    d = torch.arange(p, device=heatmap.device)
    t0, l0 = chosen // ww, chosen % ww  # (G, L)
    pix = ((t0[..., None, None] + d[:, None]) * w + (l0[..., None, None] + d[None, :]))  # (G, L, P, P)
    kk = torch.arange(1, steps + 1, dtype=torch.int32, device=heatmap.device)
    pixel_step = torch.full((g, h * w), steps + 1, dtype=torch.int32, device=heatmap.device)
    pixel_step.scatter_(1, pix.reshape(g, -1), kk.view(1, steps, 1, 1).expand(g, steps, p, p).reshape(g, -1))
    return chosen.view(repeats, b, steps), pixel_step.view(repeats, b, h, w)


def select_regions(heatmap: Tensor, *, region_size: int, steps: int, order: str, regions: str,
                   repeats: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Region order (R, B, L) and per-pixel perturbation step (R, B, H, W); see the module doc."""
    if regions == "grid":
        return _grid(heatmap, region_size, steps, order, repeats, generator)
    if regions == "sliding":
        return _sliding(heatmap, region_size, steps, order, repeats, generator)
    raise ValueError(f"Unknown regions {regions!r}; use one of {REGION_MODES}")
