"""Canonization from the model's data flow: every operation that mixes values gets an LRP rule.

Module-based canonizers see only what a model registers; a functional ``x + y``, ``x.mean((2, 3))``
or ``F.relu`` is invisible to them, and a BatchNorm is paired with the layer *registered* before it
rather than the one that feeds it. Here the model is traced with :mod:`torch.fx` and the graph is
rewritten so that each value-mixing operation is an explicit module with a rule, while the forward
pass stays bit-identical and the user's model object is never modified:

=====================================================  ============================================
operation in the traced graph                          rewritten as (LRP rule)
=====================================================  ============================================
conv / linear whose only consumer is an eval BatchNorm  :class:`FoldedLinear` (the conv's rule on the
                                                        folded affine map; forward = ``bn(conv(x))``)
a conv subclass that is a symmetric zero pad and one    a plain ``nn.ConvNd`` with the same
``F.convNd`` (TF "same" padding, EfficientNet-Lite)     Parameters and the pad in its padding
                                                        (:func:`heatmapbench.fuse.plain_conv_twin`;
                                                        the same outputs, one pass fewer per rule)
BatchNorm fed by anything else                          :class:`BatchNormAffine` (epsilon rule)
``a + b``, ``a += b``, ``torch.add``, ``a - b``,        zennit :class:`~zennit.layer.Sum` of the
``x + constant``                                        stacked terms (proportional; a constant
                                                        absorbs its share like a bias)
``mean``/``sum`` over dims, functional average pools    :class:`Reduce` (proportional, a ``Sum``)
functional ReLU / ReLU6 / other activations             a fresh activation module per call (LRP:
                                                        relevance passes; deconvnet / guided
                                                        backprop: their ReLU rules)
``x * c``, ``x / c``, ``-x`` (c not from the input)     value kept, relevance passes unchanged
pooling by max, reshapes, ``cat``, slicing, indexing,   routing: the plain gradient moves relevance
flatten, dropout (eval), padding                        without mixing it
``a * b`` of two activations (gates, SE, attention)     refused, or with ``gates="constant"`` the
                                                        sigmoid-type factor is held constant and
                                                        relevance passes to the other (AttnLRP/LXT)
anything else that touches the input                   refused, naming op, graph node, source line
=====================================================  ============================================

The rewritten :class:`torch.fx.GraphModule` references the user's own leaf modules (their current
parameters, buffers and modes) and adds new modules only where it folds, wraps or makes a function a
module. :func:`canonize` caches it per model and rebuilds when the model's modules or tensors are
replaced; folded weights are recomputed from the current parameters on every forward.
"""

from __future__ import annotations

import copy
import operator
import traceback
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from zennit.layer import Sum
from zennit.types import BatchNorm, ConvolutionTranspose, Linear

from heatmapbench.fuse import FusedConv, fold_batch_norm, module_fingerprint, plain_conv_twin

__all__ = [
    "BatchNormAffine",
    "CanonicalGraph",
    "FoldedLinear",
    "Reduce",
    "Refusal",
    "canonize",
    "pass_relevance",
]

GATES = ("refuse", "constant")
PURPOSES = ("lrp", "gradient")


# --------------------------------------------------------------------------------------------
# modules and functions the rewritten graph calls


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


# --------------------------------------------------------------------------------------------
# tracing


class _Tracer(fx.Tracer):
    """torch.nn leaves plus every conv/linear/BatchNorm subclass (e.g. a same-padding conv)."""

    def __init__(self, record_stack_traces: bool = False) -> None:
        super().__init__()
        self.record_stack_traces = record_stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # FusedConv reads its folded weights at call time: never traced through
        return isinstance(m, (Linear, BatchNorm, FusedConv)) or super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/heatmapbench/explain/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def trace(model: nn.Module, record_stack_traces: bool = False) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (eval); a clear error naming the untraceable code otherwise."""
    if "forward" in vars(model):
        raise ValueError(
            f"{type(model).__name__}'s forward was replaced on the instance; torch.fx traces the class's "
            "forward, so LRP would explain different code. Define the forward in a (sub)class instead."
        )
    tracer = _Tracer(record_stack_traces)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any failure of tracing user code is reported the same way
        raise ValueError(
            f"LRP needs the data flow of {type(model).__name__}, but torch.fx cannot trace it at "
            f"{_user_frame(err)} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Write the forward without Python control flow on tensor values (or move that code into "
            "a torch.nn module with a supported type)."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the user code that created ``node`` (from its recorded stack trace)."""
    lines = (node.stack_trace or "").strip().splitlines()
    found = "source line unknown"
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith("File "):
            continue
        parts = line.split(",")
        file = parts[0][len("File "):].strip().strip('"')
        if "/torch/" in file:
            continue  # torch's own frames (module call machinery, the tracer)
        number = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        found = f"{file}:{number}: {code}"
    return found


# --------------------------------------------------------------------------------------------
# classification of graph nodes


def _ops(*names: str) -> set:
    """Functions (torch., F., operator.) and method names for the given op names."""
    out: set = set()
    for name in names:
        out.add(name)  # method name
        for space in (torch, F, operator, torch.Tensor):
            fn = getattr(space, name, None)
            if fn is not None:
                out.add(fn)
    return out


ADD = _ops("add", "add_", "iadd", "__add__", "__iadd__", "__radd__")
SUB = _ops("sub", "sub_", "isub", "subtract", "__sub__", "__rsub__")
MUL = _ops("mul", "mul_", "imul", "multiply", "__mul__", "__rmul__")
DIV = _ops("truediv", "div", "div_", "itruediv", "divide", "true_divide", "__truediv__")
NEG = _ops("neg", "negative", "neg_")
REDUCE = _ops("mean", "sum", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
ROUTING = _ops(
    "flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "view_as", "reshape_as", "getitem", "cat", "concat", "concatenate",
    "stack", "chunk", "split", "narrow", "select", "index_select", "repeat", "tile", "movedim",
    "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "clone", "to",
    "float", "double", "half", "type", "type_as", "unbind", "pixel_shuffle", "channel_shuffle",
)
DROPOUT = _ops("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
NON_TENSOR = _ops("size", "dim", "numel", "ndimension") | {getattr, len}
#: functional activations -> module factory (kwargs of the call are passed on)
ACTIVATIONS: dict[Any, Callable[..., nn.Module]] = {}
for _names, _factory in [
    (("relu", "relu_"), lambda inplace=False: nn.ReLU()),
    (("relu6",), lambda inplace=False: nn.ReLU6()),
    (("leaky_relu", "leaky_relu_"), lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope)),
    (("silu",), lambda inplace=False: nn.SiLU()),
    (("gelu",), lambda approximate="none": nn.GELU(approximate=approximate)),
    (("hardswish",), lambda inplace=False: nn.Hardswish()),
    (("hardsigmoid",), lambda inplace=False: nn.Hardsigmoid()),
    (("sigmoid", "sigmoid_"), lambda: nn.Sigmoid()),
    (("tanh", "tanh_"), lambda: nn.Tanh()),
    (("elu", "elu_"), lambda alpha=1.0, inplace=False: nn.ELU(alpha)),
    (("hardtanh", "hardtanh_"), lambda min_val=-1.0, max_val=1.0, inplace=False: nn.Hardtanh(min_val, max_val)),
]:
    for _op in _ops(*_names):
        ACTIVATIONS[_op] = _factory
INPLACE = _ops("relu_", "leaky_relu_", "sigmoid_", "tanh_", "elu_", "hardtanh_", "add_", "iadd", "sub_",
               "isub", "mul_", "imul", "div_", "itruediv", "neg_")
#: activations whose output is read as a gate by ``gates="constant"``
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
#: leaf modules that only route values (the plain gradient is their rule)
ROUTING_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding.ZeroPad2d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ChannelShuffle, nn.PixelShuffle,
)
RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)


def _op_key(node: fx.Node) -> Any:
    return node.target


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return f"{module}.{getattr(node.target, '__name__', node.target)}".lstrip(".")
    return f"{node.op} {node.target}"


def _is_stochastic_depth_eval(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "")
    if node.op != "call_function" or name != "stochastic_depth":
        return False
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    return training is False


@dataclass
class Refusal:
    """An operation without a sound LRP rule."""

    op: str
    node: str
    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.op} at graph node {self.node!r} ({self.where}): {self.why}"


class CanonicalGraph(fx.GraphModule):
    """The rewritten graph. ``refusals`` lists operations without a sound rule (LRP raises on them)."""

    refusals: list[Refusal]
    rules_used: list[str]

    def check_lrp(self) -> None:
        """Raise ``ValueError`` naming every operation that has no LRP rule."""
        if self.refusals:
            lines = "\n  ".join(str(r) for r in self.refusals[:8])
            more = f"\n  ... and {len(self.refusals) - 8} more" if len(self.refusals) > 8 else ""
            raise ValueError(f"LRP has no sound rule for:\n  {lines}{more}")


def _flat_nodes(args: Iterable) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(tuple(args), lambda n: out.append(n))
    return out


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, purpose: str, gates: str) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.purpose = purpose
        self.gates = gates
        self.modules = dict(gm.named_modules())
        self.new_modules: dict[str, nn.Module] = {}
        self.kind: dict[fx.Node, str] = {}  # "tensor" (depends on the input), "tuple", "other", "const"
        self.refusals: list[Refusal] = []
        self.rules_used: set[str] = set()
        self.erased: set[fx.Node] = set()
        self.counter = 0
        self.calls: dict[str, int] = {}  # module target -> number of call sites
        for n in self.graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    # helpers --------------------------------------------------------------------------------
    def refuse(self, node: fx.Node, why: str) -> None:
        self.refusals.append(Refusal(_op_name(node), node.name, "", why))

    def add_module(self, base: str, module: nn.Module) -> str:
        self.counter += 1
        name = f"canonical_{base.replace('.', '_')}_{self.counter}"
        self.new_modules[name] = module
        self.modules[name] = module
        self.gm.add_submodule(name, module)  # the traced copy's root, never the user's model
        return name

    def dep(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and self.kind.get(node) == "tensor"

    def module_of(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def used_later(self, value: fx.Node, node: fx.Node) -> bool:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return any(order.get(u, 1 << 60) > order[node] for u in value.users if u is not node)

    def check_inplace(self, node: fx.Node, value: Any) -> bool:
        if isinstance(value, fx.Node) and self.used_later(value, node):
            self.refuse(node, f"in place on {value.name!r}, which later code reads again; write it out of place")
            return False
        return True

    def replace(self, node: fx.Node, new: fx.Node) -> None:
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        self.graph.erase_node(node)
        self.kind[new] = "tensor"

    # passes ---------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node in self.erased:
                continue
            if node.op == "placeholder":
                self.kind[node] = "tensor"
                continue
            if node.op in ("get_attr", "output"):
                self.kind[node] = "const"
                continue
            inputs = _flat_nodes(list(node.args) + list(node.kwargs.values()))
            if not any(self.dep(n) or self.kind.get(n) == "tuple" for n in inputs):
                self.kind[node] = "const" if all(self.kind.get(n) == "const" for n in inputs) else "other"
                continue
            self.kind[node] = "tensor"
            if node.op == "call_module":
                self.visit_module(node)
            else:
                self.visit_function(node, inputs)

    def visit_module(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        if isinstance(module, RECTIFIERS):
            fresh = copy.deepcopy(module)
            if hasattr(fresh, "inplace"):
                if fresh.inplace and not self.check_inplace(node, node.args[0]):
                    return
                fresh.inplace = False
            self.swap_module(node, fresh)
            return
        if self.purpose == "gradient":
            return
        if isinstance(module, Linear):
            calls = self.calls[node.target]
            if calls > 1:
                self.refuse(node, f"module {node.target!r} is called {calls} times (shared weights); LRP rules "
                                  "hook one call per module")
                return
            twin = plain_conv_twin(module)  # a "same"-padding subclass: its pad folded into the padding
            if twin is not None:
                node, module = self.swap_module(node, twin), twin
                self.rules_used.add("zero padding folded into the convolution that follows it")
            users = list(node.users)
            bn = self.module_of(users[0]) if len(users) == 1 else None
            if isinstance(bn, BatchNorm) and self.foldable(bn, users[0]):
                folded = fold(module, bn)
                bn_node = users[0]
                with self.graph.inserting_after(bn_node):
                    new = self.graph.call_module(self.add_module(node.target, folded), node.args, node.kwargs)
                bn_node.replace_all_uses_with(new)
                new.meta.update(bn_node.meta)
                self.graph.erase_node(bn_node)
                self.graph.erase_node(node)
                self.kind[new] = "tensor"
                self.erased.update((node, bn_node))
                self.rules_used.add("BatchNorm folded into the conv/linear that feeds it")
            return
        if isinstance(module, BatchNorm):
            if not module.track_running_stats or module.running_var is None:
                self.refuse(node, "BatchNorm without running statistics normalises by batch statistics; "
                                  "LRP needs a per-image affine map")
                return
            self.swap_module(node, BatchNormAffine(module))
            self.rules_used.add("BatchNorm not fed by a conv/linear: its own affine layer (epsilon rule)")
            return
        if isinstance(module, (Sum, *ROUTING_MODULES)) or isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                                                                     nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                                                     nn.AdaptiveAvgPool3d)):
            return
        from zennit.types import Activation

        if isinstance(module, Activation) and not isinstance(module, (nn.MultiheadAttention, nn.Softmax,
                                                                       nn.Softmin, nn.LogSoftmax)):
            self.rules_used.add(f"{type(module).__name__}: relevance passes unchanged (identity rule)")
            return
        self.refuse(node, f"module {node.target!r} ({type(module).__name__}) has no LRP rule")

    def foldable(self, bn: nn.Module, bn_node: fx.Node) -> bool:
        return bool(bn.track_running_stats and bn.running_var is not None and not bn.training
                    and self.calls[bn_node.target] == 1)

    def swap_module(self, node: fx.Node, module: nn.Module) -> fx.Node:
        with self.graph.inserting_after(node):
            new = self.graph.call_module(self.add_module(str(node.target), module), node.args[:1])
        self.replace(node, new)
        return new

    def visit_function(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        key = _op_key(node)
        args = node.args
        tensor_args = [a for a in args if self.dep(a)]
        # activations first: deconvnet and guided backprop need every ReLU as a module
        if key in ACTIVATIONS and self.dep(args[0]):
            kwargs = dict(node.kwargs)
            extra = args[1:]
            if key in INPLACE or kwargs.get("inplace") or (extra and extra[-1] is True and key in _ops("relu")):
                if not self.check_inplace(node, args[0]):
                    return
            kwargs.pop("inplace", None)
            try:
                module = ACTIVATIONS[key](*[a for a in extra if not isinstance(a, bool)], **kwargs)
            except TypeError:
                self.refuse(node, "activation called with arguments this rewrite does not understand")
                return
            with self.graph.inserting_after(node):
                new = self.graph.call_module(self.add_module(node.name, module), (args[0],))
            self.replace(node, new)
            if not isinstance(module, RECTIFIERS):
                self.rules_used.add(f"{type(module).__name__}: relevance passes unchanged (identity rule)")
            return
        if self.purpose == "gradient":
            return
        if key in NON_TENSOR or _is_stochastic_depth_eval(node):
            if key in NON_TENSOR:
                self.kind[node] = "other"
            return
        if key in ROUTING:
            if key in _ops("chunk", "split", "unbind", "max_pool1d_with_indices", "max_pool2d_with_indices"):
                self.kind[node] = "tuple"
            if key is operator.getitem and not self.dep(args[0]):
                self.kind[node] = "tensor" if self.kind.get(args[0]) == "tuple" else "other"
            return
        if key in DROPOUT and node.kwargs.get("training", args[2] if len(args) > 2 else True) is False:
            return  # dropout in eval mode: the identity
        if self.kind.get(node) != "tensor":
            return
        if key in ADD or key in SUB:
            self.visit_sum(node, negate_second=key in SUB)
            return
        if key in NEG and self.dep(args[0]):
            self.wrap_pass(node, args[0])
            return
        if key in MUL or key in DIV:
            self.visit_product(node, tensor_args, divide=key in DIV)
            return
        if key in REDUCE and self.dep(args[0]):
            if key in _ops("mean", "sum") and len(args) == 1 and not node.kwargs:
                pass  # a full reduction: fine, still proportional
            module = Reduce(_callable(node), tuple(args[1:]), dict(node.kwargs), label=_op_name(node))
            with self.graph.inserting_after(node):
                new = self.graph.call_module(self.add_module(node.name, module), (args[0],))
            self.replace(node, new)
            return
        self.refuse(node, "no LRP rule is known for this function; express it with supported modules "
                          "or functions (conv/linear, BatchNorm, ReLU, pooling, +, mean, cat, reshape)")

    def visit_sum(self, node: fx.Node, negate_second: bool) -> None:
        args = list(node.args)
        if node.kwargs.get("alpha", 1) != 1 or len(args) != 2:
            self.refuse(node, "add/sub with alpha or extra arguments has no rule here; write a + c * b")
            return
        if node.target in INPLACE and not self.check_inplace(node, args[0]):
            return
        a, b = args
        with self.graph.inserting_before(node):
            if negate_second:
                if isinstance(b, fx.Node):
                    neg = self.graph.call_function(torch.neg, (b,))
                    b = self.graph.call_function(pass_relevance, (b, neg)) if self.dep(b) else neg
                else:
                    b = -b
            stacked = self.graph.call_function(stack_terms, (a, b))
            new = self.graph.call_module(self.add_module(node.name, Sum()), (stacked,))
        self.replace(node, new)

    def wrap_pass(self, node: fx.Node, source: fx.Node) -> None:
        with self.graph.inserting_after(node):
            new = self.graph.call_function(pass_relevance, (source, node))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.kind[new] = "tensor"

    def visit_product(self, node: fx.Node, tensor_args: list, divide: bool) -> None:
        args = list(node.args)
        if len(args) != 2 or node.kwargs:
            self.refuse(node, "multiplication with extra arguments has no rule here")
            return
        if node.target in INPLACE and not self.check_inplace(node, args[0]):
            return
        if len(tensor_args) == 1:
            if divide and not self.dep(args[0]):
                self.refuse(node, "division by an activation has no LRP rule")
                return
            # scaling by a constant (a scalar, a parameter, a buffer): relevance passes unchanged
            self.wrap_pass(node, tensor_args[0])
            self.rules_used.add("scaling by a constant: relevance passes unchanged")
            return
        if divide:
            self.refuse(node, "a quotient of two activations has no LRP rule")
            return
        if self.gates == "refuse":
            self.refuse(node, "a product of two activations (a gate, squeeze-excitation or attention) has no "
                              "sound LRP rule; pass gates='constant' to hold the sigmoid-type factor constant "
                              "(the AttnLRP/LXT choice) if that is what you want")
            return
        gate_flags = [self.is_gate(a) for a in args]
        if sum(gate_flags) != 1:
            self.refuse(node, "gates='constant' needs exactly one factor that comes from a sigmoid, hard-sigmoid "
                              f"or softmax; found {sum(gate_flags)}")
            return
        signal = args[gate_flags.index(False)]
        self.wrap_pass(node, signal)
        self.rules_used.add("gate (sigmoid-type factor of a product) held constant")

    def is_gate(self, node: Any) -> bool:
        seen = 0
        while isinstance(node, fx.Node) and seen < 32:
            seen += 1
            module = self.module_of(node)
            if module is not None:
                return isinstance(module, GATE_MODULES)
            if node.target in ROUTING and node.args:
                node = node.args[0]
                continue
            return False
        return False


def _callable(node: fx.Node) -> Callable:
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target)
    return node.target


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def canonize(model: nn.Module, *, purpose: str = "lrp", gates: str = "refuse") -> CanonicalGraph:
    """The model's traced and rewritten graph (cached per model; see the module docstring).

    Parameters
    ----------
    model
        Any traceable ``nn.Module``; it is not modified. Call in eval mode (explainers do).
    purpose
        ``"lrp"``: every rewrite of the table; operations without a rule are listed in
        ``refusals`` (:meth:`CanonicalGraph.check_lrp` raises on them). ``"gradient"``: only
        activations become modules (deconvnet / guided backprop need nothing else).
    gates
        ``"refuse"`` or ``"constant"`` (hold the sigmoid-type factor of a product constant).

    Returns
    -------
    CanonicalGraph
        A ``torch.fx.GraphModule`` that shares the model's leaf modules and parameters and computes
        bit-identical outputs; new modules: :class:`FoldedLinear` (a ``Linear`` to rules and the fast
        engine), :class:`BatchNormAffine`, zennit ``Sum`` and :class:`Reduce` (a ``Sum``), and
        activation modules in place of functional calls.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"Unknown canonization purpose {purpose!r}; choose one of {', '.join(PURPOSES)}.")
    if gates not in GATES:
        raise ValueError(f"Unknown gates rule {gates!r}; choose one of {', '.join(GATES)}.")
    key = (purpose, gates)
    fingerprint = module_fingerprint(model)
    entries = _CACHE.setdefault(model, {})
    cached = entries.get(key)
    if cached is not None and cached[0] == fingerprint:
        for module in cached[1].modules():  # refold on first use: a weight changed through .data
            if isinstance(module, FoldedLinear):  # (no version counter records that) stays correct
                object.__setattr__(module, "_folded_state", None)
        return cached[1]
    if model.training:
        raise ValueError("canonize traces the eval-mode graph: call model.eval() first (explainers do).")
    traced = trace(model)
    rewriter = _Rewriter(traced, purpose, gates)
    rewriter.run()
    rewriter.graph.eliminate_dead_code()
    rewriter.graph.lint()
    root: dict[str, Any] = {}
    for node in rewriter.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            root[node.target] = rewriter.modules[node.target] if node.op == "call_module" else _get_attr(traced, node.target)
    result = CanonicalGraph(root, rewriter.graph, f"Canonical{type(model).__name__}")
    if rewriter.refusals:  # trace again, recording stack traces (slow), to name the source lines
        named = {n.name: n for n in trace(model, record_stack_traces=True).graph.nodes}
        for refusal in rewriter.refusals:
            refusal.where = source_line(named[refusal.node]) if refusal.node in named else "source line unknown"
    result.refusals = rewriter.refusals
    result.rules_used = sorted(rewriter.rules_used)
    result.training = False  # not .eval(): the user's modules keep their modes
    entries[key] = (fingerprint, result)
    return result


def _get_attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module
