"""The sanity table prints its numbers through the project's one formatter."""

import math

import pandas as pd

from heatmapbench.app.sanity import sanity_markdown
from heatmapbench.evaluation.markdown import MISSING


def test_sanity_markdown_prints_estimates_intervals_and_missing_values_like_every_table():
    summary = pd.DataFrame({
        "explainer": ["g", "g", "g", "g"], "mode": ["cascading", "cascading", "independent", "independent"],
        "measure": ["ssim"] * 4, "depth": [1, 2, 1, 2],
        "mean": [0.5, 0.12345, 0.2, 0.4], "lo": [0.4, 0.1, 0.1, 0.3], "hi": [0.6, math.nan, 0.3, 0.5]})
    text = sanity_markdown(summary)
    assert f"| g | ssim | 0.123 [0.100, {MISSING}] | 0.300 (mean over 2 layers) |" in text
