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

from heatmapbench.fxgraph import CONV_MODULES, Refolding, conv_subclass, fold_batch_norm, hooked, symmetric_zero_pad

__all__ = ["BatchNormAffine", "FoldedLinear", "Reduce", "fold", "pass_relevance", "plain_conv_twin", "stack_terms"]


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


class FoldedLinear(Refolding):
    """Base of the folded conv/linear + BatchNorm classes (see :func:`fold`): the user's layer and
    BatchNorm are its fold sources, its ``weight`` and ``bias`` Parameters the folded affine map."""

    def fold_sources(self) -> tuple[torch.Tensor | None, ...]:
        linear, bn = self._linear, self._batch_norm
        return (linear.weight, linear.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def refold(self) -> None:
        """Recompute the folded weight and bias from the current conv and BatchNorm parameters."""
        linear, bn = self._linear, self._batch_norm
        with torch.no_grad():
            # y = (z - mean) / sqrt(var + eps) * gamma + beta, folded into z = W x + b
            weight, bias = fold_batch_norm(linear.weight, linear.bias, bn,
                                           out_dim=1 if isinstance(linear, ConvolutionTranspose) else 0)
            self._folded[0].data = weight
            self._folded[1].data = bias


def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
    self.refresh()
    weight, bias = self._parameters["weight"], self._parameters["bias"]
    if (weight is self._folded[0] and bias is self._folded[1]) or (
        torch.equal(weight, self._folded[0]) and bias is not None and torch.equal(bias, self._folded[1])
    ):  # unmodified (Zennit's epsilon rule re-wraps the same values): the user's exact computation
        return self._batch_norm(self._linear(x))
    # a rule swapped in modified weights (Zennit's ParamMod): compute with them, as the layer would
    return self._linear_forward(x)


def fold(linear: nn.Module, batch_norm: nn.Module) -> nn.Module:
    """A module of ``linear``'s class whose ``weight``/``bias`` are the BatchNorm-folded ones.

    Its forward is ``batch_norm(linear(x))`` (bit-identical to the model) while its parameters are the
    user's; when a rule replaces ``weight``/``bias`` (Zennit's ``ParamMod``), the layer's own forward
    runs with the replaced, folded parameters, so every rule sees the exact folded affine map. Folded
    on first use, from the weights of then, and again whenever they change
    (:class:`heatmapbench.fxgraph.Refolding`).
    """
    cls = type(linear)
    folded_cls = type(f"Folded{cls.__name__}", (cls, FoldedLinear), {
        "forward": _folded_forward, "_linear_forward": cls.forward, "__module__": __name__,
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
    module.training = False  # not .eval(): that would recurse into the user's shared children
    return module


def plain_conv_twin(module: nn.Module) -> nn.Module | None:
    """A plain ``nn.ConvNd`` computing what the convolution subclass ``module`` computes, or None.

    Only for a subclass whose forward, traced, is exactly a symmetric zero pad (optional) and one
    ``F.convNd`` of its own ``weight`` and ``bias`` (e.g. EfficientNet-Lite's
    ``Conv2dStaticSamePadding``; :func:`heatmapbench.fxgraph.conv_subclass`): the twin holds the same
    ``Parameter`` objects with the pad folded into its padding, so a rule that swaps its weight (LRP)
    skips the pad pass and its backward. None for anything else, and for a module with hooks (the
    twin would bypass them).
    """
    if any(hooked(m) for m in module.modules()):
        return None
    parts = conv_subclass(module)
    if parts is None:
        return None
    (_, _, _, stride, padding, dilation, groups, _, dims, _), pad_node, modules = parts
    if pad_node is not None:
        pad = symmetric_zero_pad(pad_node, modules, dims)
        if pad is None:
            return None
        padding = tuple(p + q for p, q in zip(padding, pad))
    base = next(cls for cls in type(module).__mro__ if cls in CONV_MODULES)
    twin = base.__new__(base)
    nn.Module.__init__(twin)
    for key in ("in_channels", "out_channels", "kernel_size", "transposed", "output_padding"):
        setattr(twin, key, getattr(module, key))
    twin.stride, twin.padding, twin.dilation, twin.groups = tuple(stride), tuple(padding), tuple(dilation), groups
    twin.padding_mode = "zeros"
    twin._reversed_padding_repeated_twice = [p for p in reversed(twin.padding) for _ in range(2)]
    twin._parameters["weight"] = module.weight
    twin._parameters["bias"] = module.bias
    twin.training = module.training
    return twin
