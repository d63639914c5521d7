"""Layout and precision: the same results as the contiguous fp32 path, and the model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heatmapbench.models import SmallCNN, VGGSmall
from heatmapbench.perturbation import region_perturbation
from heatmapbench.accel.layout import channels_last, uses_channels_last
from heatmapbench.accel.precision import check_precision


def snapshot(model: nn.Module) -> list[tuple]:
    """Everything that must survive: identity, storage, strides, values, flags and gradients."""
    rows = []
    for name, p in model.named_parameters():
        rows.append((name, id(p), p.data_ptr(), p.stride(), p.detach().clone(), p.requires_grad,
                     None if p.grad is None else p.grad.data_ptr()))
    for name, b in model.named_buffers():
        rows.append((name, id(b), b.data_ptr(), b.stride(), b.clone(), False, None))
    return rows


def assert_same(before: list[tuple], model: nn.Module) -> None:
    after = snapshot(model)
    assert [r[:4] + r[5:] for r in before] == [r[:4] + r[5:] for r in after]
    for b, a in zip(before, after):
        assert torch.equal(b[4], a[4]), b[0]


def vgg() -> nn.Module:
    torch.manual_seed(0)
    net = VGGSmall(width=4, hidden=16)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    net.train()
    net[0].weight.grad = torch.ones_like(net[0].weight)  # a gradient left over from training
    return net


def test_channels_last_converts_and_restores_exactly():
    net = vgg()
    before = snapshot(net)
    conv = net[0]
    with channels_last(net):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        assert id(conv.weight) == before[0][1]  # the same Parameter object
        with channels_last(net):  # nesting leaves the outer conversion alone
            pass
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(before, net)
    with pytest.raises(RuntimeError, match="boom"):
        with channels_last(net):
            raise RuntimeError("boom")
    assert_same(before, net)
    assert net.training and conv.weight.is_contiguous()


def test_uses_channels_last():
    assert uses_channels_last(SmallCNN())
    assert not uses_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert not uses_channels_last(SmallCNN(), "contiguous")
    with pytest.raises(ValueError, match="layout='nhwc' is invalid"):
        uses_channels_last(SmallCNN(), "nhwc")


@pytest.mark.parametrize("perturbation, order", [("uniform", "random"), ("blur", "morf")])
def test_engine_channels_last_matches_contiguous(perturbation, order):
    net = vgg()
    before = snapshot(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    heat = torch.rand(4, 32, 32, generator=g)
    kw = dict(region_size=8, steps=10, order=order, perturbation=perturbation, repeats=2, batch_size=15,
              mean=[0.5] * 3, std=[0.25] * 3)
    seen = []  # the layout the first convolution ran in: (weight, input) channels_last?
    cl = torch.channels_last
    hook = net[0].register_forward_pre_hook(
        lambda m, args: seen.append((m.weight.is_contiguous(memory_format=cl),
                                     args[0].is_contiguous(memory_format=cl))))
    ref = region_perturbation(net, x, heat, layout="contiguous", **kw)
    assert set(seen) == {(False, False)}
    assert_same(before, net)
    seen.clear()
    fast = region_perturbation(net, x, heat, layout="auto", **kw)
    assert set(seen) == {(True, True)}
    hook.remove()
    assert_same(before, net)
    assert torch.equal(ref.order, fast.order) and torch.equal(ref.target, fast.target)
    # reassociation inside the convolutions only: far below any AOPC difference that matters
    torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-5, atol=1e-5)


def test_engine_restores_model_on_error():
    net = vgg()
    before = snapshot(net)
    calls = {"n": 0}

    def fail_on_second(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("model failed")

    handle = net.register_forward_pre_hook(fail_on_second)
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            region_perturbation(net, torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32), region_size=8, steps=4)
    finally:
        handle.remove()
    assert_same(before, net)


def test_precision_bf16_close_to_fp32_and_fp16_refused_on_cpu():
    net = vgg()
    x = torch.randn(4, 3, 32, 32)
    heat = torch.rand(4, 32, 32)
    kw = dict(region_size=4, steps=16, perturbation="uniform")
    ref = region_perturbation(net, x, heat, **kw)
    low = region_perturbation(net, x, heat, precision="bf16", **kw)
    assert low.scores.dtype == torch.float32
    assert not torch.equal(low.scores, ref.scores)  # autocast did run in bf16
    # bf16 keeps 8 bits of mantissa: logits agree to ~1e-2 of their scale
    torch.testing.assert_close(low.scores, ref.scores, rtol=0.05, atol=0.05 * float(ref.scores.abs().max()))
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        region_perturbation(net, x, heat, precision="fp16", **kw)
    with pytest.raises(ValueError, match="precision='fp64' is invalid"):
        region_perturbation(net, x, heat, precision="fp64", **kw)
    assert check_precision("fp16", "cuda") == "fp16"
    with pytest.raises(ValueError, match="precision='tf32' needs a CUDA device"):
        region_perturbation(net, x, heat, precision="tf32", **kw)


def _cuda_fp32_switches() -> tuple:
    b = torch.backends
    return b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision


def test_fp32_means_ieee_on_cuda_and_tf32_is_asked_for():
    """PyTorch runs CUDA float32 convolutions in TF32 unless told otherwise: precision=fp32 turns
    that off for the passes (the reference stays IEEE float32), tf32 turns it on, and both put the
    user's switches back afterwards, also on error. Only flags are read: no GPU needed."""
    from heatmapbench.accel.precision import autocast

    before = _cuda_fp32_switches()
    with autocast("fp32", "cuda"):
        assert _cuda_fp32_switches() == ("ieee", "ieee", "ieee")
    assert _cuda_fp32_switches() == before
    with autocast("tf32", "cuda"):
        assert _cuda_fp32_switches() == ("tf32", "tf32", "tf32")
    assert _cuda_fp32_switches() == before
    with pytest.raises(RuntimeError, match="boom"):
        with autocast("fp32", "cuda"):
            raise RuntimeError("boom")
    assert _cuda_fp32_switches() == before
    with autocast("fp32", "cpu"):  # nothing to switch on a CPU
        assert _cuda_fp32_switches() == before


# --------------------------------------------------------------------------- the evaluation level
def evaluate(net, x, settings, **kw):
    from heatmapbench.evaluation import build_explainers, evaluate_batch
    from heatmapbench.perturbation import Uniform

    torch.manual_seed(0)  # smoothgrad's noise comes from the global generator
    return evaluate_batch(net, x, build_explainers(settings.explainers), settings, Uniform(),
                          gallery_size=x.shape[0], **kw)


def first_conv_layouts(net: nn.Module) -> tuple[list[bool], object]:
    """Whether each call of the first convolution returned an NHWC tensor (the layout its kernel ran in)."""
    seen: list[bool] = []
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))

    def hook(module, args, out):  # out has several channels: NHWC and NCHW strides differ
        seen.append(out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
    return seen, conv.register_forward_hook(hook)


@pytest.mark.parametrize("channels", [3, 1])
def test_evaluation_channels_last_matches_contiguous_for_every_explainer(channels):
    """Every explainer and the engine in channels_last give the contiguous path's heatmaps and curves.

    In float64, so that reassociation inside the convolutions cannot flip a ReLU near its kink
    (in float32 that moves a few pixels of integrated gradients/SmoothGrad by ~1e-3 of the maximum).
    One input channel (grey images) is a case of its own: NCHW and NHWC are then the same memory,
    and unless the strides say NHWC the convolutions run NCHW."""
    from heatmapbench.evaluation import EvaluationSettings
    from heatmapbench.registry import available

    if channels == 3:
        net = vgg().double()
    else:
        torch.manual_seed(0)
        net = SmallCNN(in_channels=1, width=4, hidden=16, image_size=32).double()
    before = snapshot(net)
    x = torch.randn(3, channels, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    names = available("explainer")
    common = dict(explainers=names, region_size=8, steps=6, random_repeats=2, complexity=False)
    seen, hook = first_conv_layouts(net)
    ref = evaluate(net, x, EvaluationSettings(layout="contiguous", **common))
    assert seen and not any(seen)
    assert_same(before, net)
    seen.clear()
    fast = evaluate(net, x, EvaluationSettings(layout="channels_last", **common))
    assert seen and all(seen)  # every forward, the engine's and the explainers', ran NHWC
    hook.remove()
    assert_same(before, net)
    assert net.training  # eval mode was undone as well
    torch.testing.assert_close(fast.random_curves, ref.random_curves, rtol=1e-9, atol=1e-9)
    for name in names:
        # heatmaps are float32 (the explainers' output type): equal to float32 rounding
        torch.testing.assert_close(fast.gallery_heatmaps[name], ref.gallery_heatmaps[name],
                                   rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(fast.curves[name]["morf"], ref.curves[name]["morf"], rtol=1e-9, atol=1e-9,
                                   msg=name)


def test_evaluation_bf16_runs_every_explainer_and_fp16_is_refused_on_cpu():
    from heatmapbench.app.schema import ConfigError, config_error
    from heatmapbench.evaluation import EvaluationSettings
    from heatmapbench.registry import available

    net = vgg()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    common = dict(explainers=available("explainer"), region_size=8, steps=6, random_repeats=2, complexity=False)
    ref = evaluate(net, x, EvaluationSettings(**common))
    low = evaluate(net, x, EvaluationSettings(precision="bf16", **common))
    for name in low.explainers:
        heat = low.gallery_heatmaps[name]
        assert heat.dtype == torch.float32 and bool(torch.isfinite(heat).all()), name
        assert low.curves[name]["morf"].dtype == torch.float32
    scale = float(ref.random_curves.abs().max()) + 1.0
    torch.testing.assert_close(low.random_curves, ref.random_curves, rtol=0.05, atol=0.05 * scale)
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        evaluate(net, x, EvaluationSettings(precision="fp16", **common))
    with pytest.raises(ValueError, match="precision='fp8' is invalid") as err:  # the library names its argument
        EvaluationSettings(precision="fp8")
    assert str(config_error("evaluation", err.value)).startswith("evaluation.precision='fp8' is invalid")  # the app
    with pytest.raises(ValueError, match="layout='nchw' is invalid") as err:
        EvaluationSettings(layout="nchw")
    assert isinstance(config_error("evaluation", err.value), ConfigError)
