"""torch.fx graphs of a model, shared by fusion, LRP canonization and incremental forwards: trace, cache, refold.

Three parts of the library run a model as a rewritten :mod:`torch.fx` graph:
:mod:`heatmapbench.accel.fusion` (BatchNorm and zero padding folded into the convolutions),
:mod:`heatmapbench.explain.canonize` (every value-mixing operation an explicit LRP rule) and
:mod:`heatmapbench.perturbation.incremental` (layers recomputed in windows). What they share lives
here, once:

* :func:`trace`: the trace of a model, with a clear error naming the user's line that stops it and,
  given an example input, a retry with shape-aware proxies where the forward branches on shapes;
  :class:`LayerTracer`: the leaves the LRP rules and the window arithmetic see (every
  conv/linear/BatchNorm subclass, and every :class:`Refolding` module);
* :func:`graph_module`: the rewritten graph over the user's own modules and tensors (nothing is
  added to the user's model, whose modules keep their modes);
* :class:`GraphCache`: one graph per model and key, handed out again while the model's modules,
  parameters and buffers are the same objects (:func:`module_fingerprint`), rebuilt when one is
  replaced;
* :class:`Refolding`, :func:`fold_batch_norm` and :func:`foldable_batch_norm`: weights folded from the
  user's tensors (an eval BatchNorm into the conv/linear that feeds it: the one fold of the package),
  recomputed when a source tensor changes in place, and at the next call of every graph the cache
  hands out (a change through ``.data`` bumps no version counter);
* readers of traced nodes: :func:`get_attr`, :func:`conv_call`, :func:`zero_pad_amounts`,
  :func:`symmetric_zero_pad` and :func:`conv_subclass`.
"""

from __future__ import annotations

import inspect
import operator
import traceback
import warnings
import weakref
from collections.abc import Hashable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["CONV_FUNCTIONS", "CONV_MODULES", "GraphCache", "LayerTracer", "Refolding", "TraceError", "any_hooks",
           "conv_call", "conv_subclass", "fold_batch_norm", "foldable_batch_norm", "get_attr", "graph_module",
           "hooked", "module_fingerprint", "symmetric_zero_pad", "trace", "zero_pad_amounts"]

#: the plain convolution modules and the function each one calls
CONV_MODULES = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
#: the convolution functions and their number of spatial dimensions
CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)  # the ZeroPadNd are subclasses
# the layers LRP rules attach to (zennit.types.Linear and BatchNorm, named in torch terms)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

G = TypeVar("G", bound=fx.GraphModule)


# --------------------------------------------------------------------------------------------
# the model: attributes, identity, hooks

def get_attr(module: nn.Module, target: str) -> Any:
    """``module``'s attribute at the dotted path ``target`` (an fx ``get_attr`` or ``call_module`` target)."""
    return operator.attrgetter(target)(module)


def module_fingerprint(model: nn.Module) -> tuple:
    """Identity of every module, parameter and buffer: a replaced one invalidates a cached graph."""
    return (
        # a module's class or an instance-level forward replaced after tracing changes the graph
        tuple((name, id(m), type(m), id(vars(m).get("forward"))) for name, m in model.named_modules()),
        tuple((name, id(t)) for name, t in model.named_parameters()),
        tuple((name, id(t)) for name, t in model.named_buffers()),
    )


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` itself has a forward or backward hook (a graph that replaces it would bypass them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def any_hooks(model: nn.Module) -> bool:
    """Whether a forward or backward hook, global or on any module of ``model``, is registered."""
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks) \
        or any(hooked(m) for m in model.modules())


# --------------------------------------------------------------------------------------------
# folded weights

def foldable_batch_norm(bn: nn.Module) -> bool:
    """Whether the BatchNorm ``bn`` normalises by running statistics (eval mode, statistics tracked):
    then it is an affine map per channel, which :func:`fold_batch_norm` folds into the layer feeding it."""
    return bool(not bn.training and bn.track_running_stats and bn.running_var is not None)


def fold_batch_norm(weight: Tensor, bias: Tensor | None, bn: nn.Module, out_dim: int = 0,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``bn(layer(x))`` as one affine map, for a layer computing ``W x + b``: ``(W s, (b - mean) s + beta)``
    with ``s = gamma / sqrt(var + eps)`` along the output dimension ``out_dim`` of ``weight`` (1 for
    transposed convolutions), from ``bn``'s running statistics (``gamma``, ``beta`` left out when it is
    not affine, ``b`` when the layer has no bias). Computed in ``dtype`` (default: the tensors' own)."""
    affine = (bn.weight, bn.bias) if bn.affine else (None, None)
    tensors = (weight, bias, bn.running_mean, bn.running_var, *affine)
    if dtype is not None:
        tensors = tuple(None if t is None else t.detach().to(dtype) for t in tensors)
    weight, bias, mean, var, gamma, beta = tensors
    eps = bn.eps
    scale = gamma / (var + eps).sqrt() if gamma is not None else 1 / (var + eps).sqrt()
    index = [None] * weight.ndim
    index[out_dim] = slice(None)
    bias = bias if bias is not None else torch.zeros_like(mean)
    shift = beta if beta is not None else 0
    return weight * scale[tuple(index)], (bias - mean) * scale + shift


class Refolding(nn.Module):
    """A module whose weights are folded from the user's tensors, refolded when one of them changes.

    A subclass names its source tensors (:meth:`fold_sources`) and computes the fold (:meth:`refold`);
    :meth:`refresh` refolds when a source's version counter, address, strides or dtype differ from
    the last fold's, and :meth:`mark_stale` makes the next :meth:`refresh` refold whatever happened
    (:class:`GraphCache` marks every graph it hands out again).
    """

    _fold_state: tuple | None = None  # the sources' state at the last fold; None: fold at the next call

    def fold_sources(self) -> tuple[Tensor | None, ...]:
        """The user's tensors the folded weights are computed from."""
        raise NotImplementedError

    def refold(self) -> None:
        """Recompute the folded weights from :meth:`fold_sources`."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Refold if a source tensor changed since the last fold (or :meth:`mark_stale` was called)."""
        state = tuple(None if t is None else (t._version, t.data_ptr(), t.stride(), t.dtype)
                      for t in self.fold_sources())
        if state != self._fold_state:
            self.refold()
            object.__setattr__(self, "_fold_state", state)

    def mark_stale(self) -> None:
        """Refold at the next call: a weight changed through ``.data`` (old-style optimizers, EMA,
        hand-loaded weights) bumps no version counter."""
        object.__setattr__(self, "_fold_state", None)


# --------------------------------------------------------------------------------------------
# tracing

class LayerTracer(fx.Tracer):
    """torch.nn's leaves plus every conv/linear/BatchNorm subclass (e.g. a same-padding convolution)
    and every :class:`Refolding` module: the layers LRP rules and window arithmetic work on."""

    def __init__(self, record_stack_traces: bool = False) -> None:
        super().__init__()
        self.record_stack_traces = record_stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a Refolding module reads its folded weights at call time: never traced through. A BatchNorm
        # subclass with its own forward (timm's BatchNormAct2d: norm, then an activation) is traced
        # through, so that a SiLU inside it is not folded into the conv as if it were affine
        if isinstance(m, _BATCH_NORMS) and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward:
            return False
        return isinstance(m, (*_LAYERS, *_BATCH_NORMS, Refolding)) or super().is_leaf_module(m, qualname)


class TraceError(ValueError):
    """torch.fx cannot trace a model: ``where`` is the user's line that stops it, ``cause`` the tracer's complaint."""

    def __init__(self, model_name: str, where: str, cause: str) -> None:
        self.model_name, self.where, self.cause = model_name, where, cause
        super().__init__(f"torch.fx cannot trace {model_name} at {where} ({cause})")


def trace(model: nn.Module, tracer: fx.Tracer | None = None, *, bind_defaults: bool = True,
          example: Tensor | None = None) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` by ``tracer`` (default: a plain :class:`torch.fx.Tracer`).

    Parameters
    ----------
    model
        Any ``nn.Module``; it is left exactly as it was (the tensor constants a trace stores on its
        root are copied into the result and removed from the model).
    tracer
        Decides the leaves, e.g. :class:`LayerTracer`.
    bind_defaults
        Trace the forward's parameters after the first as their defaults (explainers and the engine
        call ``model(x)``, so options such as ``attn_mask=None`` are the constants they are).
    example
        An input batch: where the plain trace fails, the model is traced again with shape-aware proxies,
        so that Python control flow on shapes (``if x.shape[-1] < k``) takes the example's branch;
        control flow on tensor *values* still fails. The graph is then valid for inputs of the
        example's shape and dtype only, recorded as ``specialised_to`` (``None`` for a general graph).

    Raises
    ------
    TraceError
        Naming the user's line that stops the trace.
    ValueError
        When the forward was replaced on the instance (torch.fx would trace the class's) or takes no
        positional input.
    """
    if "forward" in vars(model):
        raise ValueError(
            f"{type(model).__name__}'s forward was replaced on the instance; torch.fx traces the class's "
            "forward, so its graph would run different code. Define the forward in a (sub)class instead."
        )
    tracer = tracer if tracer is not None else fx.Tracer()
    first, defaults = _signature(model) if bind_defaults or example is not None else ("", {})
    own = set(vars(model))
    try:
        return _traced(model, tracer, first, defaults if bind_defaults else None, example)
    finally:
        for key in set(vars(model)) - own:  # tensor constants the tracer stores on its root: the graph
            delattr(model, key)            # module has its copies; the user's model stays untouched


def _traced(model: nn.Module, tracer: fx.Tracer, first: str, defaults: dict | None,
            example: Tensor | None) -> fx.GraphModule:
    specialised = None
    try:
        graph = tracer.trace(model, concrete_args=defaults)
    except Exception as err:  # noqa: BLE001 - any failure of tracing user code is reported the same way
        failure = err
        if example is not None:
            from torch.fx.experimental.meta_tracer import MetaTracer

            record = tracer.record_stack_traces
            # the same leaves, with proxies that know the example's shape, dtype and device (its values
            # only propagate shapes through leaf modules; a proxy's bool is never answered from them)
            tracer = type(f"Shape{type(tracer).__name__}", (MetaTracer, type(tracer)), {})()
            tracer.record_stack_traces = record
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.filterwarnings("ignore", message="Could not compute metadata")
                    graph = tracer.trace(model, meta_args={first: example.detach()}, concrete_args=defaults)
                specialised = (tuple(example.shape), example.dtype)
                failure = None
            except Exception as shape_err:  # noqa: BLE001 - reported like the plain trace's failure
                failure = shape_err
        if failure is not None:
            cause = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
            raise TraceError(type(model).__name__, _user_frame(failure), cause) from failure
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.specialised_to = specialised
    return gm


def _signature(model: nn.Module) -> tuple[str, dict]:
    """The name of the forward's input and its other parameters' defaults."""
    params = list(inspect.signature(model.forward).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise ValueError(f"{type(model).__name__}.forward takes no positional input to trace")
    defaults = {p.name: p.default for p in params[1:]
                if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
    return params[0].name, defaults


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame of ``exc`` outside torch and the package's tracing code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/heatmapbench/explain/" not in f.filename
              and not f.filename.endswith("/heatmapbench/fxgraph.py")]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


# --------------------------------------------------------------------------------------------
# the rewritten graph and its cache

def graph_module(cls: type[G], traced: fx.GraphModule, name: str) -> G:
    """``traced``'s graph, rewritten in place (new modules added with ``traced.add_submodule``), as a
    ``cls`` over the user's own modules and tensors.

    Dead code (e.g. the weight lookups of folded layers) is removed first. The new graph module holds
    exactly what its graph calls or reads: the user's leaf modules, parameters and buffers themselves,
    so it follows their current values and modes, and nothing is added to the user's model. It is in
    eval mode without ``eval()`` being called (the user's modules keep their modes).
    """
    graph = traced.graph
    graph.eliminate_dead_code()
    graph.lint()
    refs = {n.target: get_attr(traced, n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    result = cls(refs, graph, name)
    result.training = False
    return result


class GraphCache:
    """Values built from a model (its graphs), kept per model (weakly: they go with it) and per key.

    A value is handed out while the model's modules, parameters and buffers are the objects it was
    built from (:func:`module_fingerprint`); each time, every :class:`Refolding` module of a graph
    value is marked to refold at its next call. Folded weights thus follow in-place updates (version
    counters) and ``.data`` updates (between calls); a replaced module or tensor means a rebuild.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, key: Hashable = None, default: Any = None) -> Any:
        """The value stored for ``model`` and ``key`` if the model is unchanged since, else ``default``."""
        entry = self._entries.get(model, {}).get(key)
        if entry is None or entry[0] != module_fingerprint(model):
            return default
        if isinstance(entry[1], nn.Module):
            for module in entry[1].modules():
                if isinstance(module, Refolding):
                    module.mark_stale()
        return entry[1]

    def put(self, model: nn.Module, value: Any, key: Hashable = None) -> Any:
        """Store ``value`` for ``model`` (as it is now) and ``key``, replacing what was there; returns it."""
        self._entries.setdefault(model, {})[key] = (module_fingerprint(model), value)
        return value


# --------------------------------------------------------------------------------------------
# reading traced nodes

def conv_call(node: fx.Node, modules: dict[str, nn.Module], root: nn.Module) -> tuple | None:
    """``(fn, weight, bias, stride, padding, dilation, groups, input, dims, label)`` of a plain convolution
    node (an ``nn.ConvNd`` of exactly that class with zero padding mode, or ``F.convNd`` of
    parameters read from ``root``), else None (e.g. a computed, standardised weight)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) not in CONV_MODULES or m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
            return None
        padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        return (CONV_MODULES[type(m)], m.weight, m.bias, tuple(m.stride), padding, tuple(m.dilation),
                m.groups, node.args[0], len(m.kernel_size), str(node.target))
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    if set(values) - set(names) or "weight" not in values or not isinstance(values["input"], fx.Node):
        return None
    dims = CONV_FUNCTIONS[node.target]
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


def symmetric_zero_pad(node: Any, modules: dict[str, nn.Module], dims: int) -> tuple[int, ...] | None:
    """Per spatial dimension (in a convolution's order), the zero padding ``node`` applies equally on
    both sides, or None (not a zero pad of ``dims`` dimensions, or asymmetric)."""
    pads = zero_pad_amounts(node, modules)
    if pads is None or len(pads) != 2 * dims:
        return None
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]  # last dim first
    if any(a != b for a, b in pairs):
        return None
    return tuple(a for a, _ in reversed(pairs))


def conv_subclass(module: nn.Module) -> tuple[tuple, tuple[int, ...] | None, dict[str, nn.Module]] | None:
    """What a convolution subclass computes, when its traced forward is an optional zero pad of its input
    and one ``F.convNd`` of its own ``weight`` and ``bias`` (e.g. EfficientNet-Lite's
    ``Conv2dStaticSamePadding``): ``(conv, pad, modules)`` with ``conv`` as :func:`conv_call` gives it,
    ``pad`` the pad's node or None, and the module's submodules by name. None for anything else (a plain
    ``nn.ConvNd``, a computed weight, another operation, an untraceable forward)."""
    base = next((cls for cls in type(module).__mro__ if cls in CONV_MODULES), None)
    if base is None or type(module) is base or "forward" in vars(module):
        return None
    try:
        graph = fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - not traceable: not a plain convolution
        return None
    modules = dict(module.named_modules())
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if not 1 <= len(nodes) <= 2 or len(outputs) != 1 or outputs[0].args[0] is not nodes[-1] \
            or nodes[-1].op != "call_function":
        return None
    conv = conv_call(nodes[-1], modules, module)
    if conv is None or conv[0] is not CONV_MODULES[base] or conv[1] is not module.weight \
            or conv[2] is not module.bias or isinstance(conv[4], str):
        return None
    source = conv[7]
    if len(nodes) == 2:
        if source is not nodes[0] or zero_pad_amounts(source, modules) is None \
                or not isinstance(source.args[0], fx.Node) or source.args[0].op != "placeholder":
            return None
        return conv, source, modules
    return (conv, None, modules) if source.op == "placeholder" else None
