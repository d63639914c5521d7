"""Perturbations g(x, r): what a removed region is replaced with (Samek et al., Sec. 3 and appendix).

Each perturbation is a small class registered by a YAML file in ``conf/perturbation/``.
The engine calls it in two phases, so that a repeat's random draw is made once and a
perturbed pixel keeps its value across the steps:

``prepare(x, space, generator)``
    once per repeat, on the clean images ``x`` (B, C, H, W) in model space; returns a
    per-repeat *state*, for most perturbations the fully perturbed image (B, C, H, W).
``apply(x, mask, state, out)``
    for a chunk of (step, image) pairs: ``x`` (..., C, H, W), ``mask`` (..., 1, H, W) in x's
    dtype, exactly 1 where the pixel has been removed and 0 elsewhere, ``state`` broadcastable
    to ``x``. Writes into ``out``.

All values live in *model space* (what the model is fed); :class:`PixelSpace` maps the
paper's [0, 1]-scaled pixel intensities into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PixelSpace",
    "Perturbation",
    "Uniform",
    "Mean",
    "Constant",
    "Blur",
    "Road",
    "road_impute",
]


@dataclass(frozen=True)
class PixelSpace:
    """How pixels map into model space: ``model = (px - mean) / std`` per channel.

    ``value_range`` = (lo, hi) is the pixel range (``(0, 1)`` for torchvision data, ``(0, 255)``
    for EfficientNet-Lite0). ``mean`` and ``std`` are tensors of shape (C,) (identity when the
    data has no normalisation).
    """

    mean: Tensor  # (C,)
    std: Tensor  # (C,)
    lo: float
    hi: float

    @classmethod
    def build(cls, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None,
              value_range: tuple[float, float], device: torch.device,
              dtype: torch.dtype) -> "PixelSpace":
        m = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        s = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float64)
        return cls(m.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype),
                   float(value_range[0]), float(value_range[1]))

    def _c(self, t: Tensor) -> Tensor:
        return t.view(-1, 1, 1)  # (C, 1, 1) broadcasts over (..., C, H, W)

    def to_model(self, px: Tensor) -> Tensor:
        """Pixel space → model space."""
        return (px - self._c(self.mean)) / self._c(self.std)

    def unit_to_model(self, u: Tensor) -> Tensor:
        """The paper's [0, 1]-scaled intensity ``u`` → pixel ``lo + u (hi - lo)`` → model space."""
        return self.to_model(self.lo + u * (self.hi - self.lo))

    def unit_scale(self) -> Tensor:
        """Model-space size of one unit of [0, 1]-scaled intensity, per channel: (C, 1, 1)."""
        return (self.hi - self.lo) / self._c(self.std)


class Perturbation:
    """Base class: a fill image drawn once per repeat, pasted where the mask is set.

    Attributes
    ----------
    name : str
        Registry name (``conf/perturbation/<name>.yaml``).
    random : bool
        Whether :meth:`prepare` draws from the generator (so repeats differ).
    """

    name = "base"
    random = False

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        """Return the per-repeat state (here: the fully perturbed image, (B, C, H, W))."""
        raise NotImplementedError

    def apply(self, x: Tensor, mask: Tensor, state: Tensor, out: Tensor | None = None) -> Tensor:
        """``x`` where ``mask`` is 0, ``state`` where it is 1 (broadcasting; into ``out``).

        ``lerp`` with weights exactly 0 or 1 returns ``x`` or ``state`` bit for bit, and is several
        times faster than ``torch.where`` with a broadcast boolean mask.
        """
        return torch.lerp(x, state, mask, out=out) if out is not None else torch.lerp(x, state, mask)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Uniform(Perturbation):
    """The paper's perturbation: each removed pixel gets an independent U(0, 1) value per channel.

    Drawn in the paper's [0, 1]-scaled pixel intensities (appendix: "RGB value drawn from
    U[0,1]^3", mean 0.5), mapped to ``value_range`` and then into model space with the data's
    mean/std. One draw per repeat, shape (B, C, H, W).
    """

    name = "uniform"
    random = True

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return space.unit_to_model(u)


class Mean(Perturbation):
    """Per-channel dataset mean.

    ``pixel_mean`` (pixel space, one value per channel) if given; otherwise the data's ``mean``
    passed to the engine, which is 0 in model space; when neither is known, the per-channel
    mean of the batch being evaluated (model space).
    """

    name = "mean"

    def __init__(self, pixel_mean: Sequence[float] | None = None) -> None:
        self.pixel_mean = None if pixel_mean is None else [float(v) for v in pixel_mean]

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        c = x.shape[1]
        if self.pixel_mean is not None:
            if len(self.pixel_mean) not in (1, c):
                raise ValueError(f"Mean(pixel_mean=...) needs 1 or {c} values, got {len(self.pixel_mean)}")
            px = torch.as_tensor(self.pixel_mean, device=x.device, dtype=x.dtype).expand(c)
            fill = space.to_model(px.view(c, 1, 1))
        elif bool((space.mean != 0).any() or (space.std != 1).any()):
            fill = torch.zeros(c, 1, 1, device=x.device, dtype=x.dtype)
        else:
            fill = x.mean(dim=(0, 2, 3)).view(c, 1, 1)
        return fill.expand(x.shape)


class Constant(Perturbation):
    """A constant ``value`` in [0, 1]-scaled intensity (0 = the bottom of ``value_range``)."""

    name = "constant"

    def __init__(self, value: float = 0.0) -> None:
        self.value = float(value)

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        u = torch.full((x.shape[1], 1, 1), self.value, device=x.device, dtype=x.dtype)
        return space.unit_to_model(u).expand(x.shape)


def gaussian_kernel1d(sigma: float, truncate: float, device=None, dtype=None) -> Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (as scipy.ndimage)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


class Blur(Perturbation):
    """Gaussian blur of the clean image, σ = 3 (paper appendix), pasted into removed regions.

    Separable, radius ``int(truncate·σ + 0.5)`` (9 for the defaults), borders replicated
    (scipy.ndimage's ``mode='nearest'``). The blur is linear with weights summing to one, so
    blurring in model space equals blurring in pixel space.
    """

    name = "blur"

    def __init__(self, sigma: float = 3.0, truncate: float = 3.0) -> None:
        if sigma <= 0:
            raise ValueError(f"Blur needs sigma > 0, got {sigma}")
        self.sigma = float(sigma)
        self.truncate = float(truncate)

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        k = gaussian_kernel1d(self.sigma, self.truncate, x.device, x.dtype)
        r = (k.numel() - 1) // 2
        y = x.reshape(b * c, 1, h, w)
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return y.view(b, c, h, w)


# Rong et al. (2022), ROAD: the 8 neighbours, 1/6 for sides and 1/12 for diagonals.
_ROAD_KERNEL = [[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]


def _road_ops(n: int, h: int, w: int, device, dtype):
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
        img.view(t.shape[0], t.shape[1], h, e)[:, :, :, :w] = t
        return buf, img

    def box121(buf: Tensor) -> Tensor:  # ([1,2,1] ⊗ [1,2,1]) * image in buf → (.., L)
        a = buf[:, :, g - 1 - e:g + L + 1 - e] + buf[:, :, g - 1 + e:g + L + 1 + e]
        a.add_(buf[:, :, g - 1:g + L + 1], alpha=2)
        s = a[:, :, :-2] + a[:, :, 2:]
        return s.add_(a[:, :, 1:-1], alpha=2)

    return e, L, g, framed, box121


def road_impute(x: Tensor, removed: Tensor, *, tol: float = 1e-6, max_iter: int | None = None,
                check_every: int = 8) -> Tensor:
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
    check_every : iterations between convergence checks (each check is one host sync).

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
    if max_iter is None:
        max_iter = 4 * (h + w) + 64
    removed = removed.bool()
    e, L, g, framed, box121 = _road_ops(n, h, w, dev, dt)
    _, m = framed(removed.to(dt))  # (N, 1|C, L) 0/1, zero on the padding
    ob, oi = framed(torch.ones(1, 1, h, w, device=dev, dtype=dt))
    d = (box121(ob) - 4 * oi) / 12  # (1, 1, L) D: neighbour weight sums (1 inside, less at borders)
    c1 = d + 1 / 3  # A p = c1 p − (m/12) box121(p) for p supported on the removed pixels
    m12 = m / -12
    xb, xi = framed(x)
    xi.mul_(1 - m)  # kept pixels only
    b = box121(xb).sub_(xi, alpha=4).mul_(m / 12)  # (N, C, L) Σ_kept w x on the removed pixels
    pb = torch.zeros(n, c, L + 2 * g, device=dev, dtype=dt)  # search direction, zero-padded
    p = pb[:, :, g:g + L]

    def apply_a(v: Tensor) -> Tensor:  # A v, with v = p (lives in pb)
        return box121(pb).mul_(m12).addcmul_(c1, v)

    def dot(a: Tensor, bb: Tensor) -> Tensor:
        return torch.linalg.vecdot(a, bb).unsqueeze(-1)  # (N, C, 1)

    def sq(a: Tensor) -> Tensor:  # ‖a‖², one pass without a temporary: ~2× faster than vecdot(a, a)
        return torch.linalg.vector_norm(a, dim=-1, keepdim=True).square_()

    tiny = torch.finfo(dt).tiny
    v = b / d  # one Jacobi step as the start
    p.copy_(v)
    r = b - apply_a(p)
    p.copy_(r)
    rr = sq(r)
    bb = sq(b).clamp_min(tiny)
    tol2 = tol * tol
    for it in range(max_iter):
        if it % check_every == 0 and bool((rr <= tol2 * bb).all()):
            break
        ap = apply_a(p)
        alpha = rr / dot(p, ap).clamp_min(tiny)
        v.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        rr_new = sq(r)
        torch.addcmul(r, rr_new / rr.clamp_min(tiny), p, out=p)  # p ← r + β p
        rr = rr_new
    out = v.view(n, c, h, e)[:, :, :, :w]
    return torch.where(removed, out, x)


class Road(Perturbation):
    """ROAD noisy linear imputation (Rong et al., ICML 2022).

    Removed pixels are imputed from their 8 neighbours (:func:`road_impute`), then Gaussian
    noise of σ = ``noise`` in [0, 1]-scaled intensity is added (σ·(hi − lo)/std in model space).
    The imputation depends on which pixels are removed, so it is solved for every step; the
    noise is drawn once per repeat (B, C, H, W) and reused, as for the other perturbations.
    Works for any number of channels (RGB included).
    """

    name = "road"
    random = True

    def __init__(self, noise: float = 0.01, tol: float = 1e-6, max_iter: int | None = None) -> None:
        self.noise = float(noise)
        self.tol = float(tol)
        self.max_iter = max_iter

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return eps * (self.noise * space.unit_scale())

    def apply(self, x: Tensor, mask: Tensor, state: Tensor, out: Tensor | None = None) -> Tensor:
        shape = torch.broadcast_shapes(x.shape, mask.shape, state.shape)
        c, h, w = shape[-3:]
        x4 = x.expand(shape).reshape(-1, c, h, w)
        m4 = mask.expand(*shape[:-3], 1, h, w).reshape(-1, 1, h, w).to(x.dtype)
        y = road_impute(x4, m4 > 0.5, tol=self.tol, max_iter=self.max_iter)
        y = y + state.expand(shape).reshape(-1, c, h, w) * m4
        y = y.view(shape)
        if out is None:
            return y
        return out.copy_(y)

