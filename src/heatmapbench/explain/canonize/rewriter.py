"""The pass that rewrites a traced model into its canonical graph, and :func:`canonize` (cached per model)."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from zennit.layer import Sum
from zennit.types import BatchNorm, Linear

from heatmapbench.explain.canonize.layers import (
    BatchNormAffine, Reduce, fold, pass_relevance, plain_conv_twin, stack_terms,
)
from heatmapbench.explain.canonize.ops import (
    ACTIVATIONS, ADD, DIV, DROPOUT, GATE_MODULES, INPLACE, INTERPOLATE, MATMUL, MUL, NEG, NON_TENSOR, NORMS,
    RECTIFIERS, REDUCE, ROUTING, ROUTING_MODULES, SUB, _is_stochastic_depth_eval, _op_key, _op_name, _ops,
)
from heatmapbench.explain.canonize.tracing import source_line, trace
from heatmapbench.fxgraph import GraphCache, foldable_batch_norm, get_attr, graph_module
from heatmapbench.explain.canonize.transformers import (
    BatchNormCall, ConstantFactorProduct, NormStdConstant, UniformProduct, expand_attention,
)

__all__ = ["GATES", "PURPOSES", "CanonicalGraph", "Refusal", "canonize"]

GATES = ("refuse", "constant", "uniform")
PURPOSES = ("lrp", "gradient")


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
    #: ``(shape, dtype)`` of the inputs a shape-specialised trace is valid for; ``None``: any input
    specialised_to: tuple | None = None

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

    def refuse_early(self, node: fx.Node, why: str) -> None:
        """Refuse ``node`` before the main pass, which then leaves it alone."""
        self.refuse(node, why)
        self.erased.add(node)

    def prune_refusals(self) -> None:
        """Drop refusals of operations that no relevance reaches (e.g. the scores behind attention
        weights held constant): their rule would never be used."""
        carrying: set[fx.Node] = set()
        stack = [n for n in self.graph.nodes if n.op == "output"]
        while stack:
            node = stack.pop()
            if node in carrying:
                continue
            carrying.add(node)
            args = _flat_nodes(list(node.args) + list(node.kwargs.values()))
            if node.target is pass_relevance or isinstance(self.module_of(node), ConstantFactorProduct):
                args = args[:1]  # the factor held constant carries no relevance
            stack.extend(args)
        names = {n.name for n in carrying}
        self.refusals = [r for r in self.refusals if r.node in names]

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
        if self.purpose == "lrp":
            expand_attention(self.gm, self.modules, self.add_module, self.refuse_early)
            self.graph.lint()
            self.calls = {}
            for n in self.graph.nodes:
                if n.op == "call_module":
                    self.calls[n.target] = self.calls.get(n.target, 0) + 1
        for node in list(self.graph.nodes):
            if node in self.erased:
                self.kind.setdefault(node, "tensor")
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
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            self.swap_module(node, NormStdConstant.from_module(module))
            self.rules_used.add(NORM_RULE)
            return
        if isinstance(module, nn.Upsample):
            self.visit_interpolate(node, F.interpolate, (), {"size": module.size, "scale_factor": module.scale_factor,
                                                           "mode": module.mode,
                                                           "align_corners": module.align_corners})
            return
        if isinstance(module, nn.Softmax):
            return  # a gate (gates="constant") or the softmax rule (gates="uniform")
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
        return foldable_batch_norm(bn) and self.calls[bn_node.target] == 1

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
            if isinstance(module, nn.Softmax):
                return
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
        if key in MUL or key in DIV or key in MATMUL:
            self.visit_product(node, tensor_args, divide=key in DIV, matmul=key in MATMUL)
            return
        if key in _ops("batch_norm") and self.dep(args[0]):
            self.visit_batch_norm(node)
            return
        if key in NORMS and self.dep(args[0]):
            self.visit_norm(node, rms=key in _ops("rms_norm"))
            return
        if key in INTERPOLATE and self.dep(args[0]):
            self.visit_interpolate(node, _callable(node), tuple(args[1:]), dict(node.kwargs))
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

    def visit_norm(self, node: fx.Node, rms: bool) -> None:
        names = ("input", "normalized_shape", "weight", "eps") if rms else (
            "input", "normalized_shape", "weight", "bias", "eps")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        tensors = []
        for name in ("weight", "bias"):
            value = bound.get(name)
            if isinstance(value, fx.Node) and value.op != "get_attr":
                self.refuse(node, f"a normalisation whose {name} is computed in the forward has no rule here")
                return
            tensors.append(get_attr(self.gm, value.target) if isinstance(value, fx.Node) else value)
        eps = bound.get("eps", None if rms else 1e-5)
        shape = bound["normalized_shape"]
        module = NormStdConstant((shape,) if isinstance(shape, int) else tuple(shape), eps, *tensors, rms=rms,
                                 label=_op_name(node))
        self.replace_call(node, module, (bound["input"],))
        self.rules_used.add(NORM_RULE)

    def visit_batch_norm(self, node: fx.Node) -> None:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        tensors = []
        for name in names[1:5]:
            value = bound.get(name)
            if isinstance(value, fx.Node) and value.op != "get_attr":
                self.refuse(node, f"a batch norm whose {name} is computed in the forward has no rule here")
                return
            tensors.append(get_attr(self.gm, value.target) if isinstance(value, fx.Node) else value)
        if bound.get("training", False) or tensors[0] is None:
            self.refuse(node, "batch norm with batch statistics normalises by the batch; LRP needs a per-image "
                              "affine map")
            return
        module = BatchNormAffine(BatchNormCall(*tensors, eps=bound.get("eps", 1e-5)))
        self.replace_call(node, module, (bound["input"],))
        self.rules_used.add("BatchNorm not fed by a conv/linear: its own affine layer (epsilon rule)")

    def visit_interpolate(self, node: fx.Node, fn: Callable, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(("size", "scale_factor", "mode", "align_corners"), args))
        bound.update(kwargs)
        mode = bound.get("mode", "nearest")
        if mode in ("nearest", "nearest-exact"):
            self.rules_used.add("nearest upsampling: routing (each value copied, relevance summed back)")
            return
        if mode not in ("linear", "bilinear", "trilinear"):
            self.refuse(node, f"interpolation mode {mode!r} has negative weights; only nearest and (bi/tri)linear "
                              "upsampling have rules here")
            return
        self.replace_call(node, Reduce(fn, args, kwargs, label=f"{mode} upsampling"), (node.args[0],))
        self.rules_used.add(f"{mode} upsampling: proportional rule (a linear map with non-negative weights)")

    def visit_product(self, node: fx.Node, tensor_args: list, divide: bool, matmul: bool = False) -> None:
        args = list(node.args)
        if len(args) != 2 or node.kwargs:
            self.refuse(node, "multiplication with extra arguments has no rule here")
            return
        if node.target in INPLACE and not self.check_inplace(node, args[0]):
            return
        if matmul and len(tensor_args) == 1:
            self.refuse(node, "a matrix product with a constant has no rule here; use an nn.Linear")
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
                              "(CP-LRP, the LXT choice for ViTs: explainer cp_lrp) or gates='uniform' (explainer "
                              "attnlrp) if that is what you want")
            return
        fn = _matmul if matmul else operator.mul
        if self.gates == "uniform":
            self.replace_call(node, UniformProduct(fn, label=_op_name(node)), tuple(args))
            self.rules_used.add("product of two activations: uniform rule (half the relevance to each factor)")
            return
        gate_flags = [self.is_gate(a) for a in args]
        if sum(gate_flags) != 1:
            self.refuse(node, "gates='constant' needs exactly one factor that comes from a sigmoid, hard-sigmoid "
                              f"or softmax; found {sum(gate_flags)}")
            return
        signal = args[gate_flags.index(False)]
        if matmul:
            module = ConstantFactorProduct(fn, factor_first=gate_flags[0], label=_op_name(node))
            self.replace_call(node, module, (signal, args[gate_flags.index(True)]))
            self.rules_used.add("attention weights (softmax factor of a matrix product) held constant")
            return
        self.wrap_pass(node, signal)
        self.rules_used.add("gate (sigmoid-type factor of a product) held constant")

    def replace_call(self, node: fx.Node, module: nn.Module, args: tuple) -> None:
        with self.graph.inserting_after(node):
            new = self.graph.call_module(self.add_module(node.name, module), args)
        self.replace(node, new)

    def is_gate(self, node: Any) -> bool:
        seen = 0
        while isinstance(node, fx.Node) and seen < 32:
            seen += 1
            module = self.module_of(node)
            if isinstance(module, ROUTING_MODULES) and node.args:  # e.g. attention dropout (eval)
                node = node.args[0]
                continue
            if module is not None:
                return isinstance(module, GATE_MODULES)
            if (node.target in ROUTING or node.target in DROPOUT) and node.args:
                node = node.args[0]
                continue
            return False
        return False


NORM_RULE = "LayerNorm / RMSNorm: standard deviation held constant (identity rule on the normalisation)"


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


def _callable(node: fx.Node) -> Callable:
    if node.op == "call_method":
        return getattr(torch.Tensor, node.target)
    return node.target


_CACHE = GraphCache()


def canonize(model: nn.Module, *, purpose: str = "lrp", gates: str = "refuse",
             example: torch.Tensor | None = None) -> CanonicalGraph:
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
        ``"refuse"``, ``"constant"`` (hold the sigmoid-type factor of a product, e.g. attention
        weights, constant: CP-LRP) or ``"uniform"`` (half the relevance to each factor: AttnLRP).
    example
        An input batch: where Python control flow on shapes stops the plain trace, the graph is
        traced for inputs of this shape and dtype (and rebuilt for another).

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
    # cached for the model as it is (its folded weights refold at the next call: a weight changed
    # through .data, which no version counter records, stays correct); a graph traced for inputs of
    # another shape (control flow on shapes) is traced again
    cached = _CACHE.get(model, key)
    if cached is not None and cached.specialised_to in (
            None, (tuple(example.shape), example.dtype) if example is not None else None):
        return cached
    if model.training:
        raise ValueError("canonize traces the eval-mode graph: call model.eval() first (explainers do).")
    traced = trace(model, example=example)
    rewriter = _Rewriter(traced, purpose, gates)
    rewriter.run()
    rewriter.prune_refusals()
    result = graph_module(CanonicalGraph, traced, f"Canonical{type(model).__name__}")
    if rewriter.refusals:  # trace again, recording stack traces (slow), to name the source lines
        named = {n.name: n for n in trace(model, record_stack_traces=True, example=example).graph.nodes}
        for refusal in rewriter.refusals:
            refusal.where = source_line(named[refusal.node]) if refusal.node in named else "source line unknown"
    result.refusals = rewriter.refusals
    result.rules_used = sorted(rewriter.rules_used)
    result.specialised_to = traced.specialised_to
    return _CACHE.put(model, result, key)
