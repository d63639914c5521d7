"""ROAD: noisy linear imputation (Rong et al., ICML 2022), batched in torch on the images' device.

Every removed pixel takes the weighted mean of its 8 neighbours (1/6 sides, 1/12 diagonals),
which is one sparse linear system per image and channel (:func:`road_impute`). Within the engine
the systems are solved *per connected component* (:class:`RoadWalk`): a removed pixel's equation
only involves its 8 neighbours, so two 8-connected components of removed pixels never interact.
When region k is removed, only the component that contains it changes — the other components keep
the values they had at step k−1 — so step k needs one solve on the bounding box of one component,
not one on the whole image. This is exact, not an approximation.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch
from torch import Tensor

from heatmapbench.perturbation.perturbations import Perturbation, PixelSpace

__all__ = ["Road", "RoadWalk", "road_impute"]


def _road_ops(h: int, w: int, device, dtype):
    """Flat, zero-padded layout for the ROAD operator, shared by every solve of one shape.

    An (H, W) image is stored row-major with one zero column after each row (row stride
    e = W+1), as L = H·e values inside a zero margin of g = e+1 values on either side. The zero
    column is the right neighbour of one row's last pixel and the left neighbour of the next
    row's first pixel; the margins are the rows above and below the image. So every 3×3
    neighbour of a pixel is a constant offset (±1, ±e, ±e±1) into the buffer, and a stencil
    becomes a few additions of contiguous slices — much faster on CPU than a single-channel
    ``conv2d``, and no wrap-around across rows.
    """
    e = w + 1
    L = h * e
    g = e + 1

    def framed(t: Tensor) -> tuple[Tensor, Tensor]:  # (n', c', H, W) → buffer (n', c', L+2g), its image view
        buf = torch.zeros(t.shape[0], t.shape[1], L + 2 * g, device=device, dtype=dtype)
        img = buf[:, :, g:g + L]
        img.view(t.shape[0], t.shape[1], h, e)[:, :, :, :w] = t  # converts t's dtype (bool masks) on the way
        return buf, img

    def box121(buf: Tensor) -> Tensor:  # ([1,2,1] ⊗ [1,2,1]) * image in buf → (.., L)
        a = buf[:, :, g - 1 - e:g + L + 1 - e] + buf[:, :, g - 1 + e:g + L + 1 + e]
        a.add_(buf[:, :, g - 1:g + L + 1], alpha=2)
        s = a[:, :, :-2] + a[:, :, 2:]
        return s.add_(a[:, :, 1:-1], alpha=2)

    return e, L, g, framed, box121


def _cg_step(pb: Tensor, v: Tensor, r: Tensor, rr: Tensor, m12: Tensor, c1: Tensor, g: int, e: int, length: int,
             tiny: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One conjugate-gradient iteration of :func:`road_impute`, written for ``torch.compile``
    (no in-place ops): returns the new zero-padded search direction, v, r and ‖r‖²."""
    p = pb[:, :, g:g + length]
    a = pb[:, :, g - 1 - e:g + length + 1 - e] + pb[:, :, g - 1 + e:g + length + 1 + e] + 2 * pb[:, :, g - 1:g + length + 1]
    ap = (a[:, :, :-2] + a[:, :, 2:] + 2 * a[:, :, 1:-1]) * m12 + c1 * p
    alpha = rr / (p * ap).sum(-1, keepdim=True).clamp_min(tiny)
    v = v + alpha * p
    r = r - alpha * ap
    rr_new = (r * r).sum(-1, keepdim=True)
    p = r + (rr_new / rr.clamp_min(tiny)) * p
    return torch.cat([pb[:, :, :g], p, pb[:, :, g + length:]], dim=-1), v, r, rr_new


def _cg_steps(pb: Tensor, v: Tensor, r: Tensor, rr: Tensor, m12: Tensor, c1: Tensor, g: int, e: int, length: int,
              tiny: float, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``count`` iterations of :func:`_cg_step` (one compiled call between two convergence checks)."""
    for _ in range(count):
        pb, v, r, rr = _cg_step(pb, v, r, rr, m12, c1, g, e, length, tiny)
    return pb, v, r, rr


@functools.cache
def _compiled_cg_steps():
    """``torch.compile`` of :func:`_cg_steps` (dynamic shapes), built on first use and shared."""
    return torch.compile(_cg_steps, dynamic=True)


def road_impute(x: Tensor, removed: Tensor, *, tol: float = 1e-6, max_iter: int | None = None,
                check_every: int = 8, valid: Tensor | None = None,
                start: tuple[Tensor, Tensor] | None = None, compile: bool = False) -> Tensor:
    """Noise-free linear imputation of ROAD (Rong et al. 2022), batched, on ``x``'s device.

    Every removed pixel i takes the weighted mean of its in-image 8-neighbours:
    ``D_i v_i − Σ_{n removed} w_in v_n = Σ_{n kept} w_in x_n`` with w = 1/6 (sides), 1/12
    (diagonals) and ``D_i`` the sum of the weights of i's neighbours inside the image — the
    system of pytorch-grad-cam's ``NoisyLinearImputer``. The matrix ``A = D − W_MM`` is symmetric
    and positive definite whenever a removed region touches a kept pixel, so it is solved by
    conjugate gradients for all images and channels at once.

    The stencil is applied without convolutions: the neighbour weights are
    ``W = ([1,2,1] ⊗ [1,2,1] − 4 δ) / 12``, so for v supported on the removed pixels
    ``A v = (D + 1/3) v − (m/12) · ([1,2,1] ⊗ [1,2,1]) v`` — four shifted additions of a
    zero-padded, flattened image plus two fused multiply-adds (see :func:`_road_ops`).
    ``D`` is 1 away from the image border, so CG runs unpreconditioned.

    Parameters
    ----------
    x : (N, C, H, W) images.
    removed : (N, 1, H, W) or (N, C, H, W) bool, true for the pixels to impute.
    tol : relative residual ‖r‖/‖b‖ at which every system counts as solved.
    max_iter : default ``4 (H + W) + 64``.
    check_every : iterations between convergence checks (each check is one host sync). Without
        ``compile``, an image whose systems all meet ``tol`` at a check leaves the batch there.
    valid : optional (N, 1, H, W) bool, the pixels that belong to each image (default: all).
        Pixels outside it are not neighbours of anything, as if beyond the border; this lets
        crops of different sizes share one padded batch. ``removed`` must lie inside it.
    start : optional ``(values, known)``: (N, C, H, W) values and an (N, 1, H, W) bool map of
        the removed pixels whose value is a good first guess (a warm start, e.g. the solution
        of a smaller system); the others start from one Jacobi step. The solution does not
        depend on it beyond ``tol``.
    compile : run each iteration as one ``torch.compile``-d function (fused passes; needs a C++
        compiler; the first call compiles, and each new shape class again, so it pays on long runs). The
        solution does not depend on it beyond ``tol``.

    Returns
    -------
    (N, C, H, W): ``x`` with the removed pixels imputed.
    """
    n, c, h, w = x.shape
    dt, dev = x.dtype, x.device
    if removed.ndim != 4 or removed.shape[0] != n or removed.shape[1] not in (1, c) \
            or tuple(removed.shape[2:]) != (h, w):
        raise ValueError(f"removed must have shape (N, 1, H, W) or (N, C, H, W) = {(n, c, h, w)}, "
                         f"got {tuple(removed.shape)}")
    if valid is not None and tuple(valid.shape) != (n, 1, h, w):
        raise ValueError(f"valid must have shape (N, 1, H, W) = {(n, 1, h, w)}, got {tuple(valid.shape)}")
    if max_iter is None:
        max_iter = 4 * (h + w) + 64
    removed = removed.bool()
    e, L, g, framed, box121 = _road_ops(h, w, dev, dt)
    _, m = framed(removed)  # (N, 1|C, L) 0/1, zero on the padding
    xb, xi = framed(x)
    if valid is None:
        ob, oi = framed(torch.ones(1, 1, h, w, device=dev, dtype=dt))
    else:
        ob, oi = framed(valid)
    d = (box121(ob) - 4 * oi) / 12  # (1|N, 1, L) D: neighbour weight sums (1 inside, less at borders)
    c1 = d + 1 / 3  # A p = c1 p − (m/12) box121(p) for p supported on the removed pixels
    m12 = m / -12
    xi.mul_(torch.addcmul(oi, oi, m, value=-1))  # kept pixels inside the image only: valid · (1 − m)
    b = box121(xb).sub_(xi, alpha=4).mul_(m / 12)  # (N, C, L) Σ_kept w x on the removed pixels
    pb = torch.zeros(n, c, L + 2 * g, device=dev, dtype=dt)  # search direction, zero-padded

    def buffers(pb: Tensor):  # p and its row neighbours (views of pb), A p's two buffers, p·Ap
        k = pb.shape[0]
        a = torch.empty(k, c, L + 2, device=dev, dtype=dt)  # ([1,2,1] vertically) ⊗ p
        ap = torch.empty(k, c, L, device=dev, dtype=dt)
        return (pb[:, :, g:g + L], pb[:, :, g - 1 - e:g + L + 1 - e], pb[:, :, g - 1 + e:g + L + 1 + e],
                pb[:, :, g - 1:g + L + 1], a, a[:, :, :-2], a[:, :, 2:], a[:, :, 1:-1], ap,
                torch.empty(k, c, device=dev, dtype=dt))

    p, up, down, mid, a, a_l, a_r, a_c, ap, pap = buffers(pb)

    def apply_a() -> Tensor:  # A p = c1 p − (m/12) ([1,2,1] ⊗ [1,2,1]) p into ap, allocating nothing
        # (fresh multi-MB temporaries in every CG iteration cost time: benches/bench_perturbation.py)
        torch.add(up, down, out=a)
        a.add_(mid, alpha=2)
        torch.add(a_l, a_r, out=ap)
        return ap.add_(a_c, alpha=2).mul_(m12).addcmul_(c1, p)

    def sq(a: Tensor) -> Tensor:  # ‖a‖², one pass without a temporary (faster than vecdot(a, a))
        return torch.linalg.vector_norm(a, dim=-1, keepdim=True).square_()

    tiny = torch.finfo(dt).tiny
    v = b / d.clamp_min(tiny)  # one Jacobi step as the start (b = 0 off the removed pixels)
    if start is not None:
        values, known = start
        _, sv = framed(values)
        _, sk = framed(known)
        v = torch.lerp(v, sv, sk * m)  # the given values where known, on removed pixels only
    p.copy_(v)
    r = b - apply_a()
    p.copy_(r)
    rr = sq(r)
    bb = sq(b).clamp_min(tiny)
    tol2 = tol * tol
    if compile:
        steps = _compiled_cg_steps()
        for it in range(0, max_iter, check_every):
            if bool((rr <= tol2 * bb).all()):
                break
            pb, v, r, rr = steps(pb, v, r, rr, m12, c1, g, e, L, tiny, min(check_every, max_iter - it))
    else:
        # Images whose systems are solved leave the batch at the next check (their rows of v are
        # final), so the others iterate on fewer rows: batched crops converge at different speeds.
        v_all, alive = v, None
        for it in range(max_iter):
            if it % check_every == 0:
                done = (rr <= tol2 * bb).flatten(1).all(1)  # (n',) per image, all channels
                n_done = int(done.sum())  # one host sync per check
                if n_done == len(done):
                    break
                if n_done:
                    keep = (~done).nonzero().squeeze(1)
                    if alive is None:
                        alive = torch.arange(n, device=dev)
                    else:
                        v_all[alive[done]] = v[done]
                    alive = alive[keep]
                    pb, v, r, rr, bb = pb[keep], v[keep], r[keep], rr[keep], bb[keep]
                    p, up, down, mid, a, a_l, a_r, a_c, ap, pap = buffers(pb)
                    m12 = m12[keep]  # one row per image, like pb
                    if c1.shape[0] > 1:  # one row for all images without valid
                        c1 = c1[keep]
            apply_a()
            torch.linalg.vecdot(p, ap, out=pap)
            alpha = rr / pap.clamp_min_(tiny).unsqueeze(-1)
            v.addcmul_(alpha, p)
            r.addcmul_(alpha, ap, value=-1)
            rr_new = sq(r)
            torch.addcmul(r, rr_new / rr.clamp_min(tiny), p, out=p)  # p ← r + β p
            rr = rr_new
        if alive is not None:
            v_all[alive] = v
            v = v_all
    if not bool((rr <= tol2 * bb).all()):  # max_iter came first: say so, not a rougher imputation silently
        worst = float((rr / bb).max().sqrt())
        warnings.warn(f"ROAD imputation: conjugate gradients stopped at max_iter={max_iter} with a relative "
                      f"residual of {worst:.2g} > tol={tol:g} (images {n}, size {h}x{w}); raise "
                      "max_iter or tol", RuntimeWarning, stacklevel=2)
    out = v.view(n, c, h, e)[:, :, :, :w]
    return torch.where(removed, out, x)


# Crops are padded to sides from these rungs (capped by the image) so that crops of similar size
# share a batched solve: at most 1.25× padding per side (the solves' work is the padded area; 1.5×
# steps cost ~10 % more on MoRF curves), small batches merged into larger ones.
_RUNGS = (4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
          448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)
_MERGE = 1 << 15


def _merge_runs(keys: list[int], counts: list[int], area) -> list[list[int]]:
    """Split sorted ``keys`` into runs solved together at the run's largest key: a run grows while
    padding its items to the next key costs at most ``_MERGE`` values more than their own sizes
    (``area(key)`` values per item)."""
    runs: list[list[int]] = []
    pending, n_pending, used = [], 0, 0
    for i, (k, cnt) in enumerate(zip(keys, counts)):
        pending.append(k)
        n_pending += cnt
        used += cnt * area(k)
        if i + 1 == len(keys) or n_pending * area(keys[i + 1]) - used > _MERGE:
            runs.append(pending)
            pending, n_pending, used = [], 0, 0
    return runs


def _solve_crops(xf: Tensor, shape: tuple[int, int, int, int], bi: Tensor, boxes: Tensor, labels: Tensor,
                 wanted: Tensor, *, tol: float, max_iter: int | None, start: tuple[Tensor, Tensor] | None = None,
                 compile: bool = False) -> tuple[Tensor, ...]:
    """Solve many small ROAD systems, each in a crop of an image, batched by padded crop shape.

    The images are ``xf`` (B·H·W, C), channels last and flattened (pixel q = (b·H + y)·W + x), of
    ``shape`` = (B, C, H, W): crops are then gathered and scattered by row (``index_select``), 4-6×
    faster than advanced indexing of an NCHW tensor.
    Item i is image ``bi[i]`` cropped to ``boxes[i]`` = (y0, y1, x0, x1); its removed pixels
    are those whose label in ``labels`` (B, H, W) long is true in ``wanted[i]`` (a bool row
    over the labels). A crop must hold
    the item's removed pixels and every neighbour of them inside the image (a one-pixel ring),
    so its solve is exact. A crop wider than tall is solved transposed (the ROAD operator is the
    same under transposition), so every crop is padded to a (long, short) shape with both sides
    from ``_RUNGS``: a quarter less padded area than squares on MoRF curves. Crops are grouped by
    long side, then by short side within a group; small groups are merged into the next larger
    one while the padding costs less than a separate solve.
    ``start`` = (values (B·H·W, C), known (B·H·W,) bool), laid out as ``xf``, warm-starts the solves.

    Returns flat lists over the removed pixels of all items: item, pixel q (P,) and the imputed
    values (P, C).
    """
    dev = xf.device
    _, c, h, w = shape
    y0, y1, x0, x1 = boxes.unbind(-1)
    tall, wide = y1 - y0, x1 - x0
    tr = wide > tall  # solved transposed
    rungs = torch.tensor(_RUNGS, device=dev)

    def rung(size: Tensor, cap: int) -> Tensor:
        at = torch.bucketize(size, rungs)
        return torch.where(at < len(_RUNGS), rungs[at.clamp(max=len(_RUNGS) - 1)], cap).clamp(max=cap)

    long_ = rung(torch.maximum(tall, wide), max(h, w))
    short = rung(torch.minimum(tall, wide), min(h, w))
    span = max(h, w) + 1
    key = long_ * span + short  # one integer per (long, short) class
    keys, counts = torch.unique(key, return_counts=True)
    by_long: dict[int, list[tuple[int, int]]] = {}  # long side → [(short side, crops)]
    for k, cnt in zip(keys.tolist(), counts.tolist()):
        by_long.setdefault(k // span, []).append((k % span, cnt))
    longs = sorted(by_long)
    widest = {lg: max(sh for sh, _ in by_long[lg]) for lg in longs}
    groups: list[tuple[int, int, list[int]]] = []  # (long side, short side, keys)
    for run in _merge_runs(longs, [sum(cnt for _, cnt in by_long[lg]) for lg in longs],
                           lambda lg: lg * widest[lg] * c):
        hg = run[-1]
        items = sorted((sh, lg, cnt) for lg in run for sh, cnt in by_long[lg])
        shorts = sorted({sh for sh, _, _ in items})
        per_short = [sum(cnt for sh2, _, cnt in items if sh2 == sh) for sh in shorts]
        for srun in _merge_runs(shorts, per_short, lambda sh: hg * sh * c):
            groups.append((hg, srun[-1], [lg * span + sh for sh, lg, _ in items if sh in srun]))
    parts = []
    for hg, wg, group in groups:
        sel = torch.isin(key, torch.tensor(group, device=dev)).nonzero().squeeze(1)
        t = tr[sel, None, None]
        u = torch.arange(hg, device=dev).view(1, hg, 1)
        v = torch.arange(wg, device=dev).view(1, 1, wg)
        rows = y0[sel, None, None] + torch.where(t, v, u)  # (n, hg, wg): the crop, transposed if t
        cols = x0[sel, None, None] + torch.where(t, u, v)
        valid = (rows < y1[sel, None, None]) & (cols < x1[sel, None, None])
        q = ((bi[sel, None, None] * h + rows.clamp(max=h - 1)) * w + cols.clamp(max=w - 1)).view(-1)
        n = len(sel)
        xc = xf.index_select(0, q).view(n, hg, wg, c).permute(0, 3, 1, 2)  # (n, C, hg, wg)
        lab = labels.view(-1).index_select(0, q).view(n, hg, wg)
        rem = wanted[sel[:, None, None], lab] & valid
        st = None
        if start is not None:
            st = (start[0].index_select(0, q).view(n, hg, wg, c).permute(0, 3, 1, 2),
                  start[1].index_select(0, q).view(n, 1, hg, wg))
        valid = valid.unsqueeze(1)
        out = road_impute(xc, rem.unsqueeze(1), tol=tol, max_iter=max_iter, valid=valid, start=st,
                          compile=compile)
        at = rem.view(-1).nonzero().squeeze(1)  # removed pixels, in crop order
        vals = out.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, at)
        parts.append((sel[at // (hg * wg)], q[at], vals))
    return tuple(torch.cat(t) for t in zip(*parts))


class RoadWalk:
    """ROAD along one repeat's steps: one component solve per (image, step), batched per chunk.

    Built by :meth:`Road.walk` from the step at which each pixel is removed. Regions (all pixels
    removed at one step) are joined into 8-connected components as they are removed
    (union-find over the steps, vectorised over images): ``member[b, k, j]`` says that region j is
    in the component of region k right after step k. Step k re-solves that component alone, in
    its bounding box plus a one-pixel ring of kept pixels, warm-started from the values its
    pixels had; the other removed pixels keep theirs.

    :meth:`fill` builds the inputs of steps ``k0 ≤ k < k1`` for images ``b0 ≤ b < b1``. The
    engine calls it in increasing step order, which lets each image's imputed picture
    (``running``) advance step by step; a call that goes back restarts the images concerned from
    step 1 (correct, just slower).
    """

    def __init__(self, road: "Road", x: Tensor, noise: Tensor, pixel_step: Tensor, steps: int) -> None:
        b, c, h, w = x.shape
        if tuple(pixel_step.shape) != (b, h, w):
            raise ValueError(f"pixel_step must have shape (B, H, W) = {(b, h, w)}, got {tuple(pixel_step.shape)}")
        dev = x.device
        self.road, self.x = road, x
        ps = pixel_step.to(device=dev, dtype=torch.long).clamp(1, steps + 1)  # L+1: never removed
        self.ps = ps
        n = steps + 2  # node ids 1..L are regions; 0 and L+1 are never members
        # Regions touching each other (an 8-neighbour pixel pair with two different steps).
        adj = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
        bidx = torch.arange(b, device=dev).view(b, 1, 1)
        for a, q in ((ps[:, :, 1:], ps[:, :, :-1]), (ps[:, 1:, :], ps[:, :-1, :]),
                     (ps[:, 1:, 1:], ps[:, :-1, :-1]), (ps[:, 1:, :-1], ps[:, :-1, 1:])):
            sel = (a <= steps) & (q <= steps) & (a != q)
            bb = bidx.expand_as(a)[sel]
            adj[bb, a[sel], q[sel]] = True
            adj[bb, q[sel], a[sel]] = True
        # Bounding box of each region as (ymin, -ymax, xmin, -xmax), so that one amin unites boxes.
        ys = torch.arange(h, device=dev).view(1, h, 1).expand(b, h, w).reshape(b, -1)
        xs = torch.arange(w, device=dev).view(1, 1, w).expand(b, h, w).reshape(b, -1)
        flat, big = ps.reshape(b, -1), 2 * (h + w)
        rbox = torch.full((b, n, 4), big, dtype=torch.long, device=dev)
        for i, v in enumerate((ys, -ys, xs, -xs)):
            rbox[..., i].scatter_reduce_(1, flat, v, reduce="amin")
        # Union-find over the steps: lab[b, j] is the component label of region j (the step that
        # last changed it); member[b, k, j] = region j belongs to region k's component after step k,
        # whose bounding box plus a one-pixel ring (clipped to the image) is step k's crop.
        lab = torch.arange(n, device=dev).repeat(b, 1)
        member = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
        cbox = torch.zeros(b, n, 4, dtype=torch.long, device=dev)
        for k in range(1, steps + 1):
            touch = adj[:, k, 1:k].to(torch.uint8)  # (B, k-1)
            hit = torch.zeros(b, n, dtype=torch.uint8, device=dev)
            hit.scatter_reduce_(1, lab[:, 1:k], touch, reduce="amax")
            joined = hit.gather(1, lab[:, 1:k]).bool()  # earlier regions now in k's component
            lab[:, 1:k] = torch.where(joined, k, lab[:, 1:k])
            member[:, k, 1:k] = lab[:, 1:k] == k
            member[:, k, k] = True
            cbox[:, k] = torch.where(member[:, k, 1:k + 1, None], rbox[:, 1:k + 1], big).amin(1)
        self.member = member
        ymin, nymax, xmin, nxmax = cbox.unbind(-1)
        self.crops = torch.stack([(ymin - 1).clamp(0, h), (2 - nymax).clamp(0, h),
                                  (xmin - 1).clamp(0, w), (2 - nxmax).clamp(0, w)], -1)  # (B, n, 4)
        # Flat channels-last copies (pixel q = (b·H + y)·W + x) for the crop solver's row gathers.
        self.xf = x.permute(0, 2, 3, 1).reshape(-1, c)
        self.noisef = noise.permute(0, 2, 3, 1).reshape(-1, c)
        self.running = self.xf.clone()  # each image's picture with the removed pixels imputed so far
        # each image's input at its cursor (running + noise where removed), NCHW as the model takes it
        self.current = x.clone(memory_format=torch.contiguous_format)
        self.solved = torch.zeros(b * h * w, dtype=torch.bool, device=dev)
        self.cursor = [0] * b  # last step pasted into running, per image

    def fill(self, k0: int, k1: int, b0: int, b1: int, out: Tensor) -> Tensor:
        """Inputs of steps k0..k1-1 (1-based) for images b0..b1-1 into ``out`` (K, Bs, C, H, W):
        ``x`` where the pixel is kept at that step, its imputed value plus the noise where removed."""
        b, c, h, w = self.x.shape
        hw = h * w
        for bi in range(b0, b1):
            if self.cursor[bi] >= k0:  # asked to go back: restart this image from step 1
                self.running[bi * hw:(bi + 1) * hw] = self.xf[bi * hw:(bi + 1) * hw]
                self.current[bi] = self.x[bi]
                self.solved[bi * hw:(bi + 1) * hw] = False
                self.cursor[bi] = 0
        first = min(self.cursor[bi] for bi in range(b0, b1)) + 1
        items = [(k, bi) for bi in range(b0, b1) for k in range(self.cursor[bi] + 1, k1)]
        if not items:  # an empty range of steps
            return out
        kk, bb = torch.tensor(items, device=self.x.device).unbind(1)
        # step k's component: the regions (pixel labels = steps) that member[b, k] selects
        item, q, vals = _solve_crops(self.xf, (b, c, h, w), bb, self.crops[bb, kk], self.ps, self.member[bb, kk],
                                     tol=self.road.tol, max_iter=self.road.max_iter, compile=self.road.compile,
                                     start=(self.running, self.solved))
        ks, perm = torch.sort(kk[item], stable=True)
        q, vals = q[perm], vals[perm]
        ends = torch.searchsorted(ks, torch.arange(first, k1 + 1, device=ks.device)).tolist()
        # Step k's input differs from step k-1's only on the component re-solved at step k (the new
        # region included), so each image's input is kept up to date there and copied out: one pass
        # per image-step, and the same values as lerp(x, running + noise, removal mask) bit for bit.
        noisy = vals + self.noisef.index_select(0, q)
        # the same pixels in the NCHW input: (b, ch, y, x) → (b·C + ch)·H·W + y·W + x
        qc = ((q // hw * c)[:, None] + torch.arange(c, device=q.device)) * hw + (q % hw)[:, None]  # (P, C)
        cur = self.current.view(-1)
        for k in range(first, k1):
            s, e = ends[k - first], ends[k - first + 1]  # pixels re-solved at step k (one component per image)
            self.running.index_copy_(0, q[s:e], vals[s:e])
            cur.index_copy_(0, qc[s:e].reshape(-1), noisy[s:e].reshape(-1))
            self.solved.index_fill_(0, q[s:e], True)
            if k >= k0:
                out[k - k0].copy_(self.current[b0:b1])
        for bi in range(b0, b1):
            self.cursor[bi] = k1 - 1
        return out


class Road(Perturbation):
    """ROAD noisy linear imputation (Rong et al., ICML 2022).

    Removed pixels are imputed from their 8 neighbours (:func:`road_impute`), then Gaussian
    noise of σ = ``noise`` in [0, 1]-scaled intensity is added (σ·(hi − lo)/std in model space).
    The imputation depends on which pixels are removed, so it is solved for every step (in the
    engine one connected component per step, see :class:`RoadWalk`); the noise is drawn once per
    repeat (B, C, H, W) and reused, as for the other perturbations. Works for any number of
    channels (RGB included). ``compile=True`` runs the solver's iterations through
    ``torch.compile`` (fused passes, a one-off compile of seconds; see :func:`road_impute`).

    Parameters
    ----------
    noise
        σ of the Gaussian noise added to the imputed pixels, in [0, 1]-scaled intensity.
    tol, max_iter
        The conjugate-gradient solve of :func:`road_impute`: the relative residual at which a
        system counts as solved, and the most iterations (None: ``4 (H + W) + 64``).
    compile
        Run the solver's iterations through ``torch.compile``: faster after a one-off compile, for
        long runs (needs a C++ compiler).
    """

    name = "road"
    WALK_TABLE_LIMIT = 1 << 27  # bool entries per region table (two tables: 256 MiB)
    #: Image-steps built per engine chunk, whatever the forward batch: with a small automatic
    #: forward batch (5 on Lite0) the walk would otherwise solve a handful of image-steps per
    #: call, and the solver's batched work is what makes it fast.
    fill_chunk = 256

    def __init__(self, noise: float = 0.01, tol: float = 1e-6, max_iter: int | None = None,
                 compile: bool = False) -> None:
        if noise < 0:
            raise ValueError(f"Road needs noise ≥ 0, got {noise}")
        if not tol > 0:
            raise ValueError(f"Road needs tol > 0, got {tol}")
        if compile and not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if cxx):
            raise ValueError("Road(compile=True) needs a C++ compiler for torch.compile (none of $CXX, g++, c++, "
                             "clang++ found): install one or leave compile=False")
        self.noise = float(noise)
        self.tol = float(tol)
        self.max_iter = max_iter
        self.compile = bool(compile)

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return eps * (self.noise * space.unit_scale())

    def walk(self, x: Tensor, state: Tensor, pixel_step: Tensor, steps: int) -> RoadWalk | None:
        """The per-component walk, unless its (B, L+2, L+2) region tables would exceed
        ``WALK_TABLE_LIMIT`` entries (e.g. pixel flipping with thousands of 1×1 steps): then
        None, and the engine solves every (step, image) on the whole image instead."""
        if x.shape[0] * (steps + 2) ** 2 > self.WALK_TABLE_LIMIT:
            return None
        return RoadWalk(self, x, state, pixel_step, steps)

    def apply(self, x: Tensor, mask: Tensor, state: Tensor, out: Tensor | None = None) -> Tensor:
        """Impute every masked (…, image) pair on its own (whole-image solves); the engine uses
        :meth:`walk` instead, which re-solves only what changed from one step to the next."""
        shape = torch.broadcast_shapes(x.shape, mask.shape, state.shape)
        c, h, w = shape[-3:]
        x4 = x.expand(shape).reshape(-1, c, h, w)
        m4 = mask.expand(*shape[:-3], 1, h, w).reshape(-1, 1, h, w).to(x.dtype)
        y = road_impute(x4, m4 > 0.5, tol=self.tol, max_iter=self.max_iter, compile=self.compile)
        y = y + state.expand(shape).reshape(-1, c, h, w) * m4
        y = y.view(shape)
        if out is None:
            return y
        return out.copy_(y)
