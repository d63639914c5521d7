"""Heatmap methods behind one interface: ``get_explainer(name)(model, x, target) -> (B, H, W)``.

``x`` is ``(B, C, H, W)`` in model space, ``target`` ``(B,)`` class indices; the heatmap is
float32 on ``x``'s device. Methods are registered by the files in ``conf/explainer/``.
"""

from __future__ import annotations

from typing import Any

from .. import registry
from .base import POOLINGS, Explainer, explaining, pool_channels
from .canonizers import ExactMergeBatchNorm, MBConvSumCanonizer, default_canonizers
from .captum_adapter import CaptumExplainer
from .gradient import DeconvNet, GradientXInput, GuidedBackprop, Sensitivity
from .lrp import LRP, RULE_TABLES
from .noise import RandomExplainer

__all__ = [
    "POOLINGS",
    "RULE_TABLES",
    "CaptumExplainer",
    "DeconvNet",
    "ExactMergeBatchNorm",
    "Explainer",
    "GradientXInput",
    "GuidedBackprop",
    "LRP",
    "MBConvSumCanonizer",
    "RandomExplainer",
    "Sensitivity",
    "available_explainers",
    "default_canonizers",
    "explaining",
    "get_explainer",
    "pool_channels",
]


def available_explainers() -> list[str]:
    """Names of the configured explainers (``conf/explainer/*.yaml``)."""
    return registry.available("explainer")


def get_explainer(name: str, **overrides: Any) -> Explainer:
    """Build the explainer ``conf/explainer/<name>.yaml`` with ``overrides`` applied.

    Unknown names raise ``ValueError`` listing the known ones.
    """
    explainer = registry.build("explainer", name, **overrides)
    if not isinstance(explainer, Explainer):
        raise TypeError(f"conf/explainer/{name}.yaml builds {type(explainer).__name__}, not an Explainer.")
    explainer.config_name = name
    return explainer
