"""Statistics of explanations: AOPC summaries with their bootstrap statistics, heatmap complexity.

:mod:`~heatmapbench.metrics.summary` turns perturbation curves into AOPC, AOPC relative to
random and ABPC with confidence intervals and tests; :mod:`~heatmapbench.metrics.complexity`
measures the heatmaps themselves (paper Table I: PNG/JPEG size, entropy).
"""

from heatmapbench.metrics.complexity import heatmap_entropy, heatmap_jpeg_size, heatmap_png_size, render_heatmaps
from heatmapbench.metrics.summary import PairedTest, abpc, aopc, mean_ci, paired_bootstrap_test, relative_to_random

__all__ = [
    "aopc", "relative_to_random", "abpc", "mean_ci", "paired_bootstrap_test", "PairedTest",
    "heatmap_png_size", "heatmap_jpeg_size", "heatmap_entropy", "render_heatmaps",
]
