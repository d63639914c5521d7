"""LRP on the model's data flow (explain/canonize/): exact where an identity exists, refused otherwise.

On a ReLU network, LRP-0 (eps -> 0) equals gradient x input (Ancona et al. 2018); in float64 the
identity holds to ~1e-9, so any rule that is missing or wrong (a functional add, a mean, a BatchNorm
folded into the wrong layer) shows up as an O(1) error. Models are random-weight, float64, with
randomised BatchNorm statistics so that folding is exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from heatmapbench.explain import LRP, get_explainer
from heatmapbench.explain.base import explaining
from heatmapbench.explain.canonize import canonize
from heatmapbench.testing import randomize_batch_norm

from tests.helpers import assert_same_snapshot, gradient_x_input, snapshot

torch.set_num_threads(2)


def bias_free(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data.zero_()
    return randomize_batch_norm(model, centred=True)


# --------------------------------------------------------------------------------------------
# hand-written functional-style nets (the styles that broke module-based canonization)


class FunctionalResNet(nn.Module):
    """``F.relu(bn2(conv2(...)) + x)`` residuals (``+``, ``torch.add``, ``+=``), ``x.mean((2, 3))`` pooling."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(y)) + x)
        z = self.conv3(x)
        z += x
        x = F.avg_pool2d(torch.add(torch.relu(z), x), 2)
        x = x * 0.5 - 0.1  # scaling and a constant shift
        return self.fc(x.mean((2, 3)))


class BatchNormFirst(nn.Module):
    """BatchNorm modules registered in ``__init__`` before the convs they follow."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 4)
        return self.head(torch.flatten(x, 1))


class DenseCat(nn.Module):
    """DenseNet-style ``torch.cat`` of features, pre-activation BatchNorm fed by the concatenation."""

    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(2 * width)
        self.conv_b = nn.Conv2d(2 * width, width, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(3 * width)
        self.fc = nn.Linear(3 * width, classes)

    def forward(self, x):
        x = self.conv0(x)
        a = self.conv_a(F.relu(self.bn_a(x)))
        ab = torch.cat([x, a], 1)
        b = self.conv_b(F.relu(self.bn_b(ab)))
        features = F.relu(self.bn_out(torch.cat((ab, b), dim=1)))
        pooled = F.adaptive_avg_pool2d(features, (1, 1)).view(features.size(0), -1)
        return self.fc(pooled[:, :])


class PreActivation(nn.Module):
    """Pre-activation residual block: BatchNorm -> ReLU -> conv, ``x.relu()`` / ``x.sum`` style."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn_final = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.conv0(x)
        out = self.conv1(self.bn1(x).relu())
        out = self.conv2(F.relu(self.bn2(out)))
        x = x + out
        x = self.bn_final(x).relu()
        return self.fc(x.sum(dim=(-2, -1)) / (x.shape[-1] * x.shape[-2]))


class SqueezeExcite(nn.Module):
    """A gate: ``x * sigmoid(fc(mean(x)))`` (squeeze-excitation)."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.squeeze = nn.Linear(width, width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.squeeze(x.mean((2, 3))))
        x = x * gate[:, :, None, None]
        return self.fc(x.mean((2, 3)))


HAND_WRITTEN = {
    "functional_resnet": FunctionalResNet,
    "batch_norm_first": BatchNormFirst,
    "dense_cat": DenseCat,
    "pre_activation": PreActivation,
}
TORCHVISION = {
    # (constructor, input side): the smallest side each net accepts (keeps the test fast)
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=5), 32),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 32),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=5), 32),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=5), 32),
    "googlenet": (lambda: torchvision.models.googlenet(num_classes=5, aux_logits=False, init_weights=True), 32),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(num_classes=5), 64),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name in HAND_WRITTEN:
        model, side = HAND_WRITTEN[name](), 16
    else:
        build, side = TORCHVISION[name]
        model = build()
    model = randomize_batch_norm(model).double().eval()
    x = torch.randn(2 if name in HAND_WRITTEN else 1, 3, side, side, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    return model, x


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


HEAVY = {"resnet50", "densenet121", "googlenet"}  # tens of seconds each on two cores: make test only


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in [*HAND_WRITTEN, *TORCHVISION]]
)
def test_lrp_zero_equals_gradient_times_input(name):
    model, x = make(name)
    target = torch.arange(len(x)) + 1
    reference = gradient_x_input(model, x, target)
    engines = ("fast", "zennit") if name in HAND_WRITTEN or name == "resnet18" else ("fast",)
    before = snapshot(model)
    for engine in engines:
        lrp = LRP(composite="epsilon", epsilon=1e-12, stabilizer=1e-12, engine=engine)
        with explaining(model):
            relevance = lrp.attribute(model, x.clone(), target).sum(1)
        assert relative_error(relevance, reference) <= 1e-8, (engine, relative_error(relevance, reference))
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():  # the canonized graph computes bit-identical outputs
        assert torch.equal(canonize(model)(x), model(x))


def test_without_the_graph_functional_nets_are_wrong():
    """The identity above has teeth: module-only LRP is far off on the hand-written nets."""
    for name in HAND_WRITTEN:
        model, x = make(name)
        target = torch.tensor([1, 2])
        lrp = LRP(composite="epsilon", epsilon=1e-12, stabilizer=1e-12, canonize=False, engine="zennit")
        with explaining(model):
            relevance = lrp.attribute(model, x.clone(), target).sum(1)
        assert relative_error(relevance, gradient_x_input(model, x, target)) > 1e-3, name


# --------------------------------------------------------------------------------------------
# alpha-beta and eps+flat: conservation and agreement with Zennit


@pytest.mark.parametrize("name", ["functional_resnet", "batch_norm_first", "dense_cat", "pre_activation", "resnet18"])
@pytest.mark.parametrize("composite", ["alpha_beta", "epsilon_plus_flat", "epsilon"])
def test_rules_conserve_relevance_without_biases(name, composite):
    """No bias anywhere (conv/linear biases 0, BatchNorm mean and shift 0, no constant shifts): then no
    relevance is absorbed, and the input relevance sums to the target score."""
    model, x = make(name)
    model = bias_free(model)
    if name == "functional_resnet":
        model.__class__ = NoShiftResNet  # the same net without its constant shift
    target = torch.tensor([1, 2][: len(x)])
    with torch.no_grad():
        score = model(x)[torch.arange(len(x)), target]
    heatmap = LRP(composite=composite, alpha=2.0, beta=1.0, epsilon=1e-12, stabilizer=1e-12,
                  engine="zennit")(model, x, target)
    torch.testing.assert_close(heatmap.double().sum((1, 2)), score, rtol=1e-5, atol=1e-6)


class NoShiftResNet(FunctionalResNet):
    def forward(self, x):
        return _no_shift_forward(self, x)


def _no_shift_forward(self, x):
    x = F.relu(self.bn0(self.stem(x)))
    y = F.relu(self.bn1(self.conv1(x)), inplace=True)
    x = F.relu(self.bn2(self.conv2(y)) + x)
    z = self.conv3(x)
    z += x
    x = F.avg_pool2d(torch.add(torch.relu(z), x), 2) * 0.5
    return self.fc(x.mean((2, 3)))


def zennit_reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite: str) -> torch.Tensor:
    """Zennit's own composites and canonizers, called as a Zennit user would (float64)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Linear

    canonizers = [ResNetCanonizer()] if isinstance(model, torchvision.models.ResNet) else [VGGCanonizer()]
    if composite == "alpha_beta":
        rules = layer_map_base(stabilizer=1e-12) + [(Linear, AlphaBeta(alpha=2.0, beta=1.0, stabilizer=1e-12))]
        chosen = LayerMapComposite(layer_map=rules, canonizers=canonizers)
    else:
        chosen = EpsilonPlusFlat(epsilon=1e-9, stabilizer=1e-12, canonizers=canonizers)
    with Gradient(model, chosen) as attributor:
        out, relevance = attributor(
            x, lambda o: torch.zeros_like(o).scatter(1, target[:, None], o.gather(1, target[:, None])))
    return relevance.sum(1)


@pytest.mark.parametrize("name", [pytest.param("vgg11_bn", marks=pytest.mark.slow), "resnet18"])
def test_alpha_beta_and_flat_agree_with_zennit(name):
    """Zennit folds BatchNorm with a drift of eps / 2 per layer; with eps ~ 0 it is exact, and its
    canonizers know these two nets, so both must agree with ours to float64 round-off."""
    model, x = make(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-300
    target = torch.tensor([3])
    for composite in ("alpha_beta", "epsilon_plus_flat"):
        ours = LRP(composite=composite, alpha=2.0, beta=1.0, epsilon=1e-9, stabilizer=1e-12, engine="zennit")
        with explaining(model):
            relevance = ours.attribute(model, x.clone(), target).sum(1)
        reference = zennit_reference(copy.deepcopy(model), x, target, composite)
        assert relative_error(relevance, reference) < 1e-8, composite


# --------------------------------------------------------------------------------------------
# refusals, gates, caching, deconvnet / guided backprop, the user's model untouched


def test_products_and_unknown_functions_are_refused_with_node_and_source_line():
    model = SqueezeExcite().eval()
    x, target = torch.randn(1, 3, 8, 8), torch.tensor([0])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"_operator.mul at graph node 'mul' \(.*test_canonize.py:\d+: "
                                         r"x = x \* gate\[:, :, None, None\]\): a product of two activations"):
        get_explainer("lrp_epsilon_0.01")(model, x, target)
    assert_same_snapshot(before, snapshot(model))

    class Sorted(nn.Module):
        def forward(self, x):
            return torch.sort(x.flatten(1), dim=1).values[:, :3]

    with pytest.raises(ValueError, match=r"torch.sort at graph node 'sort' .*return torch.sort.*no LRP rule"):
        get_explainer("lrp_alpha2_beta1")(Sorted(), x, target)

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x.flatten(1)[:, :3]
            return -x.flatten(1)[:, :3]

    with pytest.raises(ValueError, match=r"cannot trace it at .*test_canonize.py:\d+: if x.sum\(\) > 0:"):
        get_explainer("lrp_epsilon_0.01")(Branchy(), x, target)


def test_gate_as_constant_passes_relevance_to_the_signal():
    """``gates='constant'``: the sigmoid factor is a constant weight, so relevance is conserved
    through the gate (bias-free net) and no relevance reaches the gate's branch."""
    torch.manual_seed(0)
    model = bias_free(SqueezeExcite()).double().eval()
    x, target = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 3])
    with torch.no_grad():
        score = model(x)[torch.arange(2), target]
    heatmap = LRP(composite="epsilon", epsilon=1e-12, stabilizer=1e-12, gates="constant")(model, x, target)
    torch.testing.assert_close(heatmap.double().sum((1, 2)), score, rtol=1e-6, atol=1e-8)


def test_efficientnet_mobilenet_refused_or_gated_and_convnext_explained():
    torch.manual_seed(0)
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    x, target = torch.randn(1, 3, 32, 32), torch.tensor([1])
    with pytest.raises(ValueError, match=r"graph node 'mul' .*torchvision/ops/misc.py:\d+: return scale \* input"):
        get_explainer("lrp_epsilon_0.01")(mobilenet, x, target)
    # supported with gates="constant": bias-free, relevance is conserved through gates and Hardswish
    model = bias_free(mobilenet).double()
    x64 = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        score = model(x64)[0, 1]
    with explaining(model):
        heatmap = LRP(epsilon=1e-30, stabilizer=1e-30, gates="constant").attribute(model, x64.clone(), target)
    assert score != 0  # random init: a tiny score (1e-10), so eps must be far smaller; compared relatively
    torch.testing.assert_close(heatmap.double().sum(), score, rtol=1e-6, atol=0.0)
    assert "Hardswish: relevance passes unchanged (identity rule)" in canonize(mobilenet, gates="constant").rules_used
    # ConvNeXt's functional layer_norm gets the rule at constant std (test_transformers.py)
    convnext = torchvision.models.convnext_tiny(num_classes=5).eval()
    get_explainer("lrp_epsilon_0.01")(convnext, x, target)
    assert any("LayerNorm" in rule for rule in canonize(convnext).rules_used)


def test_cache_follows_weights_and_rebuilds_on_replaced_modules():
    model, x = make("functional_resnet")
    target = torch.tensor([1, 2])
    lrp = get_explainer("lrp_epsilon_0.01")
    first = lrp(model, x, target)
    graph = canonize(model)
    assert canonize(model) is graph  # canonized once
    with torch.no_grad():  # an optimiser step: in-place updates of conv weights and BatchNorm stats
        model.conv2.weight.mul_(1.5)
        model.bn0.running_var.add_(0.3)
    updated = lrp(model, x, target)
    assert canonize(model) is graph
    fresh = lrp(copy.deepcopy(model), x, target)  # a model never canonized
    assert not torch.allclose(first, updated)
    assert torch.equal(updated, fresh)
    model.fc = nn.Linear(8, 5).double()  # a replaced head: the graph must be rebuilt
    assert canonize(model) is not graph
    torch.testing.assert_close(lrp(model, x, target), lrp(copy.deepcopy(model), x, target))


class FunctionalCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.conv2(x).relu_()
        return self.fc(torch.flatten(x, 1))


def test_deconvnet_and_guided_backprop_see_functional_relus():
    """Same weights, written with modules: the functional net must give the same heatmaps."""
    torch.manual_seed(0)
    functional = FunctionalCNN().eval()
    modules = nn.Sequential(functional.conv1, nn.ReLU(), nn.MaxPool2d(2), functional.conv2, nn.ReLU(),
                            nn.Flatten(), functional.fc).eval()
    x, target = torch.randn(2, 3, 12, 12), torch.tensor([0, 3])
    for name in ("deconvnet_l2", "guided_backprop"):
        ours = get_explainer(name)(functional, x, target)
        reference = get_explainer(name)(modules, x, target)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(ours, get_explainer("sensitivity_l2")(functional, x, target))
