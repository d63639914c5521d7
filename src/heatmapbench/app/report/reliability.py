"""Deprecated: moved to :mod:`heatmapbench.evaluation.reliability`, the one home of the reliability statistics (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.app.report.reliability", "heatmapbench.evaluation.reliability",
                             renamed={"reliability_metrics": "cross_run_reliability_metrics",
                                      "reliability_markdown": "cross_run_reliability_markdown"})
