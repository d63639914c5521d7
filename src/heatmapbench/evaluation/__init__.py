"""Scoring several explainers on the same images, and the tables and figures of the result.

One job per module: :mod:`~heatmapbench.evaluation.core` scores a batch (:func:`evaluate_batch`) into
an :class:`Evaluation` and joins batches (:meth:`Evaluation.concat`), :mod:`~heatmapbench.evaluation.settings`
holds the settings, :mod:`~heatmapbench.evaluation.loop` and :mod:`~heatmapbench.evaluation.shards` score
many batches and keep them on disk; of the result, :mod:`~heatmapbench.evaluation.reliability` says whether
the ranking is real, :mod:`~heatmapbench.evaluation.correlation` how AOPC moves with accuracy,
:mod:`~heatmapbench.evaluation.markdown` and :mod:`~heatmapbench.evaluation.figures` show it (in
:mod:`~heatmapbench.evaluation.style`) and :mod:`~heatmapbench.evaluation.writer` writes it all to a folder.
"""

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
