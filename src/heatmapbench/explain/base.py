"""The common interface of every heatmap method: ``explainer(model, x, target) -> (B, H, W)``.

Everything an explainer does to a model (eval mode, ``requires_grad`` of the parameters,
grad mode, inference mode, hooks, canonizers) happens inside context managers and is
undone on exit, also when an exception is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from heatmapbench.accel.fusion import fused

#: Channel pooling of a (B, C, H, W) attribution into a (B, H, W) heatmap.
#: Sensitivity and deconvolution use a norm over the colour channels (paper eq. 3, q in {2, inf});
#: LRP and other conservative methods sum over the channels (paper Sec. 2).
#: The l2 norm is written out as ``a.square().sum(1).sqrt()``: ``torch.linalg.vector_norm(a, dim=1)``
#: over three channels is a slow strided reduction on CPUs, a sizeable part of a whole gradient
#: (``benches/bench_explainers.py`` measures the methods).
POOLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda a: a.sum(dim=1),
    "l2": lambda a: a.square().sum(dim=1).sqrt(),
    "linf": lambda a: a.abs().amax(dim=1),
    "abs_sum": lambda a: a.abs().sum(dim=1),
}


def pool_channels(attribution: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``(B, C, H, W)`` over ``C`` with one of :data:`POOLINGS`."""
    return POOLINGS[pooling](attribution)


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
    return pooling


def validate_inputs(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Check ``x`` (B, C, H, W) and ``target`` (B,) before any work; return ``target`` on ``x``'s device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}.")
    if x.dim() != 4:
        raise ValueError(
            f"x must be 4-D (B, C, H, W) in model space, got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image."
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}.")
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)
    if target.dtype in (torch.bool,) or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(
            f"target must have shape (B,) = ({x.shape[0]},) with one class index per image, "
            f"got shape {tuple(target.shape)}."
        )
    return target.to(device=x.device, dtype=torch.long)


def check_output(output: torch.Tensor, target: torch.Tensor) -> None:
    """Check that the model returns (B, K) scores and that every target lies in ``[0, K)``."""
    if output.dim() != 2 or output.shape[0] != target.shape[0]:
        raise ValueError(
            f"The model must return pre-softmax scores of shape (B, K) = ({target.shape[0]}, K), "
            f"got shape {tuple(output.shape)}."
        )
    num_classes = output.shape[1]
    if bool(((target < 0) | (target >= num_classes)).any()):  # one sync per call, not in a loop
        bad = target[(target < 0) | (target >= num_classes)]
        raise ValueError(
            f"target out of range: the model has {num_classes} classes (valid indices 0..{num_classes - 1}), "
            f"got {bad.tolist()}."
        )


@contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters and autograd on; restore all on exit.

    Works inside ``torch.inference_mode()`` and ``torch.no_grad()`` (e.g. Lightning validation):
    both are switched off for the duration.
    """
    modes = [(module, module.training) for module in model.modules()]
    requires = [(param, param.requires_grad) for param in model.parameters()]
    with torch.inference_mode(False), torch.enable_grad():
        try:
            model.eval()
            for param, _ in requires:
                param.requires_grad_(False)  # only d/dx is needed: skip weight gradients
            yield model
        finally:
            for param, flag in requires:
                param.requires_grad_(flag)
            for module, flag in modes:
                module.training = flag


class Explainer:
    """Base class: ``explainer(model, x, target)`` returns a ``(B, H, W)`` float32 heatmap.

    Parameters
    ----------
    pooling
        How a ``(B, C, H, W)`` attribution is reduced over colour channels (see :data:`POOLINGS`).

    Notes
    -----
    Subclasses implement :meth:`attribute`, which runs with the model in eval mode, autograd
    on and ``x`` a fresh leaf tensor, and returns ``(B, C, H, W)`` or ``(B, H, W)``.
    """

    #: Short name used in tables and logs.
    name: ClassVar[str] = "explainer"
    #: Whether :meth:`attribute` may run on :func:`heatmapbench.accel.fusion.fused` ``(model)`` (BatchNorm and
    #: zero padding folded into the convolutions): true for methods that need the model only as a
    #: differentiable function (gradients, rectifier rules); false where rules hook its layers (LRP).
    fusable: ClassVar[bool] = False

    def __init__(self, pooling: str = "l2") -> None:
        self.pooling = _check_pooling(pooling)

    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = validate_inputs(x, target)
        with explaining(model):
            x = x.detach().clone()  # a normal tensor even when x was made under inference mode
            target = target.clone()
            net = fused(model, x[:1]) if self.fusable else model
            attribution = self.attribute(net, x, target)  # (B, C, H, W) or (B, H, W)
            if attribution.dim() == 4:
                attribution = pool_channels(attribution, self.pooling)  # (B, H, W)
        return attribution.detach().to(torch.float32)

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def backprop(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    seed_with_score: bool = False,
) -> torch.Tensor:
    """One forward and one backward pass; return the (possibly hook-modified) d f_target / d x.

    Parameters
    ----------
    seed_with_score
        Start the backward pass with ``f_target(x)`` instead of 1 at the target logit, so that
        LRP relevance at the output equals the pre-softmax score (paper Sec. 2).
    """
    x = x.requires_grad_(True)
    output = model(x)  # (B, K)
    check_output(output, target)
    seed = torch.zeros_like(output)
    rows = torch.arange(output.shape[0], device=output.device)
    seed[rows, target] = output.detach()[rows, target] if seed_with_score else 1.0
    (grad,) = torch.autograd.grad(output, x, grad_outputs=seed)
    return grad  # (B, C, H, W)
