"""The torch.fx toolkit (heatmapbench.fxgraph) that fusion, LRP canonization and incremental forwards share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from heatmapbench import fxgraph
from heatmapbench.accel.fusion import FusedConv, fused
from heatmapbench.explain.canonize import FoldedLinear, canonize
from heatmapbench.testing import randomize_batch_norm


class SamePadConv(nn.Conv2d):
    """A "same" convolution of stride 2 as EfficientNet-Lite writes it: an asymmetric zero pad, then F.conv2d."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3, stride=2, bias=False)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """A computed (standardised) weight: not a plain convolution."""

    def forward(self, x):
        return F.conv2d(x, self.weight - self.weight.mean(), self.bias)


class ConstantShift(nn.Module):
    """conv, BatchNorm, then a tensor constant made in the forward (torch.fx stores it on the traced root)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.tensor([0.5], dtype=torch.float64)


class Refolds(fxgraph.Refolding):
    """Folded from one source tensor; counts its folds."""

    def __init__(self, source: torch.Tensor) -> None:
        super().__init__()
        self._source = (source,)
        self.folds = 0

    def fold_sources(self):
        return self._source

    def refold(self):
        self.folds += 1


def test_fusion_and_lrp_fold_a_batch_norm_the_same_way():
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(4 * 36, 2))).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused_conv = next(m for m in fused(model, x[:1]).modules() if isinstance(m, FusedConv))
    lrp_conv = next(m for m in canonize(model).modules() if isinstance(m, FoldedLinear))
    lrp_conv.refresh()
    weight, bias = fused_conv.folded()
    assert torch.equal(weight, lrp_conv.weight) and torch.equal(bias, lrp_conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, weight, bias), model[1](model[0](x)), rtol=1e-12, atol=1e-12)


def test_the_cache_refolds_what_it_hands_out_and_rebuilds_for_a_replaced_tensor():
    cache = fxgraph.GraphCache()
    model = nn.Linear(2, 2)
    graph = nn.Sequential(Refolds(model.weight))
    assert cache.put(model, graph, key="lrp") is graph
    graph[0].refresh()
    graph[0].refresh()
    assert graph[0].folds == 1  # nothing changed
    model.weight.data.mul_(2)  # through .data: no version counter records it
    graph[0].refresh()
    assert graph[0].folds == 1
    assert cache.get(model, "lrp") is graph  # handed out again: marked to refold
    graph[0].refresh()
    assert graph[0].folds == 2
    with torch.no_grad():
        model.weight.mul_(2)  # in place: the version counter moves
    graph[0].refresh()
    assert graph[0].folds == 3
    assert cache.get(model, "gradient", default="none") == "none"
    model.weight = nn.Parameter(torch.zeros(2, 2))  # a replaced tensor: built again
    assert cache.get(model, "lrp") is None


def test_traces_leave_the_model_as_it_was():
    """A tensor constant is stored on the traced root; the user's model must not keep it."""
    torch.manual_seed(0)
    model = randomize_batch_norm(ConstantShift()).eval().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    names = set(vars(model))
    graph = fused(model, x[:1])
    assert isinstance(graph, fx.GraphModule) and any(isinstance(m, FusedConv) for m in graph.modules())
    canonical = canonize(model)
    assert set(vars(model)) == names
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-12, atol=1e-12)
        assert torch.equal(canonical(x), model(x))


def test_a_same_padding_conv_is_read_as_its_pad_and_convolution():
    conv = SamePadConv()
    parts = fxgraph.conv_subclass(conv)
    assert parts is not None
    call, pad, modules = parts
    assert call[0] is F.conv2d and call[1] is conv.weight and call[2] is None and call[3] == (2, 2)
    assert fxgraph.zero_pad_amounts(pad, modules) == (0, 1, 0, 1)
    assert fxgraph.symmetric_zero_pad(pad, modules, 2) is None  # asymmetric: stays a pad
    assert fxgraph.conv_subclass(nn.Conv2d(3, 4, 3)) is None  # a plain convolution is no subclass
    assert fxgraph.conv_subclass(StdConv(3, 4, 3)) is None
    # LRP's leaves keep the subclass whole; a plain trace goes through it
    assert [n.op for n in fxgraph.trace(nn.Sequential(conv), fxgraph.LayerTracer()).graph.nodes] == [
        "placeholder", "call_module", "output"]
    assert "call_function" in {n.op for n in fxgraph.trace(nn.Sequential(conv), bind_defaults=False).graph.nodes}


def test_a_trace_error_names_the_line_that_stops_it():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(fxgraph.TraceError, match=r"cannot trace Branchy at .*test_fxgraph.py:\d+: if x.sum\(\) > 0:"):
        fxgraph.trace(Branchy(), fxgraph.LayerTracer(), example=torch.zeros(1, 3))
