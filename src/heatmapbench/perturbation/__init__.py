"""Region perturbation (Samek et al., arXiv 1509.06321): MoRF/LeRF/random curves, AOPC, ABPC.

Entry point: :func:`region_perturbation`. Perturbations are registered in
``conf/perturbation/*.yaml``. Summaries of the curves (AOPC relative to random, ABPC, bootstrap
statistics) and heatmap complexity live in :mod:`heatmapbench.metrics`.
"""

from heatmapbench.perturbation.engine import PerturbationResult, eval_mode, region_perturbation
from heatmapbench.perturbation.perturbations import (
    Blur,
    Constant,
    Mean,
    Perturbation,
    PixelSpace,
    Uniform,
    get_perturbation,
)
from heatmapbench.perturbation.road import Road, RoadWalk, road_impute
from heatmapbench.perturbation.regions import ORDERS, REGION_MODES, select_regions

__all__ = [
    "region_perturbation", "PerturbationResult", "eval_mode",
    "get_perturbation", "Perturbation", "PixelSpace", "Uniform", "Mean", "Constant", "Blur", "Road", "RoadWalk", "road_impute",
    "ORDERS", "REGION_MODES", "select_regions",
]
