"""Incremental curve walks equal full recomputation (float64 to 1e-10), and refuse what they cannot do."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from heatmapbench.perturbation import incremental as inc
from heatmapbench.perturbation import region_perturbation

REL = 1e-10


def _randomize(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a wrong fold would show
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.double().eval()


def vgg_style() -> nn.Module:
    """Convolutions of every kind the window arithmetic distinguishes, and each pooling."""
    torch.manual_seed(0)
    return _randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(8, 12, 5, padding=2, stride=2), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3), nn.ReLU6(),
        nn.AvgPool2d(2), nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)))


class _SamePad(nn.Conv2d):
    """TensorFlow-style "same" convolution: an asymmetric zero pad, then the convolution."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        total = max(k - stride, 0)
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(_SamePad(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU6())
        self.depthwise = nn.Sequential(_SamePad(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid), nn.ReLU6())
        self.project = nn.Sequential(_SamePad(mid, cout, 1), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return y + x if self.residual else y


class Lite0Style(nn.Module):
    """EfficientNet-Lite0's pattern: same-padded stride-2 stem, inverted residuals with depthwise
    convolutions and ReLU6, no squeeze-excitation, global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_SamePad(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(_MBConv(8, 8, 1), _MBConv(8, 12, 2), _MBConv(12, 12, 1))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_style() -> nn.Module:
    """ResNet50's stem and torchvision's own Bottleneck blocks (``out += identity``), narrow."""
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    net = nn.Sequential(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                        nn.MaxPool2d(3, stride=2, padding=1), Bottleneck(16, 4), Bottleneck(16, 8, stride=2, downsample=down),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    return _randomize(net)


def densenet_style() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                                  bn_size=2, num_classes=5))


def lite0_style() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(Lite0Style())


NETS = {"vgg": (vgg_style, 32), "resnet": (resnet_style, 40), "densenet": (densenet_style, 32),
        "lite0": (lite0_style, 32)}


def _pair(net, size, *, b=3, p=4, steps=6, order="morf", regions="grid", perturbation="uniform", repeats=2,
          fuse=True, dtype=torch.float64, batch_size=3, **kw):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, size, size, generator=g, dtype=dtype)
    hm = torch.randn(b, size, size, generator=g, dtype=dtype)
    args = dict(region_size=p, steps=steps, order=order, regions=regions, perturbation=perturbation,
                repeats=repeats, seed=4, batch_size=batch_size, fuse=fuse, **kw)
    net = net.to(dtype)
    return (region_perturbation(net, x, hm, incremental="off", **args),
            region_perturbation(net, x, hm, incremental="on", **args))


def _rel(full, fast) -> float:
    return float((fast.scores - full.scores).abs().max() / full.scores.abs().max())


@pytest.fixture
def small_groups(monkeypatch):
    """Kept activations for two images at a time: groups of 2 and 1 over a batch of 3."""
    monkeypatch.setattr(inc.CurveWalker, "group_size", staticmethod(lambda plan, b, device: min(b, 2)))


@pytest.mark.parametrize("name,fuse", [("vgg", True), ("resnet", True), ("densenet", True), ("lite0", True),
                                       ("lite0", False)])
def test_nets_equal_full_forwards_float64(name, fuse, small_groups):
    make, size = NETS[name]
    full, fast = _pair(make(), size, fuse=fuse)
    assert fast.settings["incremental"].startswith("incremental"), fast.settings["incremental"]
    assert _rel(full, fast) <= REL
    assert torch.equal(full.order, fast.order)


@pytest.mark.parametrize("order,regions", list(itertools.product(["morf", "lerf", "random"], ["grid", "sliding"])))
def test_every_order_and_region_mode(order, regions, small_groups):
    full, fast = _pair(vgg_style(), 32, order=order, regions=regions, p=5, steps=7, batch_size=4)
    assert fast.settings["incremental"].startswith("incremental")
    assert _rel(full, fast) <= REL


@pytest.mark.parametrize("perturbation", ["mean", "constant", "blur"])
def test_local_perturbations(perturbation):
    full, fast = _pair(vgg_style(), 24, perturbation=perturbation, regions="sliding", p=5, steps=4, repeats=1)
    assert _rel(full, fast) <= REL


def test_border_tiles_and_one_group():
    # 37 = 3·12 + 1: tiles of one pixel's width at the right and bottom; every tile; one group
    full, fast = _pair(vgg_style(), 37, p=12, steps=16, repeats=1, order="lerf")
    assert _rel(full, fast) <= REL


def test_float32_within_the_layout_tolerance():
    full, fast = _pair(resnet_style(), 40, dtype=torch.float32, steps=5, repeats=1)
    torch.testing.assert_close(fast.scores, full.scores, rtol=1e-5, atol=1e-5)


def test_probability_scores_and_progress_count_every_input():
    counts = {"off": 0, "on": 0}
    net, x = vgg_style(), torch.rand(3, 3, 32, 32, dtype=torch.float64)
    hm = torch.randn(3, 32, 32, dtype=torch.float64)
    res = {}
    for mode in counts:
        def progress(n, mode=mode):
            counts[mode] += n
        res[mode] = region_perturbation(net, x, hm, region_size=4, steps=7, score="probability", repeats=2,
                                        incremental=mode, progress=progress)
    assert counts["on"] == counts["off"] >= 3 * (1 + 7 * 2)  # the clean forward, then every image-step
    assert _rel(res["off"], res["on"]) <= REL


def test_unknown_operation_ends_the_incremental_part():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64 * 64, 3)).double().eval()
    full, fast = _pair(net, 32, steps=5, repeats=1)
    assert "2 of 6" in fast.settings["incremental"]  # conv and ReLU; the upsampling and after run in full
    assert _rel(full, fast) <= REL


def test_refusals_name_the_reason():
    torch.manual_seed(0)
    first_unknown = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(3, 4, 3), nn.Flatten(),
                                  nn.Linear(4 * 18 * 18, 3)).double().eval()
    x, hm = torch.rand(2, 3, 10, 10, dtype=torch.float64), torch.randn(2, 10, 10, dtype=torch.float64)
    with pytest.raises(inc.Unsupported, match=r"incremental=on: no layer .*0 \(Upsample\): not a known local operation"):
        region_perturbation(first_unknown, x, hm, region_size=3, steps=2, incremental="on")
    res = region_perturbation(first_unknown, x, hm, region_size=3, steps=2, incremental="auto")
    assert res.settings["incremental"].startswith("full (no layer")
    net = vgg_style()
    with pytest.raises(ValueError, match="incremental=on: road: each step rebuilds"):
        region_perturbation(net, x, hm, region_size=3, steps=2, perturbation="road", incremental="on")
    res = region_perturbation(net, x, hm, region_size=3, steps=2, perturbation="road", incremental="auto")
    assert res.settings["incremental"].startswith("full (road")
    with pytest.raises(ValueError, match="incremental='yes'"):
        region_perturbation(net, x, hm, region_size=3, steps=2, incremental="yes")


def test_one_time_check_catches_a_wrong_window(monkeypatch):
    # negative control: windows without their receptive-field reach miss changed outputs
    real = inc._Stencil.geo

    def too_small(self, src, h, w, p):
        geo = real(self, src, h, w, p)
        return inc._Geo.make(h, w, geo.s, (0, 0), (0, 0), 1)

    monkeypatch.setattr(inc._Stencil, "geo", too_small)
    net = vgg_style()
    g = torch.Generator().manual_seed(0)
    x, hm = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64), torch.randn(2, 24, 24, generator=g)
    with pytest.raises(RuntimeError, match="differ from full forwards"):
        region_perturbation(net, x, hm.double(), region_size=3, steps=4, incremental="on")
    with pytest.warns(RuntimeWarning, match="running full forwards"):
        res = region_perturbation(net, x, hm.double(), region_size=3, steps=4, incremental="auto")
    assert res.settings["incremental"] == "full (the one-time check failed)"


def test_kept_activations_set_the_group(monkeypatch):
    torch.manual_seed(0)
    h = w = 12
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, 3)).double()
    x = torch.rand(1, 3, h, w, dtype=torch.float64)
    plan = inc.plan_for(net.eval(), x, 3, torch.inference_mode)
    # the input (read by the convolution) and the ReLU (read in full by Flatten); the convolution's
    # output goes to the ReLU as a window and is not kept
    assert plan.bytes_per_image == (3 + 4) * h * w * 8
    monkeypatch.setattr(inc, "cache_budget", lambda device: 5 * plan.bytes_per_image + 1)
    assert inc.CurveWalker.group_size(plan, 64, x.device) == 5
    assert inc.CurveWalker.group_size(plan, 3, x.device) == 3


def test_config_switch():
    from heatmapbench.evaluation.settings import EvaluationSettings

    assert EvaluationSettings().engine_kwargs()["incremental"] == "off"
    assert EvaluationSettings(incremental="auto").engine_kwargs()["incremental"] == "auto"
    with pytest.raises(ValueError, match="incremental='yes' is invalid"):
        EvaluationSettings(incremental="yes")


# -- auto: one verdict per model, rank 0's in a run of several processes --------------------------------
class _Clock:
    """``time.perf_counter`` of the probe: the incremental steps' stamps, then the full forwards' start and end."""

    def __init__(self, *values: float) -> None:
        self.values = iter(values)

    def perf_counter(self) -> float:
        return next(self.values)


FAST = (0.0, 1e-3, 2e-3, 3e-3, 3e-3, 100.0)  # incremental steps far faster than the full forwards
SLOW = (0.0, 1.0, 2.0, 3.0, 3.0, 3.0 + 1e-6)  # ... far slower


def _auto(clock: tuple[float, ...], images: int = 2):
    net = vgg_style()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(images, 3, 24, 24, generator=g, dtype=torch.float64)
    hm = torch.randn(images, 24, 24, generator=g, dtype=torch.float64)
    real, inc.time = inc.time, _Clock(*clock)
    try:
        first = region_perturbation(net, x, hm, region_size=3, steps=4, repeats=1, incremental="auto")
        # a smaller batch of the same model (a last batch) reuses the verdict: no probe (the clock is spent)
        again = region_perturbation(net, x[:1], hm[:1], region_size=3, steps=4, repeats=1, incremental="auto")
    finally:
        inc.time = real
    assert again.settings["incremental"] == first.settings["incremental"]
    return first


def test_auto_follows_its_probe_once_per_model():
    assert _auto(FAST).settings["incremental"].startswith("incremental (")
    assert _auto(SLOW).settings["incremental"].startswith("full (probe: incremental 0.00x)")


def _two_ranks(rank: int, init: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))  # a verdict never posted fails, not hangs
    try:
        # the probe comes out differently on the two processes, one way and then the other
        runs = [_auto(SLOW if rank == 0 else FAST), _auto(FAST if rank == 0 else SLOW)]
        torch.save([(r.settings["incremental"], r.scores) for r in runs], f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_auto_takes_rank_zeros_verdict_in_every_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    (ran0, scores0), (ran1, scores1) = zero[0], one[0]
    assert ran0.startswith("full (probe") and ran0.endswith(", shared with 1 other processes)")
    assert ran1.startswith("full (probe") and ran1.endswith(", rank 0's verdict)")  # its own probe said faster
    assert torch.equal(scores0, scores1)
    (ran0, scores0), (ran1, scores1) = zero[1], one[1]
    assert ran0.startswith("incremental (") and ran1.startswith("incremental (") and ran1.endswith("verdict)")
    assert torch.equal(scores0, scores1)


def test_shared_verdict_is_the_local_one_without_a_process_group():
    assert inc.shared_verdict("anything", True) == (True, "")
    assert inc.shared_verdict("anything", False) == (False, "")
