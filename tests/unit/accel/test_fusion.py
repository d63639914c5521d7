"""Inference-graph fusion (heatmapbench.accel.fusion): the same function, the user's model untouched, never a silent change."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heatmapbench.explain import get_explainer
from heatmapbench.accel.fusion import FusedConv, fused, fusion
from heatmapbench.perturbation import region_perturbation
from heatmapbench.accel.layout import channels_last
from heatmapbench.testing import randomize_batch_norm


class SamePadConv(nn.Conv2d):
    """A TensorFlow-style "same" convolution as EfficientNet-Lite writes it: a ZeroPad2d child, then F.conv2d."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(cin, cout, k, stride, groups=groups, bias=bias)
        total = k - stride if k > stride else 0  # for even input sizes
        self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight-standardised convolution: its weight is computed, so nothing may be folded into it."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    """Every pattern the rewrite folds, and the ones it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)                 # + BN (affine)        -> folded
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = SamePadConv(8, 8, 3, groups=8)                # pad (1,1,1,1) + BN   -> both folded
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = SamePadConv(8, 16, 3, stride=2)               # pad (0,1,0,1): kept; + BN folded
        self.b3 = nn.BatchNorm2d(16, affine=False)
        self.c4 = nn.Conv2d(16, 16, 3, bias=False)              # functional symmetric pad -> folded
        self.c5 = StdConv(16, 16, 1)                            # computed weight: BN kept
        self.b5 = nn.BatchNorm2d(16)
        self.c6 = nn.Conv2d(16, 16, 1)                          # two consumers: BN kept
        self.b6 = nn.BatchNorm2d(16)
        self.b7 = nn.BatchNorm2d(16)                            # after a ReLU: kept
        self.c1d = nn.Conv1d(16, 4, 3, padding=1)               # 1-D conv + BN1d      -> folded
        self.b1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        x = self.c4(F.pad(x, (1, 1, 1, 1)))
        x = self.b5(self.c5(x))
        y = self.c6(x)
        x = self.b6(y) + y
        x = self.b7(torch.relu(x))
        x = self.b1d(self.c1d(x.mean(2)))  # (B, 4, 8)
        return self.fc(torch.relu(x).flatten(1))


def net64() -> Net:
    torch.manual_seed(0)
    return randomize_batch_norm(Net()).eval().double()


def fused_names(graph: nn.Module) -> list[str]:
    return sorted(m.label for m in graph.modules() if isinstance(m, FusedConv))


def test_fused_graph_is_the_same_function_and_folds_exactly_the_foldable():
    net = net64()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modules = [(n, type(m)) for n, m in net.named_modules()]
    graph = fused(net, x[:1])
    assert graph is not net
    assert fused_names(graph) == ["c1 + b1", "c1d + b1d", "c2 + b2", "c3 + b3", "c4"]
    paddings = {m.label: m.padding for m in graph.modules() if isinstance(m, FusedConv)}
    assert paddings["c2 + b2"] == (1, 1) and paddings["c3 + b3"] == (0, 0) and paddings["c4"] == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), net(x), rtol=1e-12, atol=1e-12)
    # the asymmetric pad of the stride-2 conv stays a pad; the user's model is untouched
    assert sum(1 for n in graph.graph.nodes if n.op == "call_module" and n.target.endswith("pad")) == 1
    assert [(n, type(m)) for n, m in net.named_modules()] == modules
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert fused(net, x[:1]) is graph  # cached


def test_folded_weights_follow_in_place_updates_and_replaced_modules():
    net = net64()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    graph = fused(net, x[:1])
    with torch.no_grad():  # what an optimizer step and a training epoch's statistics do
        net.c1.weight.mul_(1.5)
        net.b1.running_var.add_(0.3)
        net.b2.running_mean.sub_(0.2)
        net.c1d.bias.add_(1.0)
        torch.testing.assert_close(graph(x), net(x), rtol=1e-12, atol=1e-12)
    net.c1 = nn.Conv2d(3, 8, 3, padding=1).double()  # a replaced module: a new graph
    again = fused(net, x[:1])
    assert again is not graph
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=1e-12, atol=1e-12)


def test_weights_changed_through_data_are_refolded_at_the_next_call():
    """``.data`` updates (old-style optimizers, EMA, hand-loaded weights) bump no version counter:
    every graph that :func:`fused` hands out refolds on its first use, and so does LRP's."""
    torch.manual_seed(0)
    seq = randomize_batch_norm(nn.Sequential(  # LRP-ready: modules only
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5))).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 2])
    graph = fused(seq, x[:1])
    sens, lrp = get_explainer("sensitivity_l2"), get_explainer("lrp_epsilon_0.01")
    before = (sens(seq, x, target), lrp(seq, x, target))
    seq[0].weight.data.mul_(-2.0)
    seq[4].running_var.data.add_(3.0)
    seq[1].weight.data.mul_(0.5)
    assert fused(seq, x[:1]) is graph  # the same graph, refolded
    with torch.no_grad():
        torch.testing.assert_close(graph(x), seq(x), rtol=1e-12, atol=1e-12)
    fresh = copy.deepcopy(seq)  # nothing cached for it
    for got, want, old in zip((sens(seq, x, target), lrp(seq, x, target)),
                              (sens(fresh, x, target), lrp(fresh, x, target)), before):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(got, old)


def test_the_model_itself_when_fusion_would_bypass_or_change_anything():
    net = net64()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with fusion(False):
        assert fused(net, x) is net
    handle = net.c1.register_forward_hook(lambda m, a, o: o * 2)  # a hook the graph would skip
    assert fused(net, x) is net
    handle.remove()
    assert fused(net, x) is not net
    net.train()
    assert fused(net, x) is net  # BatchNorm uses batch statistics in training
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert fused(plain.eval()) is plain  # nothing to fold

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                return self.b(self.c(x)).mean((2, 3))
            return self.c(x).mean((2, 3))

    branchy = Branchy().eval()
    assert fused(branchy, torch.randn(1, 3, 8, 8)) is branchy


def test_a_graph_that_disagrees_with_the_model_is_refused_with_a_warning(monkeypatch):
    net = net64()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    real = FusedConv.folded

    def wrong(self):  # a folding bug: the BatchNorm's shift dropped
        weight, bias = real(self)
        return weight, None if bias is None else torch.zeros_like(bias)

    monkeypatch.setattr(FusedConv, "folded", wrong)
    with pytest.warns(RuntimeWarning, match="fused graph of Net differs from the model"):
        assert fused(net, x) is net


@pytest.mark.parametrize("nan_in", ["one class", "every class"])
def test_nan_outputs_of_the_model_itself_are_named_as_the_models_not_a_fusion_difference(nan_in):
    net = net64()
    with torch.no_grad():
        net.fc.bias[slice(1, 2) if nan_in == "one class" else slice(None)] = float("nan")
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        graph = fused(net, x)
    ours = [str(w.message) for w in seen if str(w.message).startswith("heatmapbench:")]
    if nan_in == "one class":  # compared where the model is finite, NaN where it is NaN: the same function
        assert graph is not net and ours == []
        with torch.no_grad():
            torch.testing.assert_close(graph(x), net(x), equal_nan=True, rtol=0, atol=1e-12)
    else:  # nothing left to compare: the model's NaN is named, fusion is not blamed
        assert graph is net and len(ours) == 1
        assert ours[0].startswith("heatmapbench: Net outputs NaN or inf") and "differs" not in ours[0]


def test_channels_last_folded_weights_are_nhwc_also_for_one_input_channel():
    torch.manual_seed(0)
    net = randomize_batch_norm(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 64, 3))).eval()
    x = torch.randn(4, 1, 8, 8)
    graph = fused(net, x[:1])
    ref = net(x)
    with channels_last(net), torch.no_grad():
        xc = x.contiguous(memory_format=torch.channels_last)
        seen = []
        for m in graph.modules():
            if isinstance(m, FusedConv):
                m.register_forward_hook(lambda mod, a, out: seen.append(
                    (mod.folded()[0].stride(), out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())))
        out = graph(xc)
    assert seen == [((9, 1, 3, 1), True), ((8, 1, 8, 8), True)]  # explicit NHWC strides, NHWC outputs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), ref, rtol=1e-5, atol=1e-5)  # refolded in NCHW after the block


@pytest.mark.parametrize("name", ["sensitivity_l2", "gradient_x_input", "deconvnet_l2", "guided_backprop",
                                  "integrated_gradients"])
def test_explainers_on_the_fused_graph_equal_the_model_in_float64(name):
    net = net64()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 3, 4])
    explainer = get_explainer(name)
    assert explainer.fusable
    with fusion(False):
        ref = explainer(net, x, target)
    got = explainer(net, x, target)
    assert fused(net) is not net
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert not get_explainer("lrp_epsilon_0.01").fusable  # LRP rules hook the model's own layers


def test_engine_fused_matches_unfused_and_counts_forwards():
    torch.manual_seed(0)
    net = randomize_batch_norm(Net()).eval()
    x = torch.randn(3, 3, 16, 16)
    heat = torch.rand(3, 16, 16)
    counted = []
    kw = dict(region_size=4, steps=6, repeats=2, batch_size=7)
    ref = region_perturbation(net, x, heat, fuse=False, **kw)
    got = region_perturbation(net, x, heat, progress=counted.append, **kw)
    assert got.settings["fuse"] and not ref.settings["fuse"]
    assert sum(counted) == 3 + 2 * 6 * 3
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.order, ref.order)


def test_lite0_folds_every_batch_norm_and_the_symmetric_pads():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = randomize_batch_norm(EfficientNet.from_name("efficientnet-lite0")).eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = fused(net, x)
    folded = [m for m in graph.modules() if isinstance(m, FusedConv)]
    batch_norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(folded) == len(batch_norms) == 49
    assert not [m for m in graph.modules() if isinstance(m, nn.BatchNorm2d)]
    pads = [m for m in graph.modules() if isinstance(m, nn.ZeroPad2d)]
    assert len(pads) == 5 and all(len(set(p.padding)) == 2 for p in pads)  # the stride-2 ones stay
    copy_ = copy.deepcopy(net)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), copy_(x), rtol=1e-11, atol=1e-11)


def test_lrp_runs_same_padding_convolutions_as_plain_ones_with_the_same_relevance(monkeypatch):
    """LRP's canonical graph swaps a "same"-padding conv subclass (pad + F.conv2d) for a plain
    nn.Conv2d twin with the pad in its padding and the same Parameters; an asymmetric pad stays."""
    import heatmapbench.explain.canonize.rewriter as graph_module
    from heatmapbench.explain.canonize import canonize
    from heatmapbench.explain.canonize.layers import plain_conv_twin

    def build():
        torch.manual_seed(0)
        return randomize_batch_norm(nn.Sequential(
            SamePadConv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), SamePadConv(8, 8, 3, stride=2),
            nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))).eval().double()

    net, ref_net = build(), build()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 3])
    graph = canonize(net)
    convs = [m for m in graph.modules() if isinstance(m, nn.Conv2d)]
    assert [m.padding for m in convs] == [(1, 1), (0, 0)]
    assert [isinstance(m, SamePadConv) for m in convs] == [False, True]  # the asymmetric one is kept
    assert convs[0]._linear.weight is net[0].weight  # BatchNorm folded on top of the twin: the user's Parameter
    assert "zero padding folded into the convolution that follows it" in graph.rules_used
    with torch.no_grad():
        assert torch.equal(graph(x), net(x))
    with monkeypatch.context() as patch:  # the reference: the module as written, pad pass and all
        patch.setattr(graph_module, "plain_conv_twin", lambda module: None)
        assert "zero padding folded into the convolution that follows it" not in canonize(ref_net).rules_used
    for name in ("lrp_epsilon_0.01", "lrp_alpha2_beta1", "lrp_epsilon_plus_flat"):
        got, want = get_explainer(name)(net, x, target), get_explainer(name)(ref_net, x, target)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    hooked = build()
    hooked[0].register_forward_hook(lambda m, a, o: None)
    assert plain_conv_twin(hooked[0]) is None and plain_conv_twin(StdConv(3, 3, 1)) is None
