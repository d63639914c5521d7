"""Region perturbation (Samek et al., arXiv 1509.06321): MoRF/LeRF/random curves, AOPC, ABPC.

Entry point: :func:`region_perturbation`. The named perturbations are the catalogue in
:mod:`.presets` (``PERTURBATIONS``). Summaries of the curves (AOPC relative to random, ABPC, bootstrap
statistics) and heatmap complexity live in :mod:`heatmapbench.metrics`.
"""

from __future__ import annotations

from typing import Any

from heatmapbench import registry
from heatmapbench.perturbation.engine import PerturbationResult, eval_mode, region_perturbation
from heatmapbench.perturbation.perturbations import (
    Blur,
    Constant,
    Mean,
    Perturbation,
    PixelSpace,
    Uniform,
)
from heatmapbench.perturbation.road import Road, RoadWalk, road_impute
from heatmapbench.perturbation.regions import ORDERS, REGION_MODES, select_regions

__all__ = [
    "region_perturbation", "PerturbationResult", "eval_mode",
    "get_perturbation", "Perturbation", "PixelSpace", "Uniform", "Mean", "Constant", "Blur", "Road", "RoadWalk", "road_impute",
    "ORDERS", "REGION_MODES", "select_regions",
]


def get_perturbation(perturbation: str | Perturbation, **overrides: Any) -> Perturbation:
    """A :class:`Perturbation` from its registered name (with ``overrides`` of its parameters) or as given.

    Names come from :mod:`heatmapbench.registry` (``register_perturbation``, a user config folder,
    or the package's catalogue :data:`.presets.PERTURBATIONS`); unknown names raise ``ValueError``
    listing the known ones.
    """
    return registry.resolve("perturbation", perturbation, Perturbation, **overrides)
