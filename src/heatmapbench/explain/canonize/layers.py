"""The modules and functions a canonical graph calls in place of the model's operations.

Each keeps the forward value bit-identical and carries the LRP rule of the operation it stands for
(see the table in :mod:`heatmapbench.explain.canonize`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from zennit.layer import Sum
from zennit.types import ConvolutionTranspose

from heatmapbench.accel.fusion import fold_batch_norm

__all__ = ["BatchNormAffine", "FoldedLinear", "Reduce", "fold", "pass_relevance", "stack_terms"]


class _PassRelevance(torch.autograd.Function):
    """Forward: the exact value ``y``; backward: the signal arriving at ``y`` goes to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def pass_relevance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (computed from ``x`` elementwise, e.g. ``c * x``) with relevance passed to ``x`` unchanged.

    For ``y = c * x`` elementwise the z-rule gives ``R_x = c x / (c x) R_y = R_y``.
    """
    if y.shape != x.shape:
        raise ValueError(f"pass_relevance needs y of x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    return _PassRelevance.apply(x, y)


def stack_terms(*terms: Any) -> torch.Tensor:
    """Stack the terms of a sum along a new last dim (broadcast; scalars become tensors): ``(..., n)``."""
    ref = next(t for t in terms if isinstance(t, torch.Tensor))
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
               for t in terms]
    return torch.stack(torch.broadcast_tensors(*tensors), dim=-1)


class Reduce(Sum):
    """A sum-like linear reduction (mean / sum over dims, average pooling) of its one input.

    A :class:`zennit.layer.Sum` subclass, so the proportional rule (``Norm``) and the fast engine apply:
    ``R_i = x_i / sum_j x_j * R`` for every output, which is the z-rule of any such map.
    """

    def __init__(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, label: str = "") -> None:
        super().__init__()
        self.fn = fn
        self.args = args
        self.kwargs = dict(kwargs or {})
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return self.label


class BatchNormAffine(nn.Module):
    """A BatchNorm (eval) that no conv/linear feeds, as its own elementwise affine layer.

    Forward is the user's BatchNorm itself (held by reference, not registered, so its hooks and modes
    stay the user's). Its LRP rule is the epsilon rule of ``y = s x + t``.
    """

    def __init__(self, batch_norm: nn.Module) -> None:
        super().__init__()
        self._source = (batch_norm,)  # a tuple: not registered as a submodule
        self.training = False

    @property
    def batch_norm(self) -> nn.Module:
        return self._source[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.batch_norm(x)

    def extra_repr(self) -> str:
        return repr(self.batch_norm)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


class FoldedLinear(nn.Module):
    """Marker base of the folded conv/linear + BatchNorm classes (see :func:`fold`)."""


def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
    self.refresh()
    weight, bias = self._parameters["weight"], self._parameters["bias"]
    if (weight is self._folded[0] and bias is self._folded[1]) or (
        torch.equal(weight, self._folded[0]) and bias is not None and torch.equal(bias, self._folded[1])
    ):  # unmodified (Zennit's epsilon rule re-wraps the same values): the user's exact computation
        return self._batch_norm(self._linear(x))
    # a rule swapped in modified weights (Zennit's ParamMod): compute with them, as the layer would
    return self._linear_forward(x)


def _refresh(self) -> None:
    """Recompute the folded weight and bias from the current conv and BatchNorm parameters."""
    linear, bn = self._linear, self._batch_norm
    sources = [t for t in (linear.weight, linear.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
               if t is not None]
    state = tuple((t._version, t.data_ptr(), t.dtype) for t in sources)
    if state == self._folded_state:
        return  # nothing changed since the last fold (e.g. between two calls in one epoch)
    object.__setattr__(self, "_folded_state", state)
    with torch.no_grad():
        # y = (z - mean) / sqrt(var + eps) * gamma + beta, folded into z = W x + b
        affine = (bn.weight, bn.bias) if bn.affine else (None, None)
        weight, bias = fold_batch_norm(linear.weight, linear.bias, bn.running_mean, bn.running_var, *affine, bn.eps,
                                       out_dim=1 if isinstance(linear, ConvolutionTranspose) else 0)
        self._folded[0].data = weight
        self._folded[1].data = bias


def fold(linear: nn.Module, batch_norm: nn.Module) -> nn.Module:
    """A module of ``linear``'s class whose ``weight``/``bias`` are the BatchNorm-folded ones.

    Its forward is ``batch_norm(linear(x))`` (bit-identical to the model) while its parameters are the
    user's; when a rule replaces ``weight``/``bias`` (Zennit's ``ParamMod``), the layer's own forward
    runs with the replaced, folded parameters, so every rule sees the exact folded affine map.
    """
    cls = type(linear)
    folded_cls = type(f"Folded{cls.__name__}", (cls, FoldedLinear), {
        "forward": _folded_forward, "refresh": _refresh, "_linear_forward": cls.forward,
        "__module__": __name__,
    })
    module = folded_cls.__new__(folded_cls)
    nn.Module.__init__(module)
    for key, value in vars(linear).items():
        if key not in _MODULE_INTERNALS:
            object.__setattr__(module, key, value)
    for name, child in linear.named_children():  # e.g. a padding child of a same-padding conv
        module.add_module(name, child)
    object.__setattr__(module, "_linear", linear)
    object.__setattr__(module, "_batch_norm", batch_norm)
    weight = nn.Parameter(torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device), requires_grad=False)
    bias = nn.Parameter(torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device), requires_grad=False)
    module._parameters["weight"] = weight
    module._parameters["bias"] = bias
    object.__setattr__(module, "_folded", (weight, bias))
    object.__setattr__(module, "_folded_state", None)  # folded on first use, from the weights of then
    module.training = False  # not .eval(): that would recurse into the user's shared children
    return module
