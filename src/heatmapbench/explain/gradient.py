"""Gradient-based heatmaps: sensitivity analysis, gradient x input, deconvnet, guided backprop.

All are one forward and one (possibly modified) backward pass of the pre-softmax target score.
The ReLU rules of deconvnet and guided backprop are Zennit's; they are also applied to ``ReLU6``
(EfficientNet-Lite), where they read the same: deconvnet rectifies the backward signal and
ignores the forward pass, guided backprop masks the ordinary gradient by its sign.
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.composites import LayerMapComposite
from zennit.rules import ReLUDeconvNet, ReLUGuidedBackprop
from zennit.types import Activation

from .base import Explainer, backprop
from .graph import canonize

#: Activations the deconvnet / guided-backprop rules are defined for.
RECTIFIERS = (nn.ReLU, nn.ReLU6)


class Sensitivity(Explainer):
    """Sensitivity analysis, paper eq. 3: ``h_p = || (d f / d x_{p,c})_c ||_q``, q in {2, inf}.

    Parameters
    ----------
    pooling
        ``"l2"`` or ``"linf"`` for the paper's two variants (any of ``POOLINGS`` is accepted).
    """

    name = "sensitivity"

    def __init__(self, pooling: str = "l2") -> None:
        super().__init__(pooling=pooling)

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return backprop(model, x, target)  # (B, C, H, W)


class GradientXInput(Explainer):
    """Gradient times input, ``x * d f / d x``, summed over colour channels by default."""

    name = "gradient_x_input"
    multiplies_by_input = True

    def __init__(self, pooling: str = "sum") -> None:
        super().__init__(pooling=pooling)

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return x * backprop(model, x, target)  # (B, C, H, W)


class _RectifierRuleExplainer(Explainer):
    """A gradient whose ReLU / ReLU6 backward is replaced by a Zennit rule."""

    rule: type

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
        composite = LayerMapComposite([(RECTIFIERS, self.rule())])
        with composite.context(net):
            return backprop(net, x, target)  # (B, C, H, W)


class DeconvNet(_RectifierRuleExplainer):
    """Deconvolution (Zeiler & Fergus 2014): max-unpooling at the forward switches (the max-pool
    gradient), ReLU applied to the backward signal, transposed filters; channels pooled like
    sensitivity (paper Sec. 2)."""

    name = "deconvnet"
    rule = ReLUDeconvNet


class GuidedBackprop(_RectifierRuleExplainer):
    """Guided backpropagation (Springenberg et al. 2015): the gradient, with only positive
    backward signals passed through each ReLU."""

    name = "guided_backprop"
    rule = ReLUGuidedBackprop
