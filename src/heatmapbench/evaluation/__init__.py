"""Scoring several explainers on the same images, and the tables and figures of the result."""

from heatmapbench.evaluation.core import (
    Evaluation,
    ExplainerSpec,
    build_settings,
    build_explainers,
    build_perturbation,
    engine_forwards,
    ModelScoresNotFinite,
    evaluate_batch,
    predicted_class,
)
from heatmapbench.evaluation.settings import EvaluationSettings

__all__ = ["Evaluation", "EvaluationSettings", "ExplainerSpec", "build_explainers", "build_settings", "build_perturbation",
           "engine_forwards", "evaluate_batch", "predicted_class", "ModelScoresNotFinite"]
