"""Heatmap methods behind one interface: ``get_explainer(name)(model, x, target) -> (B, H, W)``.

``x`` is ``(B, C, H, W)`` in model space, ``target`` ``(B,)`` class indices; the heatmap is
float32 on ``x``'s device. The named methods are the catalogue in :mod:`.presets` (``EXPLAINERS``).
"""

from __future__ import annotations

from typing import Any

from .. import registry
from .base import POOLINGS, Explainer, explaining, pool_channels
from .captum_adapter import CaptumExplainer
from .gradient import DeconvNet, GradientXInput, GuidedBackprop, Sensitivity
from .lrp import LRP, RULE_TABLES
from .noise import RandomExplainer

__all__ = [
    "POOLINGS",
    "RULE_TABLES",
    "CaptumExplainer",
    "DeconvNet",
    "Explainer",
    "GradientXInput",
    "GuidedBackprop",
    "LRP",
    "RandomExplainer",
    "Sensitivity",
    "available_explainers",
    "explaining",
    "get_explainer",
    "pool_channels",
]


def available_explainers() -> list[str]:
    """Names of the known explainers (configs and classes registered from Python)."""
    return registry.available("explainer")


def get_explainer(explainer: str | Explainer, **overrides: Any) -> Explainer:
    """An :class:`Explainer` from its registered name (with ``overrides`` of its parameters) or as given.

    Names come from :mod:`heatmapbench.registry` (``register_explainer``, a user config folder, or
    the package's catalogue :data:`.presets.EXPLAINERS`); unknown names raise ``ValueError`` listing
    the known ones.
    """
    return registry.resolve("explainer", explainer, Explainer, **overrides)
