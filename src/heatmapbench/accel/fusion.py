"""Inference-graph fusion: the same function with fewer memory passes, for forwards and gradients.

An eval-mode BatchNorm after a convolution is an affine map per output channel, so it can be
folded into the convolution's weight and bias; a symmetric zero padding in front of a convolution
(TensorFlow-style "same" convolutions, e.g. EfficientNet-Lite's ``Conv2dStaticSamePadding``) can
be folded into the convolution's own padding. Each removed BatchNorm or padding is a full pass
over an activation tensor in the forward and another in the backward (``benches/bench_runtime.py``
part (f) measures what that saves).

:func:`fused` traces the model with :mod:`torch.fx` (standard ``torch.nn`` modules are leaves,
everything else is traced through, so a convolution subclass shows its padding and its
``F.conv2d`` call) and rewrites exactly these patterns:

==========================================================  =====================================
pattern (nodes of the traced graph)                          rewritten as
==========================================================  =====================================
``nn.ConvNd`` (exact class, zero padding mode) or            :class:`FusedConv`: the convolution
``F.convNd(x, <parameter>, <parameter or None>, ...)``,      with ``W' = W s``, ``b' = (b - m) s +
whose only consumer is an eval ``nn.BatchNormNd``            beta``, ``s = gamma / sqrt(v + eps)``
(exact class, running statistics)
a zero pad (``nn.ZeroPadNd``, ``nn.ConstantPadNd`` with 0,   the convolution's own padding plus the
``F.pad(mode="constant", value=0)``), the same on both       pad's
sides of every spatial dimension, feeding only the conv
==========================================================  =====================================

The result computes the same function up to float reassociation (``tests/unit/accel/test_fusion.py`` proves it
in float64 against the model, which runs its BatchNorms and pads itself). Folded weights are recomputed
whenever a source parameter or statistic changes (in place, e.g. by an optimizer step, or by the
channels_last swap of :func:`heatmapbench.accel.layout.channels_last`) and follow the source weight's
memory layout. The user's model is never modified. The trace, the per-model cache and the refolding
are :mod:`heatmapbench.fxgraph`'s, shared with LRP's canonization.

Fusion is a speed-up only, never a change of numbers: a model that cannot be traced, that has
module hooks (the fused graph would bypass them) or that is in training mode is used as it is,
and every new graph is checked once against the model on an example input (a mismatch beyond
float reassociation warns and uses the model). ``with fusion(False):`` switches it off
(:attr:`~heatmapbench.evaluation.settings.EvaluationSettings.fuse` does so for an evaluation).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn

from heatmapbench.fxgraph import (
    CONV_MODULES, GraphCache, Refolding, any_hooks, conv_call, fold_batch_norm, foldable_batch_norm, graph_module,
    symmetric_zero_pad, trace,
)

__all__ = ["FusedConv", "FusedGraph", "fused", "fusion", "fusion_enabled"]

log = logging.getLogger(__name__)

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("heatmapbench_fusion", default=True)

_BATCH_NORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}  # spatial dims of the conv it follows
_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)  # the ZeroPadNd are subclasses


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Switch :func:`fused` on or off inside the block (it is on by default)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def fusion_enabled() -> bool:
    """Whether :func:`fused` rewrites models here (see :func:`fusion`)."""
    return _ENABLED.get()


class FusedConv(Refolding):
    """A convolution with a BatchNorm folded in and/or a zero padding absorbed (see the module doc).

    Holds the source parameters and the BatchNorm by reference (not registered: they stay the
    user's) and recomputes the folded weight and bias, in float64 and then the weight's dtype,
    when any source tensor changes (:class:`heatmapbench.fxgraph.Refolding`).
    """

    def __init__(self, fn: Any, weight: Tensor, bias: Tensor | None, batch_norm: nn.Module | None,
                 stride: Any, padding: Any, dilation: Any, groups: int, label: str) -> None:
        super().__init__()
        self.fn = fn
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.label = label
        self._sources = (weight, bias, batch_norm)  # a tuple: nothing of the user's is registered here
        self._folded: tuple[Tensor, Tensor | None] | None = None
        self.training = False

    def fold_sources(self) -> tuple[Tensor | None, ...]:
        weight, bias, bn = self._sources
        return (weight, bias) if bn is None else (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def refold(self) -> None:
        weight, bias, bn = self._sources
        # plain tensors even under inference mode: an explainer's backward saves them
        with torch.inference_mode(False), torch.no_grad():
            if bn is None:
                new_weight, new_bias = weight.detach(), None if bias is None else bias.detach()
            else:
                w64, b64 = fold_batch_norm(weight, bias, bn, dtype=torch.float64)
                new_weight, new_bias = w64.to(weight.dtype), b64.to(weight.dtype)
                if weight.dim() == 4 and weight.stride() == _nhwc_strides(weight):
                    from heatmapbench.accel.layout import _nhwc  # channels_last source: the same layout

                    new_weight = _nhwc(new_weight)
        self._folded = (new_weight, new_bias)

    def folded(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the convolution runs with, refolded if a source changed (its version
        counter, address, strides or dtype; :func:`fused` also marks every graph it hands out stale)."""
        self.refresh()
        return self._folded

    def forward(self, x: Tensor) -> Tensor:
        bn = self._sources[2]
        if bn is not None and bn.training:
            raise RuntimeError(f"{self.label}: the BatchNorm folded here is in training mode; fused graphs are "
                               "for eval-mode models (call model.eval()).")
        weight, bias = self.folded()
        return self.fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.label}, padding={self.padding}"


def _nhwc_strides(t: Tensor) -> tuple[int, ...]:
    _, c, h, w = t.shape
    return (h * w * c, 1, w * c, c)


# --------------------------------------------------------------------------------------------
# building the fused graph

_CACHE = GraphCache()
_UNBUILT = object()


def fused(model: nn.Module, example: Tensor | None = None) -> nn.Module:
    """``model`` with BatchNorm and zero padding folded into its convolutions, or ``model`` itself.

    ``model`` itself is returned when fusion is off (:func:`fusion`), when the model is in
    training mode, has hooks on any module, cannot be traced by :mod:`torch.fx`, has nothing to
    fold, or when the new graph disagrees with the model on ``example`` (one input, checked once
    per new graph; a warning says so). The graph is cached per model and rebuilt when a module or
    tensor is replaced; folded weights follow in-place updates
    (:class:`heatmapbench.fxgraph.GraphCache`). Building it traces the forward (its Python runs
    once on proxies), and only for models with a convolution and a BatchNorm or padding module.
    """
    if not _ENABLED.get() or model.training or isinstance(model, FusedGraph):
        return model
    if any_hooks(model):
        return model
    graph = _CACHE.get(model, default=_UNBUILT)
    if graph is _UNBUILT:
        graph = _CACHE.put(model, _build(model))
    if graph is not None and example is not None and not graph.checked:
        agrees = _agrees(model, graph, example)
        graph.checked = True
        if not agrees:
            graph = _CACHE.put(model, None)
    return model if graph is None else graph


class FusedGraph(fx.GraphModule):
    """The traced, fused graph of a model (see :func:`fused`)."""

    #: whether the graph was checked against the model on an example input
    checked: bool = False


def _agrees(model: nn.Module, graph: nn.Module, example: Tensor) -> bool:
    with torch.inference_mode(), torch.autocast(example.device.type, enabled=False):
        want, got = model(example[:1]), graph(example[:1])
    if not isinstance(want, Tensor) or not isinstance(got, Tensor) or want.shape != got.shape:
        return False
    # float reassociation, not a different function; half-precision models round far more
    rel = {torch.float64: 1e-9, torch.float32: 1e-4}.get(want.dtype, 2e-2)
    want, got = want.double(), got.double()
    finite = want.isfinite()
    if not bool(finite.any()):  # nothing to compare: the model's own fault, named as such
        warnings.warn(f"heatmapbench: {type(model).__name__} outputs NaN or inf on an example input (its own "
                      "outputs, unfused), so its fused graph cannot be checked against it; using the model "
                      "unfused. Look at the model (weights, input range), not at fusion.", RuntimeWarning, stacklevel=3)
        return False
    # the same function is NaN (or the same inf) where the model is; compared where the model is finite
    same_non_finite = all(torch.equal(f(want), f(got)) for f in (torch.isnan, torch.isposinf, torch.isneginf))
    if not same_non_finite:
        warnings.warn(f"heatmapbench: the fused graph of {type(model).__name__} is NaN or inf where the model is "
                      "not (or the reverse) on an example input; using the model unfused. Please report this model.",
                      RuntimeWarning, stacklevel=3)
        return False
    tol = rel * (float(want[finite].abs().max()) + 0.1)
    err = float((want - got)[finite].abs().max())
    if not err <= tol:
        warnings.warn(f"heatmapbench: the fused graph of {type(model).__name__} differs from the model by {err:.3g} "
                      f"(> {tol:.3g}) on an example input; using the model unfused. Please report this model.",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _build(model: nn.Module) -> FusedGraph | None:
    kinds = {type(m) for m in model.modules()}
    if not (kinds & set(_BATCH_NORMS) or any(issubclass(k, _PAD_MODULES) for k in kinds)) \
            or not any(issubclass(k, tuple(CONV_MODULES)) for k in kinds):
        return None  # nothing a trace could fold (and tracing runs the forward's Python once)
    try:
        # standard torch.nn modules are leaves; a convolution subclass is traced through, so that
        # its padding and its F.convNd call show
        traced = trace(model, bind_defaults=False)
    except Exception as err:  # noqa: BLE001 - an untraceable model is simply used as it is
        log.debug("fusion skipped for %s: not traceable (%s)", type(model).__name__, err)
        return None
    graph = traced.graph
    modules = dict(traced.named_modules())
    count = 0
    for node in list(graph.nodes):
        conv = conv_call(node, modules, traced)
        if conv is None:
            continue
        fn, weight, bias, stride, padding, dilation, groups, source, dims, label = conv
        erase = []
        users = list(node.users)
        bn = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if not (type(bn) in _BATCH_NORMS and _BATCH_NORMS[type(bn)] == dims and foldable_batch_norm(bn)
                and not users[0].kwargs and len(users[0].args) == 1):
            bn = None
        pad = symmetric_zero_pad(source, modules, dims)
        if pad is not None and isinstance(padding, tuple) and len(source.users) == 1:
            padding = tuple(p + q for p, q in zip(padding, pad))
            erase.append(source)
            source = source.args[0]
        elif bn is None:
            continue  # nothing to fold
        name = f"fused_{count}"
        count += 1
        traced.add_submodule(name, FusedConv(fn, weight, bias, bn, stride, padding, dilation, groups,
                                             label=f"{label}" + (f" + {users[0].target}" if bn is not None else "")))
        last = users[0] if bn is not None else node
        with graph.inserting_after(last):
            new = graph.call_module(name, (source,))
        last.replace_all_uses_with(new)
        for old in ([last, node] if bn is not None else [node]) + erase:
            graph.erase_node(old)
    if not count:
        return None
    return graph_module(FusedGraph, traced, f"Fused{type(model).__name__}")
