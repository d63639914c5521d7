"""Region perturbation (Samek et al., arXiv 1509.06321): MoRF/LeRF/random curves, AOPC, ABPC.

Entry point: :func:`region_perturbation`. Perturbations are registered in
``conf/perturbation/*.yaml``; summaries and heatmap complexity helpers live alongside.
"""

from heatmapbench.perturbation.complexity import (
    heatmap_entropy,
    heatmap_jpeg_size,
    heatmap_png_size,
    render_heatmaps,
)
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
from heatmapbench.perturbation.summary import (
    PairedTest,
    abpc,
    mean_ci,
    paired_bootstrap_test,
    relative_to_random,
)

__all__ = [
    "region_perturbation", "PerturbationResult", "eval_mode",
    "Perturbation", "PixelSpace", "Uniform", "Mean", "Constant", "Blur", "Road", "RoadWalk", "road_impute",
    "ORDERS", "REGION_MODES", "select_regions",
    "relative_to_random", "abpc", "mean_ci", "paired_bootstrap_test", "PairedTest",
    "heatmap_png_size", "heatmap_jpeg_size", "heatmap_entropy", "render_heatmaps",
]
