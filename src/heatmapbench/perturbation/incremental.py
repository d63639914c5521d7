"""Incremental forwards for perturbation curves (Krypton: Nakandala, Kumar, Papakonstantinou, SIGMOD 2019).

Step k of a curve differs from step k − 1 in one region r_k. In a CNN that change reaches, layer
after layer, only a window of each activation map (the region's receptive field), so the engine
keeps every image's activations of step k − 1 and at step k recomputes each layer inside that
window only, pasting it into the kept maps. Where a window covers most of its map
(:data:`FULL_FRACTION`) or an operation is not known to be local, that layer and everything
after it run in full on the kept maps. The scores equal full recomputation up to float
reassociation (different summation orders inside smaller kernels).

Which operations stay incremental follows from the traced graph (:func:`torch.fx` — the fused
graph of :func:`heatmapbench.accel.fusion.fused` when there is one, else
:func:`heatmapbench.fxgraph.trace` with the layer leaves of :class:`~heatmapbench.fxgraph.LayerTracer`):

=================================================  ==============================================
operation                                          window arithmetic (per spatial dimension)
=================================================  ==============================================
convolution (``nn.Conv2d``, ``F.conv2d``, fused),   kernel k, stride s, dilation d, left padding p:
any stride, padding, dilation, groups               output o reads inputs [o s − p, o s − p + d(k−1)];
                                                    padding gathered as zeros
max / average pooling (``nn.MaxPool2d``,            the same stencil; max-pool padding gathered as
``nn.AvgPool2d`` counting padding, adaptive         −inf; an adaptive pool whose map divides its
pools whose input divides the output)               output is a pool of stride H / out
zero padding (``F.pad``, ``nn.ZeroPad2d``, also     a stencil of k = 1 with left padding p
asymmetric)
element-wise (activations, eval BatchNorm,          the window of the union of the inputs' windows;
add/sub/mul/div, ``torch.cat`` over channels,       constants and tensors without spatial extent
dropout in eval, identity)                          broadcast
anything else                                       the incremental part ends: computed in full
=================================================  ==============================================

Receptive-field arithmetic: a node's changed outputs lie within
``[ceil((a − L) / S), floor((b + R) / S)]`` for a region spanning input rows [a, b], where S is
the node's cumulative stride and L, R its reach in input pixels (a convolution adds
``S·(d(k−1) − p)`` to L and ``S·p`` to R, then multiplies S by s; element-wise nodes take the
largest reach of their inputs). With regions of at most P pixels every image's window has the
same size, ``floor((P − 1 + L + R) / S) + 1`` (moved inside the map at its borders), so the windows
of a batch of images are gathered, computed and pasted as one tensor. Activations are kept as
flat NHWC rows (channels-last) with two sentinel rows (0 and −inf) that padding gathers from.

Perturbations qualify when step k changes only the pixels of region r_k: those that paste a
prepared fill with the base :meth:`~heatmapbench.perturbation.Perturbation.apply` (uniform, mean,
constant, blur — blur's fill is blurred once from the clean image). ROAD re-imputes every removed
pixel at each step (its linear system couples the regions), so it is refused.

Every plan is checked once against full forwards (steps 1-3 of the first images), and a
mismatch beyond float reassociation is an error (``on``) or a warning and full forwards
(``auto``); never a different curve. ``auto`` decides once per model by a timing probe; in a
run of several processes every process takes rank 0's verdict (:func:`shared_verdict`), so they
all walk their curves alike.
"""

from __future__ import annotations

import copy
import itertools
import operator
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from heatmapbench.fxgraph import GraphCache, LayerTracer, any_hooks, conv_call, conv_subclass, trace, zero_pad_amounts

__all__ = ["MODES", "FULL_FRACTION", "CACHE_BYTES", "Unsupported", "IncrementalPlan", "CurveWalker", "plan_for",
           "local_step_reason", "setup", "check_and_probe", "shared_verdict"]

MODES = ("auto", "on", "off")
#: A layer whose window would cover more than this fraction of its map runs in full, and so does
#: everything after it: gathering and pasting a window nearly as large as the map costs more than
#: the few outputs it skips.
FULL_FRACTION = 0.6
#: Bytes of kept activations per batch of images on a CPU (elsewhere: a quarter of the free device
#: memory, at most this times four). Sets how many images walk their curves together.
CACHE_BYTES = 1 << 30

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Hardswish,
                        nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
                        nn.Dropout2d, nn.PReLU)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
                          F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout,
                          operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add,
                          torch.sub, torch.mul, torch.div, torch.clamp, torch.neg, torch.cat, torch.concat,
                          operator.iadd, operator.isub, operator.imul, operator.itruediv}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "add", "sub", "mul", "div", "clamp", "neg", "contiguous",
                        "relu_", "sigmoid_", "tanh_", "add_", "sub_", "mul_", "div_", "clamp_", "neg_"}
#: in-place operators run out of place: a kept activation must never be overwritten by a consumer
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


class Unsupported(ValueError):
    """The model, input or perturbation cannot run incrementally; the message says why."""


def local_step_reason(perturbation) -> str | None:
    """Why a step of ``perturbation`` may change more than its new region, or None when it cannot.

    A perturbation qualifies when it pastes a prepared fill with the base
    :meth:`~heatmapbench.perturbation.Perturbation.apply` and has no walk of its own.
    """
    from heatmapbench.perturbation.perturbations import Perturbation

    cls = type(perturbation)
    if cls.walk is not Perturbation.walk:
        return (f"{perturbation.name}: each step rebuilds the removed pixels from all regions removed so far "
                "(e.g. ROAD's imputation), so a step changes more than its new region")
    if cls.apply is not Perturbation.apply:
        return (f"{perturbation.name}: its apply is not the base per-pixel paste, so a step is not known to "
                "change only its new region")
    return None


@dataclass(frozen=True)
class _Geo:
    """Where a node's outputs can change: map size, cumulative stride S, reach L/R, window size n."""

    h: int
    w: int
    s: tuple[int, int]
    lo: tuple[int, int]  # L (rows, cols)
    hi: tuple[int, int]  # R
    n: tuple[int, int]

    @staticmethod
    def make(h: int, w: int, s, lo, hi, p: int) -> "_Geo":
        n = tuple(min(size, (p - 1 + a + b) // st + 1) for size, st, a, b in zip((h, w), s, lo, hi))
        return _Geo(h, w, tuple(s), tuple(lo), tuple(hi), n)

    def too_large(self) -> bool:
        return self.n[0] * self.n[1] > FULL_FRACTION * self.h * self.w

    def start(self, top: Tensor, left: Tensor) -> tuple[Tensor, Tensor]:
        """Window corners for regions with top-left corners (top, left): ceil((a − L)/S) kept inside the map."""
        r0 = torch.div(top - self.lo[0], self.s[0], rounding_mode="floor")
        r0 = torch.where(r0 * self.s[0] < top - self.lo[0], r0 + 1, r0)  # ceil
        c0 = torch.div(left - self.lo[1], self.s[1], rounding_mode="floor")
        c0 = torch.where(c0 * self.s[1] < left - self.lo[1], c0 + 1, c0)
        return r0.clamp_(0, self.h - self.n[0]), c0.clamp_(0, self.w - self.n[1])


@dataclass
class _Stencil:
    """A local operator per spatial dimension: kernel, stride, dilation, left padding; the fill of padding."""

    k: tuple[int, int]
    s: tuple[int, int]
    d: tuple[int, int]
    p: tuple[int, int]
    fill: int  # sentinel row: 0 zeros, 1 −inf
    fn: Callable[[Tensor], Tensor]  # window (with halo, padding gathered) → outputs

    def geo(self, src: _Geo, h: int, w: int, p: int) -> _Geo:
        s = tuple(a * b for a, b in zip(src.s, self.s))
        lo = tuple(l0 + st * (d * (k - 1) - pp) for l0, st, d, k, pp in zip(src.lo, src.s, self.d, self.k, self.p))
        hi = tuple(r0 + st * pp for r0, st, pp in zip(src.hi, src.s, self.p))
        return _Geo.make(h, w, s, lo, hi, p)

    def span(self, n: tuple[int, int]) -> tuple[int, int]:
        return tuple((m - 1) * s + d * (k - 1) + 1 for m, s, d, k in zip(n, self.s, self.d, self.k))


@dataclass
class _Node:
    node: fx.Node
    call: Callable  # the operation on concrete arguments
    kind: str = "full"  # input | const | stencil | point | full
    geo: _Geo | None = None
    stencil: _Stencil | None = None
    cached: bool = False
    spatial: list[fx.Node] = field(default_factory=list)  # incremental inputs (point nodes)
    direct: dict = field(default_factory=dict)  # input → its window is this node's window
    channels: int = 0
    dtype: torch.dtype | None = None
    why: str = ""  # why it runs in full


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pad_of(node: fx.Node, modules: dict) -> tuple[int, int] | None:
    """(top, left) of a 2-D zero padding node (any amounts, also asymmetric), or None."""
    pads = zero_pad_amounts(node, modules)
    return None if pads is None or len(pads) != 4 else (pads[2], pads[0])


def _stencil_of(node: fx.Node, modules: dict, root: nn.Module, shapes: dict) -> tuple[_Stencil, fx.Node] | str:
    """The stencil of a local spatial operator and its input node; else a string saying why not."""
    from heatmapbench.accel.fusion import FusedConv

    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d:
        sub = _conv_subclass(m)  # e.g. a same-padding convolution: its pad and F.conv2d
        if sub is None:
            return f"{type(m).__name__} is not a zero pad and a plain convolution"
        if len(node.args) != 1 or node.kwargs:
            return "unexpected arguments"
        k, stride, dilation, groups, padding = sub

        def fn(win: Tensor, m=m, stride=stride, dilation=dilation, groups=groups) -> Tensor:
            return F.conv2d(win, m.weight, m.bias, stride, 0, dilation, groups)
        return _Stencil(k, stride, dilation, padding, 0, fn), node.args[0]
    if isinstance(m, FusedConv) or (m is not None and type(m) is nn.Conv2d):
        if isinstance(m, FusedConv) and m.fn is not F.conv2d:
            return "not a 2-D convolution"
        if type(m) is nn.Conv2d and m.padding_mode != "zeros":
            return f"padding mode {m.padding_mode!r}"
        if len(node.args) != 1 or node.kwargs:
            return "unexpected arguments"
        weight_of = m.folded if isinstance(m, FusedConv) else (lambda m=m: (m.weight, m.bias))
        k = tuple((m.folded()[0] if isinstance(m, FusedConv) else m.weight).shape[-2:])
        stride, dilation, groups = _pair(m.stride), _pair(m.dilation), m.groups
        padding = m.padding
        src = node.args[0]

        def fn(win: Tensor, weight_of=weight_of, stride=stride, dilation=dilation, groups=groups) -> Tensor:
            weight, bias = weight_of()
            return F.conv2d(win, weight, bias, stride, 0, dilation, groups)
    elif node.op == "call_function" and node.target is F.conv2d:
        conv = conv_call(node, modules, root)
        if conv is None:
            return "a convolution with computed weights"
        _, weight, bias, stride, padding, dilation, groups, src, _, _ = conv
        k = tuple(weight.shape[-2:])

        def fn(win: Tensor, weight=weight, bias=bias, stride=stride, dilation=dilation, groups=groups) -> Tensor:
            return F.conv2d(win, weight, bias, stride, 0, dilation, groups)
    elif isinstance(m, nn.MaxPool2d) or (node.op == "call_function" and node.target is F.max_pool2d):
        if m is None:
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            a = dict(zip(names, node.args))
            a.update(node.kwargs)
            ks, st, pd, dl = a.get("kernel_size"), a.get("stride"), a.get("padding", 0), a.get("dilation", 1)
            ret = a.get("return_indices", False)
            src = a.get("input")
        else:
            ks, st, pd, dl, ret = m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if ret or src is None or any(isinstance(v, fx.Node) for v in (ks, st, pd, dl)):
            return "max pooling with indices or computed arguments"
        k, d = _pair(ks), _pair(dl)
        s = _pair(st) if st not in (None, (), []) else k

        def fn(win: Tensor, k=k, s=s, d=d) -> Tensor:
            return F.max_pool2d(win, k, s, 0, d)
        return _Stencil(k, s, d, _pair(pd), 1, fn), src
    elif isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or m.divisor_override is not None or (not m.count_include_pad and _pair(m.padding) != (0, 0)):
            return "average pooling with ceil_mode, a divisor or padding it does not count"
        if len(node.args) != 1 or node.kwargs:
            return "unexpected arguments"
        k = _pair(m.kernel_size)
        s = _pair(m.stride) if m.stride not in (None, (), []) else k

        def fn(win: Tensor, k=k, s=s) -> Tensor:
            return F.avg_pool2d(win, k, s, 0)
        return _Stencil(k, s, (1, 1), _pair(m.padding), 0, fn), node.args[0]
    elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or (
            node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)):
        src = node.args[0]
        if not isinstance(src, fx.Node) or src not in shapes or node not in shapes:
            return "adaptive pooling of a non-tensor"
        (h, w), (oh, ow) = shapes[src][-2:], shapes[node][-2:]
        if h % oh or w % ow or (m is not None and getattr(m, "return_indices", False)):
            return f"adaptive pooling of {h}x{w} to {oh}x{ow} (windows of unequal size)"
        k = (h // oh, w // ow)
        mx = isinstance(m, nn.AdaptiveMaxPool2d) or node.target is F.adaptive_max_pool2d

        def fn(win: Tensor, k=k, mx=mx) -> Tensor:
            return F.max_pool2d(win, k, k) if mx else F.avg_pool2d(win, k, k)
        return _Stencil(k, k, (1, 1), (0, 0), int(mx), fn), src
    else:
        pad = _pad_of(node, modules)
        if pad is None:
            return "not a known local operation"
        return _Stencil((1, 1), (1, 1), (1, 1), pad, 0, lambda win: win), node.args[0]
    # convolutions
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif all(s == 1 for s in stride):  # 'same': the extra padding of an even kernel goes right
            padding = tuple(dd * (kk - 1) // 2 for dd, kk in zip(dilation, k))
        else:
            return f"padding={padding!r}"
    return _Stencil(k, tuple(stride), tuple(dilation), _pair(padding), 0, fn), src


def _conv_subclass(m: nn.Conv2d) -> tuple | None:
    """(kernel, stride, dilation, groups, left padding) of a convolution subclass whose forward is an
    optional zero pad (any amounts) and one ``F.conv2d`` of its own weight and bias; else None."""
    parts = conv_subclass(m)
    if parts is None:
        return None
    (_, weight, _, stride, padding, dilation, groups, _, _, _), pad_node, modules = parts
    pad = (0, 0) if pad_node is None else _pad_of(pad_node, modules)
    if pad is None:
        return None
    return (tuple(weight.shape[-2:]), tuple(stride), tuple(dilation), groups,
            tuple(a + b for a, b in zip(_pair(padding), pad)))


def _callable(node: fx.Node, modules: dict) -> Callable:
    """The node's operation on concrete arguments, run out of place."""
    if node.op == "call_module":
        m = modules[node.target]
        if getattr(m, "inplace", False):
            m = copy.copy(m)
            m.inplace = False
        return m
    if node.op == "call_function":
        target = _OUT_OF_PLACE.get(node.target, node.target)
        if node.kwargs.get("inplace"):
            return lambda *a, **k: target(*a, **{**k, "inplace": False})
        return target
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and hasattr(Tensor, name[:-1]):
            name = name[:-1]
        return lambda obj, *a, **k: getattr(obj, name)(*a, **k)
    if node.op == "get_attr":
        return lambda: operator.attrgetter(node.target)(node.graph.owning_module)
    return lambda *a: a[0] if a else None


def _describe(node: fx.Node, modules: dict) -> str:
    """``features.3 (Upsample)``, ``torch.flatten``, ``.view()``: a node as a user would name it."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}".lstrip(".")


def _is_elementwise(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return type(m) is nn.BatchNorm2d and not m.training and m.track_running_stats
        return isinstance(m, _ELEMENTWISE_MODULES) and not (isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.training)
    if node.op == "call_function":
        if node.target is F.dropout:
            return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False
        if node.target in (torch.cat, torch.concat):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return dim in (1, -3)
        return node.target in _ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


class IncrementalPlan:
    """Which nodes of a traced graph run incrementally for regions of side ``region_size``, and how.

    Built once per graph, input shape, region size and precision (:func:`plan_for`).
    """

    def __init__(self, gm: fx.GraphModule, example: Tensor, region_size: int,
                 context: Callable[[], Any]) -> None:
        self.gm, self.region_size = gm, region_size
        modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise Unsupported(f"the graph takes {len(placeholders)} inputs; incremental forwards need one")
        self.input = placeholders[0]
        self.output = next(n for n in nodes if n.op == "output")
        self.nodes: dict[fx.Node, _Node] = {n: _Node(n, _callable(n, modules)) for n in nodes}
        # shapes and dtypes: one full run on the example
        shapes: dict[fx.Node, tuple] = {}
        with context():
            env = self._run_full({}, example, record=shapes)
        del env
        self.shapes = shapes
        h, w = example.shape[-2:]
        depends = {self.input}
        for n in nodes:
            spec = self.nodes[n]
            if n is self.input:
                spec.kind, spec.geo = "input", _Geo.make(h, w, (1, 1), (0, 0), (0, 0), region_size)
                spec.channels, spec.dtype, spec.cached = example.shape[1], example.dtype, True
                continue
            inputs = n.all_input_nodes
            if not any(i in depends for i in inputs):
                spec.kind = "const" if n.op != "output" else "full"
                continue
            depends.add(n)
            if n.op == "output":
                continue
            shape = shapes.get(n)
            spec.why = "not a 4-D tensor"
            if shape is None or len(shape[0]) != 4 or shape[1] is None:
                continue  # not a 4-D tensor: full
            spec.channels, spec.dtype = shape[0][1], shape[1]
            oh, ow = shape[0][-2:]
            live = [i for i in inputs if i in depends]
            spec.why = "fed by a layer computed in full"
            if any(self.nodes[i].kind not in ("input", "stencil", "point") for i in live):
                continue
            st = _stencil_of(n, modules, gm, {k: v[0] for k, v in shapes.items()}) \
                if n.op in ("call_module", "call_function") else "not a module or function"
            if isinstance(st, tuple):
                stencil, src = st
                spec.why = "its window covers most of the map"
                if live != [src]:
                    spec.why = "an operand other than its input depends on the image"
                    continue
                geo = stencil.geo(self.nodes[src].geo, oh, ow, region_size)
                if geo.too_large():
                    continue
                spec.kind, spec.geo, spec.stencil, spec.spatial = "stencil", geo, stencil, [src]
                self.nodes[src].cached = True
                continue
            spec.why = st
            if not _is_elementwise(n, modules):
                continue
            spec.why = "its window covers most of the map"
            geos = [self.nodes[i].geo for i in live]
            if any(g.s != geos[0].s or (g.h, g.w) != (oh, ow) for g in geos):
                continue  # inputs of different resolutions
            if not self._broadcast_only(n, depends, shapes):
                spec.why = "an operand varies over space but does not depend on the image"
                continue
            lo = tuple(max(g.lo[i] for g in geos) for i in range(2))
            hi = tuple(max(g.hi[i] for g in geos) for i in range(2))
            geo = _Geo.make(oh, ow, geos[0].s, lo, hi, region_size)
            if geo.too_large():
                continue
            spec.kind, spec.geo, spec.spatial = "point", geo, live
            for i in live:
                spec.direct[i] = self.nodes[i].geo == geo
                if not spec.direct[i]:
                    self.nodes[i].cached = True
        for n in nodes:  # a full node reads the whole kept map of an incremental input
            if self.nodes[n].kind in ("full",) or n.op == "output":
                for i in n.all_input_nodes:
                    if self.nodes[i].kind in ("input", "stencil", "point"):
                        self.nodes[i].cached = True
        self.order = [self.nodes[n] for n in nodes]
        self.incremental = [s for s in self.order if s.kind in ("stencil", "point")]
        self.rest = [s for s in self.order if s.kind in ("full", "const") and s.node.op != "output"]
        self.cached = [s for s in self.order if s.cached]
        # the longest run of offsets a step indexes with: map sides, windows with their halos
        self.input_side = max([h, w] + [max(s.geo.h, s.geo.w) for s in self.incremental]
                              + [max(s.stencil.span(s.geo.n)) for s in self.incremental if s.kind == "stencil"])
        if not any(s.kind == "stencil" for s in self.incremental):
            first = next((s for s in self.order if s.kind == "full" and len(self.shapes.get(s.node, ((),))[0]) == 4
                          and s.node.op != "output"), None)
            where = f"{_describe(first.node, modules)}: {first.why}" if first is not None else "no 4-D activation"
            raise Unsupported(f"no layer of {type(gm).__name__} can run incrementally; the first one computed "
                              f"in full is {where}")
        self.bytes_per_image = sum(s.channels * s.geo.h * s.geo.w * torch.empty((), dtype=s.dtype).element_size()
                                   for s in self.cached)

    def _broadcast_only(self, n: fx.Node, depends: set, shapes: dict) -> bool:
        """Whether every operand of ``n`` outside the incremental inputs is spatially constant."""
        ok = True

        def check(a):
            nonlocal ok
            if a in depends:
                return a
            sh = shapes.get(a)
            if sh is not None and len(sh[0]) >= 2 and (sh[0][-1] != 1 or sh[0][-2] != 1):
                ok = False  # a constant varying over space: windows would need its slice
            return a

        fx.node.map_arg((n.args, n.kwargs), check)
        return ok

    def summary(self) -> str:
        """``k of n layers incremental``: how far the incremental part reaches."""
        ops = [s for s in self.order if s.kind not in ("input", "const") and s.node.op != "output"]
        return f"{len(self.incremental)} of {len(ops)} operations incremental"

    # ------------------------------------------------------------------------------------ runs
    def _eval(self, spec: _Node, env: dict) -> Any:
        args, kwargs = fx.node.map_arg((spec.node.args, spec.node.kwargs), lambda a: env[a])
        return spec.call(*args, **kwargs)

    def _run_full(self, env: dict, x: Tensor, record: dict | None = None) -> dict:
        env[self.input] = x
        for spec in (self.nodes[n] for n in self.gm.graph.nodes):
            if spec.node.op in ("placeholder", "output"):
                continue
            value = self._eval(spec, env)
            env[spec.node] = value
            if record is not None:
                record[spec.node] = ((tuple(value.shape), value.dtype) if isinstance(value, Tensor)
                                     else ((), None))
        out = self.output.args[0]
        env[self.output] = env[out] if isinstance(out, fx.Node) else out
        return env

    def allocate(self, images: int, device: torch.device) -> dict[fx.Node, Tensor]:
        """Kept activations of ``images`` images: flat NHWC rows after two sentinel rows (0, −inf)."""
        caches = {}
        for s in self.cached:
            t = torch.empty(2 + images * s.geo.h * s.geo.w, s.channels, device=device, dtype=s.dtype)
            t[0].zero_()
            t[1].fill_(float("-inf"))
            caches[s.node] = t
        return caches

    @staticmethod
    def view(cache: Tensor, g: int, h: int, w: int) -> Tensor:
        """The kept maps as a channels-last (G, C, H, W) tensor."""
        return cache[2:2 + g * h * w].view(g, h, w, -1).permute(0, 3, 1, 2)

    def start(self, caches: dict, x0: Tensor) -> Tensor:
        """Full forward of the clean images ``x0`` (G, C, H, W), keeping the activations; the output."""
        g = x0.shape[0]
        env = self._run_full({}, x0)
        for s in self.cached:
            self.view(caches[s.node], g, s.geo.h, s.geo.w).copy_(env[s.node])
        return env[self.output]

    def step(self, caches: dict, g: int, top: Tensor, left: Tensor, window_input: Callable[[Tensor, _Geo], Tensor]
             ) -> Tensor:
        """One step for ``g`` images whose new regions have top-left corners ``top``, ``left`` (G,).

        ``window_input(idx, geo)`` returns the new input inside the input node's window (flat rows
        ``idx`` of the kept input) as (G, C, n, n); it is pasted into the kept input here.
        """
        dev = top.device
        ar = self._arange(dev, max(g, self.input_side))
        wins: dict[fx.Node, Tensor] = {}
        starts: dict[_Geo, tuple[Tensor, Tensor]] = {}
        bases: dict[tuple[int, int], Tensor] = {}

        def base(h: int, w: int) -> Tensor:
            key = (h, w)
            if key not in bases:
                bases[key] = ar[:g] * (h * w) + 2
            return bases[key]

        def index(h, w, r0, c0, nh, nw, bounds: int | None) -> Tensor:
            rows = r0[:, None] + ar[:nh]  # (G, nh)
            cols = c0[:, None] + ar[:nw]  # (G, nw)
            idx = base(h, w)[:, None, None] + rows[:, :, None] * w + cols[:, None, :]
            if bounds is not None:
                ok = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
                idx = torch.where(ok, idx, bounds)
            return idx.view(-1)

        def start(geo: _Geo) -> tuple[Tensor, Tensor]:
            if geo not in starts:
                starts[geo] = geo.start(top, left)
            return starts[geo]

        def gather(node: fx.Node, idx: Tensor, nh: int, nw: int) -> Tensor:
            return caches[node].index_select(0, idx).view(g, nh, nw, -1).permute(0, 3, 1, 2)

        def paste(spec: _Node, value: Tensor) -> None:
            geo = spec.geo
            r0, c0 = start(geo)
            idx = index(geo.h, geo.w, r0, c0, geo.n[0], geo.n[1], None)
            caches[spec.node].index_copy_(0, idx, value.permute(0, 2, 3, 1).reshape(-1, spec.channels))

        geo0 = self.nodes[self.input].geo
        r0, c0 = start(geo0)
        wins[self.input] = window_input(index(geo0.h, geo0.w, r0, c0, geo0.n[0], geo0.n[1], None), geo0)
        for spec in self.incremental:
            geo = spec.geo
            r0, c0 = start(geo)
            if spec.kind == "stencil":
                st = spec.stencil
                src = spec.spatial[0]
                sg = self.nodes[src].geo
                nh, nw = st.span(geo.n)
                idx = index(sg.h, sg.w, r0 * st.s[0] - st.p[0], c0 * st.s[1] - st.p[1], nh, nw, st.fill)
                value = st.fn(gather(src, idx, nh, nw))
            else:
                env = {}
                for i in spec.spatial:
                    if spec.direct[i]:
                        env[i] = wins[i]
                    else:
                        ig = self.nodes[i].geo
                        env[i] = gather(i, index(ig.h, ig.w, r0, c0, geo.n[0], geo.n[1], None), geo.n[0], geo.n[1])
                value = self._eval_with(spec, env, caches, g)
            wins[spec.node] = value
            if spec.cached:
                paste(spec, value)
        env: dict[fx.Node, Any] = {}
        for spec in self.rest:
            for i in spec.node.all_input_nodes:
                if i not in env and self.nodes[i].kind in ("input", "stencil", "point"):
                    ig = self.nodes[i].geo
                    env[i] = self.view(caches[i], g, ig.h, ig.w)
            env[spec.node] = self._eval(spec, env)
        out = self.output.args[0]
        return env[out] if isinstance(out, fx.Node) else out

    def _eval_with(self, spec: _Node, env: dict, caches: dict, g: int) -> Any:
        def arg(a):
            if a in env:
                return env[a]
            return self._eval(self.nodes[a], {i: arg(i) for i in a.all_input_nodes})  # a constant
        args, kwargs = fx.node.map_arg((spec.node.args, spec.node.kwargs), arg)
        return spec.call(*args, **kwargs)

    _ARANGE: dict = {}

    def _arange(self, dev: torch.device, n: int) -> Tensor:
        """0, 1, …, at least ``n`` − 1 on ``dev`` (window offsets and image rows), made once per device."""
        key = str(dev)
        t = self._ARANGE.get(key)
        if t is None or t.numel() < n:
            t = torch.arange(max(n, 4096), device=dev)
            self._ARANGE[key] = t
        return t


# ------------------------------------------------------------------------------------------ plans
_PLANS = GraphCache()


def _graph_of(net: nn.Module) -> fx.GraphModule:
    if isinstance(net, fx.GraphModule):
        return net
    try:
        return trace(net, LayerTracer())
    except ValueError as err:
        raise Unsupported(str(err)) from err  # names the model and the line that stops the trace


def plan_for(net: nn.Module, example: Tensor, region_size: int, context: Callable[[], Any]) -> IncrementalPlan:
    """The cached :class:`IncrementalPlan` of ``net`` for inputs like ``example`` (1, C, H, W): per
    model as it is (a replaced module or tensor means a new plan) and per input shape, dtype,
    device, region size and autocast."""
    if any_hooks(net):
        raise Unsupported(f"{type(net).__name__} has module hooks, which windows of its layers would trigger")
    key = (tuple(example.shape[1:]), example.dtype, str(example.device), region_size, torch.is_autocast_enabled())
    plan = _PLANS.get(net, key)
    if plan is None:
        try:
            plan = IncrementalPlan(_graph_of(net), example[:1], region_size, context)
        except Unsupported as err:
            plan = err
        _PLANS.put(net, plan, key)
    if isinstance(plan, Unsupported):
        raise plan
    return plan


def cache_budget(device: torch.device) -> int:
    """Bytes the kept activations of one batch of images may take (:data:`CACHE_BYTES` on a CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(CACHE_BYTES // 4, min(4 * CACHE_BYTES, free // 4))
    return CACHE_BYTES


# ------------------------------------------------------------------------------------------ walks
def region_corners(pixel_step: Tensor, steps: int, region_size: int) -> tuple[Tensor, Tensor]:
    """Top-left corners (L, B) of each step's region, from ``pixel_step`` (B, H, W).

    Raises if a region spans more than ``region_size`` pixels in a direction (the windows are
    sized for it): a wrong window would be a wrong number.
    """
    b, h, w = pixel_step.shape
    dev = pixel_step.device
    idx = pixel_step.reshape(b, -1).long()
    rows = torch.arange(h, device=dev).repeat_interleave(w).expand(b, -1)
    cols = torch.arange(w, device=dev).repeat(h).expand(b, -1)

    def red(src: Tensor, init: int, how: str) -> Tensor:
        t = torch.full((b, steps + 2), init, device=dev, dtype=torch.long)
        return t.scatter_reduce_(1, idx, src, how)[:, 1:steps + 1]

    top, bottom = red(rows, h, "amin"), red(rows, -1, "amax")
    left, right = red(cols, w, "amin"), red(cols, -1, "amax")
    if bool(((bottom - top) >= region_size).any() or ((right - left) >= region_size).any()):
        raise RuntimeError("a region spans more than region_size pixels; incremental windows would miss it")
    return top.t().contiguous(), left.t().contiguous()


class CurveWalker:
    """Runs the steps 1..L of every image's curve incrementally, in batches of images.

    ``forward_out(out)`` turns the graph's output into scores as the engine does (precision,
    softmax); ``context()`` is the engine's inference/autocast context.
    """

    def __init__(self, plan: IncrementalPlan, x: Tensor, perturbation, steps: int, group: int,
                 context: Callable[[], Any], finish: Callable[[Tensor], Tensor],
                 progress: Callable[[int], Any] | None) -> None:
        self.plan, self.x, self.pert, self.steps, self.group = plan, x, perturbation, steps, group
        self.context, self.finish, self.progress = context, finish, progress
        b, c, h, w = x.shape
        self.x_rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # flat NHWC

    @staticmethod
    def group_size(plan: IncrementalPlan, images: int, device: torch.device) -> int:
        """Images walked together: as many as :func:`cache_budget` holds the kept activations of."""
        return max(1, min(images, cache_budget(device) // max(1, plan.bytes_per_image)))

    def run(self, state: Tensor, pixel_step: Tensor, scores: Tensor, target: Tensor, images=None,
            last_step: int | None = None) -> None:
        """Scores of steps 1..L into ``scores`` (L+1, B) for one repeat (``state`` (B, C, H, W))."""
        x, plan = self.x, self.plan
        b, c, h, w = x.shape
        steps = self.steps if last_step is None else last_step
        top_all, left_all = region_corners(pixel_step, self.steps, plan.region_size)
        s_rows = state.permute(0, 2, 3, 1).reshape(b * h * w, c)
        p_rows = pixel_step.reshape(-1)
        lo, hi = (0, b) if images is None else images
        with self.context():
            caches = plan.allocate(min(self.group, hi - lo), x.device)
            for b0 in range(lo, hi, self.group):
                b1 = min(hi, b0 + self.group)
                g = b1 - b0
                plan.start(caches, x[b0:b1])
                off = b0 * h * w - 2  # kept rows of image j start at 2 + j·H·W

                for k in range(1, steps + 1):
                    def window_input(idx: Tensor, geo: _Geo, k=k) -> Tensor:
                        rows = idx + off
                        n0, n1 = geo.n
                        xw = self.x_rows.index_select(0, rows).view(g, n0, n1, c).permute(0, 3, 1, 2)
                        sw = s_rows.index_select(0, rows).view(g, n0, n1, c).permute(0, 3, 1, 2)
                        mask = (p_rows.index_select(0, rows) <= k).to(x.dtype).view(g, n0, n1, 1).permute(0, 3, 1, 2)
                        new = self.pert.apply(xw, mask, sw)
                        caches[plan.input].index_copy_(0, idx, new.permute(0, 2, 3, 1).reshape(-1, c))
                        return new

                    out = plan.step(caches, g, top_all[k - 1, b0:b1], left_all[k - 1, b0:b1], window_input)
                    if self.progress is not None:
                        self.progress(g)
                    torch.gather(self.finish(out), 1, target[b0:b1, None], out=scores[k, b0:b1, None])


def setup(mode: str, net: nn.Module, x: Tensor, perturbation, state: Tensor, pixel_step: Tensor, *,
          steps: int, region_size: int, target: Tensor, batch_size: int, score_dtype: torch.dtype,
          context: Callable[[], Any], finish: Callable[[Tensor], Tensor], forward_full: Callable[[Tensor], Tensor],
          progress: Callable[[int], Any] | None) -> tuple[CurveWalker | None, str]:
    """A :class:`CurveWalker` for the engine's curves, or None, and what runs: ``incremental (…)`` or
    ``full (why)``.

    ``mode``: ``off`` never, ``on`` always (an :class:`Unsupported` error says why it cannot),
    ``auto`` where the one-time probe of :func:`check_and_probe` measures it faster. ``state`` and
    ``pixel_step`` are the first repeat's (the probe walks steps 1-4 of its first images).
    """
    if mode not in MODES:
        raise ValueError(f"incremental={mode!r} is not one of {MODES}")
    if mode == "off":
        return None, "full (incremental=off)"
    reason = local_step_reason(perturbation)
    try:
        if reason is not None:
            raise Unsupported(reason)
        plan = plan_for(net, x[:1], region_size, context)
    except Unsupported as err:
        if mode == "on":
            raise Unsupported(f"incremental=on: {err}; use incremental=auto or off") from err
        return None, f"full ({err})"
    group = CurveWalker.group_size(plan, x.shape[0], x.device)
    walker = CurveWalker(plan, x, perturbation, steps, group, context, finish, progress)
    chosen, ran = check_and_probe(plan, mode, walker, state, pixel_step, target, forward_full, batch_size,
                                  score_dtype)
    return (walker if chosen is not None else None), ran


_DECISIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: How many verdicts this process has asked rank 0 for (part of each one's key in the store).
_VERDICTS = itertools.count()


def shared_verdict(signature: str, mine: bool) -> tuple[bool, str]:
    """Rank 0's ``mine`` on every process of an initialised :mod:`torch.distributed` group (else ``mine``),
    and a note for the run's description (empty in one process).

    ``auto`` decides by a timing probe, which can come out differently on different processes of one
    evaluation (load, clocks, devices); every process must walk its curves the same way, or N
    processes would not give the numbers of one. The verdict goes through the group's key-value
    store, not a collective: rank 0 posts it and the others wait for it, so a process that scores no
    batch (and never asks) keeps nobody waiting. The processes ask in the same order (the same model,
    settings and explainers); the key holds the count of verdicts asked so far and ``signature``,
    so a process that asked about something else waits on a key rank 0 never sets until the group's
    timeout, an error, rather than taking another decision's verdict.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return mine, ""
    store = dist.distributed_c10d._get_default_store()
    key = f"heatmapbench/incremental/{next(_VERDICTS)}/{signature}"
    if dist.get_rank() == 0:
        store.set(key, "1" if mine else "0")
        return mine, f", shared with {dist.get_world_size() - 1} other processes"
    return store.get(key) == b"1", ", rank 0's verdict"


def check_and_probe(plan: IncrementalPlan, mode: str, walker: CurveWalker, state: Tensor, pixel_step: Tensor,
                    target: Tensor, forward_full: Callable[[Tensor], Tensor], bs: int, score_dtype: torch.dtype
                    ) -> tuple:
    """Once per plan and batch setting: incremental scores of steps 1..4 of the first images against
    full forwards of the same inputs; under ``auto`` also which is faster per image-step (the
    incremental steps after the first, which builds the kernels for the new shapes, against
    full forwards after a warm-up one).

    Returns (plan or None, what ran). A mismatch beyond float reassociation raises under ``on``
    and warns and runs full forwards under ``auto``. Decided once per plan (model and input shape),
    mode and engine batch size, whatever the number of images (a smaller last batch does not probe
    again); in a run of several processes ``auto`` takes rank 0's verdict (:func:`shared_verdict`).
    """
    x = walker.x
    b = x.shape[0]
    n = min(b, walker.group)
    k = min(4, walker.steps)
    key = (mode, bs, k, x.dtype)
    decided = _DECISIONS.setdefault(plan, {})
    if key in decided:
        return decided[key]
    scores = torch.zeros(k + 1, b, device=x.device, dtype=score_dtype)
    stamps: list[float] = []
    progress, walker.progress = walker.progress, lambda _: stamps.append(time.perf_counter())
    try:
        walker.run(state, pixel_step, scores, target, images=(0, n), last_step=k)
    finally:
        walker.progress = progress
    ks = torch.arange(1, k + 1, device=x.device).view(k, 1, 1, 1, 1)
    mask = (pixel_step[:n, None].unsqueeze(0) <= ks).to(x.dtype)  # (k, n, 1, H, W)
    inputs = walker.pert.apply(x[:n].unsqueeze(0), mask, state[:n].unsqueeze(0)).reshape(k * n, *x.shape[1:])
    forward_full(inputs[:min(bs, k * n)])  # warm-up
    t0 = time.perf_counter()
    want = torch.cat([forward_full(inputs[i:i + bs]) for i in range(0, k * n, bs)])
    t_full = (time.perf_counter() - t0) / (k * n)
    want = want.gather(1, target[:n].repeat(k)[:, None]).view(k, n).double()
    got = scores[1:, :n].double()
    rel = 1e-9 if x.dtype == torch.float64 and score_dtype == torch.float64 else \
        1e-4 if x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled() else 2e-2
    err = float((got - want).abs().max())
    tol = rel * (float(want.abs().max()) + 0.1)
    msg = (f"incremental forwards differ from full forwards by {err:.3g} (> {tol:.3g}) on "
           f"{type(plan.gm).__name__}; please report this model")
    if not err <= tol and mode == "on":
        raise RuntimeError(msg)
    speed = t_full * (k - 1) * n / max(stamps[-1] - stamps[0], 1e-9) if k >= 2 else float("nan")
    faster, note = True, ""
    if mode == "auto":  # every process asks, also where its own check failed, so that all ask alike
        signature = f"{tuple(x.shape[1:])}-{x.dtype}-{plan.region_size}-{bs}-{k}"
        faster, note = shared_verdict(signature, k >= 2 and (stamps[-1] - stamps[0]) / ((k - 1) * n) * 1.1 < t_full)
    if not err <= tol:
        warnings.warn(f"heatmapbench: {msg}; running full forwards", RuntimeWarning, stacklevel=3)
        result = (None, "full (the one-time check failed)")
    elif not faster:
        result = (None, f"full (probe: incremental {speed:.2f}x{note})")
    else:
        result = (plan, f"incremental ({plan.summary()}; probe {speed:.2f}x{note})")
    decided[key] = result
    return result
