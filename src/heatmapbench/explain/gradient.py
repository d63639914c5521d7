"""Gradient-based heatmaps: sensitivity analysis, gradient x input, deconvnet, guided backprop.

All are one forward and one (possibly modified) backward pass of the pre-softmax target score.
The ReLU rules of deconvnet and guided backprop are Zennit's (``ReLUDeconvNet``,
``ReLUGuidedBackprop``); they are also applied to ``ReLU6`` (EfficientNet-Lite), where they read
the same: deconvnet rectifies the backward signal and ignores the forward pass, guided backprop
masks the ordinary gradient by its sign. Deconvnet is one autograd function per rectifier call
that replaces the rectifier's backward; guided backprop keeps the rectifier's native backward and
rectifies the gradient that reaches its output (one tensor hook, one clamp), so both passes cost
about what a plain gradient costs. Zennit's hooks clone every rectifier input and run Python
hooks on every gradient, which made both methods up to 1.5x slower than Captum's.
``tests/unit/explain/test_explainers.py`` proves the results equal to Zennit's rules and to Captum's
``Deconvolution`` / ``GuidedBackprop`` on ReLU networks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from zennit.types import Activation

from .base import Explainer, backprop
from .canonize import canonize

#: Activations the deconvnet / guided-backprop rules are defined for.
RECTIFIERS = (nn.ReLU, nn.ReLU6)


class _DeconvNetReLU(torch.autograd.Function):
    """Forward: the rectifier's output; backward: the rectified signal, ``max(g, 0)`` (Zennit's rule)."""

    @staticmethod
    def forward(ctx, x, box):
        return box[0]  # the module's own output, not an input: no copy, and no view of an input

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0), None


def _rectify(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


@contextmanager
def _hooked_rectifiers(model: nn.Module, pre=None, post=None) -> Iterator[None]:
    """Forward (pre-)hooks on every ``ReLU`` / ``ReLU6`` module of ``model``; removed on exit."""
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, RECTIFIERS):
                if pre is not None:
                    handles.append(module.register_forward_pre_hook(pre))
                if post is not None:
                    handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def deconvnet_rule(model: nn.Module) -> Iterator[None]:
    """Replace the backward of every ``ReLU`` / ``ReLU6`` module call by ``max(g, 0)``; undo on exit.

    The rectifier runs on a detached alias of its input (an in-place rectifier acts on it as it
    would on the input), and :class:`_DeconvNetReLU` links its output back to the input.
    """
    stash: dict[int, list[torch.Tensor]] = {}

    def pre(module, inputs):
        stash.setdefault(id(module), []).append(inputs[0])
        return (inputs[0].detach(), *inputs[1:])

    def post(module, inputs, output):
        return _DeconvNetReLU.apply(stash[id(module)].pop(), (output.detach(),))

    try:
        with _hooked_rectifiers(model, pre, post):
            yield
    finally:
        stash.clear()


@contextmanager
def guided_rule(model: nn.Module) -> Iterator[None]:
    """Guided backprop at every ``ReLU`` / ``ReLU6`` module call: the gradient reaching the
    rectifier's output is rectified, ``max(g, 0)``, and the rectifier's native backward then passes
    it where ``0 < x`` (``< 6`` for ReLU6) — Zennit's ``ReLUGuidedBackprop``. Undone on exit."""

    def post(module, inputs, output):
        if output.requires_grad:  # fires with the whole gradient of this output, summed over its uses
            output.register_hook(_rectify)
        return output

    with _hooked_rectifiers(model, post=post):
        yield


class Sensitivity(Explainer):
    """Sensitivity analysis, paper eq. 3: ``h_p = || (d f / d x_{p,c})_c ||_q``, q in {2, inf}.

    Parameters
    ----------
    pooling
        ``"l2"`` or ``"linf"`` for the paper's two variants (any of ``POOLINGS`` is accepted).
    """

    name = "sensitivity"
    fusable = True

    def __init__(self, pooling: str = "l2") -> None:
        super().__init__(pooling=pooling)

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return backprop(model, x, target)  # (B, C, H, W)


class GradientXInput(Explainer):
    """Gradient times input, ``x * d f / d x``, summed over colour channels by default."""

    name = "gradient_x_input"
    fusable = True

    def __init__(self, pooling: str = "sum") -> None:
        super().__init__(pooling=pooling)

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return x * backprop(model, x, target)  # (B, C, H, W)


class _RectifierRuleExplainer(Explainer):
    """A gradient whose ReLU / ReLU6 backward follows a rule (:func:`deconvnet_rule`, :func:`guided_rule`)."""

    rule: staticmethod  # a context manager factory: rule(model) applies the rule while open
    fusable = True  # the rules act on rectifiers only; convolutions and BatchNorms are plain linear maps

    def __init__(self, pooling: str = "l2") -> None:
        super().__init__(pooling=pooling)

    def _check_model(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Activation) and not isinstance(module, RECTIFIERS):
                raise ValueError(
                    f"{self.name} is defined for ReLU / ReLU6 networks only, but layer {name!r} is a "
                    f"{type(module).__name__}; use sensitivity or LRP for this model."
                )

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the traced graph makes every functional ReLU (F.relu, torch.relu, x.relu_()) a module the
        # rule can hook; one fresh module per call, so a ReLU module reused in forward is hooked per call
        net = canonize(model, purpose="gradient")
        self._check_model(net)
        with self.rule(net):
            return backprop(net, x, target)  # (B, C, H, W)


class DeconvNet(_RectifierRuleExplainer):
    """Deconvolution (Zeiler & Fergus 2014): max-unpooling at the forward switches (the max-pool
    gradient), ReLU applied to the backward signal, transposed filters; channels pooled like
    sensitivity (paper Sec. 2)."""

    name = "deconvnet"
    rule = staticmethod(deconvnet_rule)


class GuidedBackprop(_RectifierRuleExplainer):
    """Guided backpropagation (Springenberg et al. 2015): the gradient, with only positive
    backward signals passed through each ReLU."""

    name = "guided_backprop"
    rule = staticmethod(guided_rule)
