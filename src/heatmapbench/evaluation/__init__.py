"""Scoring several explainers on the same images, and the tables and figures of the result."""

from heatmapbench.evaluation.core import (
    Evaluation,
    build_explainers,
    build_perturbation,
    evaluate_batch,
    predicted_class,
)

__all__ = ["Evaluation", "build_explainers", "build_perturbation",
           "evaluate_batch", "predicted_class"]
