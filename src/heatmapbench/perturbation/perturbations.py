"""Perturbations g(x, r): what a removed region is replaced with (Samek et al., Sec. 3 and appendix).

Each perturbation is a small class, named in the catalogue :mod:`.presets` (``PERTURBATIONS``).
The engine calls it in two phases, so that a repeat's random draw is made once and a
perturbed pixel keeps its value across the steps:

``prepare(x, space, generator)``
    once per repeat, on the clean images ``x`` (B, C, H, W) in model space; returns a
    per-repeat *state*, for most perturbations the fully perturbed image (B, C, H, W).
``apply(x, mask, state, out)``
    for a chunk of (step, image) pairs: ``x`` (..., C, H, W), ``mask`` (..., 1, H, W) in x's
    dtype, exactly 1 where the pixel has been removed and 0 elsewhere, ``state`` broadcastable
    to ``x``. Writes into ``out``.
``walk(x, state, pixel_step, steps)`` (optional)
    once per repeat, after ``prepare``: for perturbations whose fill depends on which pixels
    are removed (ROAD), an object whose ``fill(k0, k1, b0, b1, mask, out)`` builds the inputs
    of steps k0..k1-1 and images b0..b1-1 itself, knowing the whole sequence of steps. The
    default returns None and the engine calls ``apply``.

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
        Its name in the catalogue (:data:`.presets.PERTURBATIONS`).
    """

    name = "base"
    #: Image-steps the engine builds at once (None: one forward batch). A perturbation whose
    #: inputs cost more to build than to score (ROAD's solves) asks for more; the engine then
    #: builds that many and runs the forwards over them in its own batches.
    fill_chunk: int | None = None

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        """Return the per-repeat state (here: the fully perturbed image, (B, C, H, W))."""
        raise NotImplementedError

    def walk(self, x: Tensor, state: Tensor, pixel_step: Tensor, steps: int):
        """Optional stateful filler for one repeat (see the module doc); None: use :meth:`apply`."""
        return None

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

    def prepare(self, x: Tensor, space: PixelSpace, generator: torch.Generator) -> Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return space.unit_to_model(u)


class Mean(Perturbation):
    """Per-channel dataset mean.

    ``pixel_mean`` (pixel space, one value per channel) if given; otherwise the data's ``mean``
    passed to the engine, which is 0 in model space; when neither is known, the per-channel
    mean of the batch being evaluated (model space).

    Parameters
    ----------
    pixel_mean
        One value per channel (or one for all), in pixel space; None: the data's mean.
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
    """A constant ``value`` in [0, 1]-scaled intensity (0 = the bottom of ``value_range``).

    Parameters
    ----------
    value
        The fill in [0, 1]-scaled intensity: 0 is the bottom of the data's ``value_range``, 1 its top.
    """

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

    Parameters
    ----------
    sigma
        Standard deviation of the Gaussian, in pixels (paper appendix: 3).
    truncate
        Radius of the kernel in units of sigma, as ``scipy.ndimage.gaussian_filter``.
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


def __getattr__(name: str):
    """``get_perturbation``'s old home: it moved to :mod:`heatmapbench.perturbation` beside the catalogue."""
    if name == "get_perturbation":
        import warnings

        from heatmapbench import perturbation

        warnings.warn("heatmapbench.perturbation.perturbations.get_perturbation is deprecated and goes in the next "
                      "release; import from heatmapbench.perturbation instead", DeprecationWarning, stacklevel=2)
        return perturbation.get_perturbation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
