"""Helpers for checking explainers on your own models (used by heatmapbench's tests and benches)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["bias_free", "lxt_patched", "randomize_batch_norm"]


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


#: parameters that add constants to a transformer's activations (class tokens, position embeddings)
_CONSTANT_INPUTS = ("cls_token", "class_token", "dist_token", "reg_token", "pos_embed", "pos_embedding",
                    "position_embeddings")


def bias_free(model: nn.Module) -> nn.Module:
    """Zero every bias, LayerNorm / BatchNorm shift, class token and position embedding, in place, and
    give BatchNorm random centred statistics; returns ``model``. Nothing then absorbs relevance, so a conservative
    rule's input relevance sums to the target score (the check of conservation)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or any(key in name for key in _CONSTANT_INPUTS):
                param.zero_()
    return randomize_batch_norm(model, centred=True)


@contextlib.contextmanager
def lxt_patched(patch_map: dict) -> Iterator[None]:
    """LXT 2.1's ``monkey_patch`` with ``patch_map`` (class or module -> patch), undone on exit.

    LXT patches classes and modules process-wide (e.g. ``torch.nn.LayerNorm.forward``); this puts
    every attribute back, so that LXT can serve as a reference next to other code.
    """
    from lxt.efficient import monkey_patch

    saved = [(target, dict(vars(target))) for target in patch_map]
    try:
        monkey_patch(None, patch_map=patch_map)
        yield
    finally:
        for target, attributes in saved:
            for key in set(vars(target)) - set(attributes):
                delattr(target, key)
            for key, value in attributes.items():
                if vars(target).get(key) is not value and not key.startswith("__"):
                    setattr(target, key, value)
