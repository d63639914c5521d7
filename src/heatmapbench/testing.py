"""Helpers for checking explainers on your own models (used by heatmapbench's tests and benches)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_batch_norm"]


@torch.no_grad()
def randomize_batch_norm(model: nn.Module, seed: int = 0, centred: bool = False) -> nn.Module:
    """Give every BatchNorm layer random statistics and affine parameters, in place; returns ``model``.

    A freshly built network has mean 0, variance 1, weight 1 and bias 0, so folding BatchNorm
    into the layer before it (LRP canonization) is an identity and goes untested; with these
    values it is not. ``centred``: mean and shift 0, so folding adds no bias (for conservation
    checks on bias-free copies).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            var, weight = torch.rand(n, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
            mean = torch.randn(n, generator=gen) * (0.0 if centred else 0.1)
            bias = torch.randn(n, generator=gen) * (0.0 if centred else 0.1)
            if m.running_var is not None:
                m.running_var.copy_(var)
                m.running_mean.copy_(mean)
            if m.weight is not None:  # affine=False has no weight and bias
                m.weight.copy_(weight)
                m.bias.copy_(bias)
    return model
