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
memory layout. The user's model is never modified.

Fusion is a speed-up only, never a change of numbers: a model that cannot be traced, that has
module hooks (the fused graph would bypass them) or that is in training mode is used as it is,
and every new graph is checked once against the model on an example input (a mismatch beyond
float reassociation warns and uses the model). ``with fusion(False):`` switches it off
(``evaluation.fuse=false`` in the configs).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import operator
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["FusedConv", "fold_batch_norm", "fused", "fusion", "fusion_enabled", "get_attr", "module_fingerprint",
           "plain_conv_twin"]

log = logging.getLogger(__name__)

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("heatmapbench_fusion", default=True)

_CONV_MODULES = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
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


class FusedConv(nn.Module):
    """A convolution with a BatchNorm folded in and/or a zero padding absorbed (see the module doc).

    Holds the source parameters and the BatchNorm by reference (not registered: they stay the
    user's) and recomputes the folded weight and bias, in float64 and then the weight's dtype,
    when any source tensor changes.
    """

    def __init__(self, fn: Any, weight: Tensor, bias: Tensor | None, batch_norm: nn.Module | None,
                 stride: Any, padding: Any, dilation: Any, groups: int, label: str) -> None:
        super().__init__()
        self.fn = fn
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.label = label
        self._sources = (weight, bias, batch_norm)  # a tuple: nothing of the user's is registered here
        self._state: tuple | None = None
        self._folded: tuple[Tensor, Tensor | None] | None = None
        self.training = False

    def _source_state(self) -> tuple:
        weight, bias, bn = self._sources
        tensors = [weight, bias]
        if bn is not None:
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return tuple(None if t is None else (t._version, t.data_ptr(), t.stride(), t.dtype) for t in tensors)

    def folded(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the convolution runs with, refolded if a source changed (its version
        counter, address, strides or dtype; :func:`fused` also marks every graph it hands out stale)."""
        state = self._source_state()
        if state != self._state:
            weight, bias, bn = self._sources
            # plain tensors even under inference mode: an explainer's backward saves them
            with torch.inference_mode(False), torch.no_grad():
                if bn is None:
                    new_weight, new_bias = weight.detach(), None if bias is None else bias.detach()
                else:
                    f64 = [None if t is None else t.detach().double()
                           for t in (weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)]
                    w64, b64 = fold_batch_norm(*f64, bn.eps)
                    new_weight, new_bias = w64.to(weight.dtype), b64.to(weight.dtype)
                    if weight.dim() == 4 and weight.stride() == _nhwc_strides(weight):
                        from heatmapbench.accel.layout import _nhwc  # channels_last source: the same layout

                        new_weight = _nhwc(new_weight)
            self._folded, self._state = (new_weight, new_bias), state
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


def fold_batch_norm(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, gamma: Tensor | None,
                    beta: Tensor | None, eps: float, out_dim: int = 0) -> tuple[Tensor, Tensor]:
    """``bn(conv(x))`` as one affine map: ``(W s, (b - mean) s + beta)`` with ``s = gamma / sqrt(var + eps)``
    along the output dimension ``out_dim`` of ``weight`` (1 for transposed convolutions); ``gamma``,
    ``beta`` and ``b`` None when the BatchNorm is not affine or the layer has no bias. Computed in the
    tensors' dtype."""
    scale = gamma / (var + eps).sqrt() if gamma is not None else 1 / (var + eps).sqrt()
    index = [None] * weight.ndim
    index[out_dim] = slice(None)
    bias = bias if bias is not None else torch.zeros_like(mean)
    shift = beta if beta is not None else 0
    return weight * scale[tuple(index)], (bias - mean) * scale + shift


def _nhwc_strides(t: Tensor) -> tuple[int, ...]:
    _, c, h, w = t.shape
    return (h * w * c, 1, w * c, c)


# --------------------------------------------------------------------------------------------
# building the fused graph

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _any_hooks(model: nn.Module) -> bool:
    """Whether a forward or backward hook, global or on any module of ``model``, is registered."""
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks) \
        or any(_hooked(m) for m in model.modules())


def module_fingerprint(model: nn.Module) -> tuple:
    """Identity of every module, parameter and buffer: a replaced one invalidates a cached graph."""
    return (
        # a module's class or an instance-level forward replaced after tracing changes the graph
        tuple((name, id(m), type(m), id(vars(m).get("forward"))) for name, m in model.named_modules()),
        tuple((name, id(t)) for name, t in model.named_parameters()),
        tuple((name, id(t)) for name, t in model.named_buffers()),
    )


def fused(model: nn.Module, example: Tensor | None = None) -> nn.Module:
    """``model`` with BatchNorm and zero padding folded into its convolutions, or ``model`` itself.

    ``model`` itself is returned when fusion is off (:func:`fusion`), when the model is in
    training mode, has hooks on any module, cannot be traced by :mod:`torch.fx`, has nothing to
    fold, or when the new graph disagrees with the model on ``example`` (one input, checked once
    per new graph; a warning says so). The graph is cached per model and rebuilt when a module or
    tensor is replaced; folded weights follow in-place updates. Building it traces the forward
    (its Python runs once on proxies), and only for models with a convolution and a BatchNorm or
    padding module.
    """
    if not _ENABLED.get() or model.training or isinstance(model, FusedGraph):
        return model
    if _any_hooks(model):
        return model
    fingerprint = module_fingerprint(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == fingerprint:
        graph, checked = cached[1], cached[2]
        if graph is not None:
            _stale(graph)
        if graph is None or checked or example is None:
            return model if graph is None else graph
    else:
        graph, checked = _build(model), False
    if graph is not None and example is not None:
        checked = True
        if not _agrees(model, graph, example):
            graph = None
    _CACHE[model] = (fingerprint, graph, checked)
    return model if graph is None else graph


class FusedGraph(fx.GraphModule):
    """The traced, fused graph of a model (see :func:`fused`)."""


def _stale(graph: nn.Module) -> None:
    """Refold every convolution of ``graph`` at its next call.

    Within one call of an explainer or the engine the version and address check of
    :class:`FusedConv` suffices; between calls a weight may have changed through ``.data``
    (old-style optimizers, EMA, hand-loaded weights), which no version counter records.
    """
    for module in graph.modules():
        if isinstance(module, FusedConv):
            module._state = None


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
    if "forward" in vars(model):
        return None  # fx traces the class's forward, not the instance's
    kinds = {type(m) for m in model.modules()}
    if not (kinds & set(_BATCH_NORMS) or any(issubclass(k, _PAD_MODULES) for k in kinds)) \
            or not any(issubclass(k, tuple(_CONV_MODULES)) for k in kinds):
        return None  # nothing a trace could fold (and tracing runs the forward's Python once)
    tracer = fx.Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - an untraceable model is simply used as it is
        log.debug("fusion skipped for %s: not traceable (%s)", type(model).__name__, err)
        return None
    root = tracer.root
    modules = dict(root.named_modules())
    new_modules: dict[str, nn.Module] = {}
    count = 0
    for node in list(graph.nodes):
        conv = _conv_call(node, modules, root)
        if conv is None:
            continue
        fn, weight, bias, stride, padding, dilation, groups, source, dims, label = conv
        erase = []
        users = list(node.users)
        bn = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if not (type(bn) in _BATCH_NORMS and _BATCH_NORMS[type(bn)] == dims and not bn.training
                and bn.track_running_stats and bn.running_var is not None and not users[0].kwargs
                and len(users[0].args) == 1):
            bn = None
        pad = _zero_pad(source, modules, dims)
        if pad is not None and isinstance(padding, tuple) and len(source.users) == 1:
            padding = tuple(p + q for p, q in zip(padding, pad))
            erase.append(source)
            source = source.args[0]
        elif bn is None:
            continue  # nothing to fold
        name = f"fused_{count}"
        count += 1
        new_modules[name] = FusedConv(fn, weight, bias, bn, stride, padding, dilation, groups,
                                      label=f"{label}" + (f" + {users[0].target}" if bn is not None else ""))
        last = users[0] if bn is not None else node
        with graph.inserting_after(last):
            new = graph.call_module(name, (source,))
        last.replace_all_uses_with(new)
        for old in ([last, node] if bn is not None else [node]) + erase:
            graph.erase_node(old)
    if not count:
        return None
    # a dict root: the graph references the user's modules and tensors, and the user's model
    # object gets nothing added
    refs: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            refs[n.target] = new_modules[n.target] if n.target in new_modules else modules[n.target]
        elif n.op == "get_attr":
            refs[n.target] = get_attr(root, n.target)
    result = FusedGraph(refs, graph, f"Fused{type(model).__name__}")
    result.graph.eliminate_dead_code()  # the folded convolutions' weight lookups
    result.graph.lint()
    result.recompile()
    result.delete_all_unused_submodules()
    result.training = False  # not .eval(): the user's modules keep their modes
    return result


def _conv_call(node: fx.Node, modules: dict[str, nn.Module], root: nn.Module) -> tuple | None:
    """``(fn, weight, bias, stride, padding, dilation, groups, input, dims, label)`` of a plain convolution."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) not in _CONV_MODULES or m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
            return None
        padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        return (_CONV_MODULES[type(m)], m.weight, m.bias, tuple(m.stride), padding, tuple(m.dilation),
                m.groups, node.args[0], len(m.kernel_size), str(node.target))
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    if set(values) - set(names) or "weight" not in values or not isinstance(values["input"], fx.Node):
        return None
    dims = _CONV_FUNCTIONS[node.target]
    params = {}
    for key in ("weight", "bias"):
        v = values.get(key)
        if v is None and key == "bias":
            params[key] = None
        elif isinstance(v, fx.Node) and v.op == "get_attr":
            params[key] = get_attr(root, v.target)
        else:
            return None  # a computed weight (e.g. standardized): not a plain convolution
    for key in ("stride", "padding", "dilation", "groups"):
        if isinstance(values.get(key), fx.Node) or any(isinstance(a, fx.Node) for a in _flat(values.get(key))):
            return None

    def tup(v: Any, default: int) -> Any:
        v = default if v is None else v
        return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

    return (node.target, params["weight"], params["bias"], tup(values.get("stride"), 1),
            tup(values.get("padding"), 0), tup(values.get("dilation"), 1), values.get("groups", 1),
            values["input"], dims, str(values["weight"].target).removesuffix(".weight"))


def _flat(v: Any) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _zero_pad(node: Any, modules: dict[str, nn.Module], dims: int) -> tuple[int, ...] | None:
    """Per spatial dimension (in the conv's order), the symmetric zero padding ``node`` applies."""
    pads = zero_pad_amounts(node, modules)
    if pads is None or len(pads) != 2 * dims:
        return None
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]  # last dim first
    if any(a != b for a, b in pairs):
        return None
    return tuple(a for a, _ in reversed(pairs))


def zero_pad_amounts(node: Any, modules: dict[str, nn.Module]) -> tuple[int, ...] | None:
    """The amounts of a zero padding node in ``F.pad`` order (last dimension first, any asymmetry), or None
    for anything else (another fill or mode, negative or computed amounts)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and isinstance(modules.get(node.target), _PAD_MODULES) and len(node.args) == 1:
        m = modules[node.target]
        if type(m).__module__ != "torch.nn.modules.padding" or m.value != 0:
            return None
        pads = tuple(m.padding)
    elif node.op == "call_function" and node.target is F.pad:
        args = dict(zip(("input", "pad", "mode", "value"), node.args))
        args.update(node.kwargs)
        if args.get("mode", "constant") != "constant" or args.get("value") not in (None, 0, 0.0):
            return None
        pads = args.get("pad")
        if not isinstance(pads, (tuple, list)) or not all(isinstance(p, int) for p in pads):
            return None
        pads = tuple(pads)
    else:
        return None
    return None if any(p < 0 for p in pads) else pads


def get_attr(module: nn.Module, target: str) -> Any:
    """``module``'s attribute at the dotted path ``target`` (an fx ``get_attr`` node's target)."""
    return operator.attrgetter(target)(module)


def plain_conv_twin(module: nn.Module) -> nn.Module | None:
    """A plain ``nn.ConvNd`` computing what the convolution subclass ``module`` computes, or None.

    Only for a subclass whose forward, traced, is exactly a symmetric zero pad (optional) and one
    ``F.convNd`` of its own ``weight`` and ``bias`` (e.g. EfficientNet-Lite's
    ``Conv2dStaticSamePadding``): the twin holds the same ``Parameter`` objects with the pad folded
    into its padding, so a rule that swaps its weight (LRP) skips the pad pass and its backward.
    None for anything else, and for a module with hooks (the twin would bypass them).
    """
    base = next((cls for cls in type(module).__mro__ if cls in _CONV_MODULES), None)
    if base is None or type(module) is base or "forward" in vars(module):
        return None
    if any(_hooked(m) for m in module.modules()):
        return None
    try:
        graph = fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - not traceable: keep the module
        return None
    modules = dict(module.named_modules())
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if not nodes or len(outputs) != 1 or outputs[0].args[0] is not nodes[-1]:
        return None
    conv = _conv_call(nodes[-1], modules, module)
    if conv is None or conv[0] is not _CONV_MODULES[base] or nodes[-1].op != "call_function":
        return None
    fn, weight, bias, stride, padding, dilation, groups, source, dims, _ = conv
    if weight is not module.weight or bias is not module.bias or isinstance(padding, str):
        return None
    if len(nodes) == 2:
        pad = _zero_pad(source, modules, dims)
        if pad is None or source is not nodes[0] or source.args[0].op != "placeholder":
            return None
        padding = tuple(p + q for p, q in zip(padding, pad))
    elif len(nodes) != 1 or source.op != "placeholder":
        return None
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
