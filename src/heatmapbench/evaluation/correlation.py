"""Does AOPC move with accuracy? Correlations of accuracy with each explainer's measures across the
evaluations of a training (epochs) or across runs, with bootstrap CIs (paper Fig. 7).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from heatmapbench.evaluation.style import RANDOM_ORDERING_LABEL
from heatmapbench.metrics import names as mn
from heatmapbench.metrics.summary import CORRELATIONS, N_BOOT, correlation_ci

__all__ = ["correlations"]


def correlations(history: pd.DataFrame, accuracy: str = "accuracy", measures: Sequence[str] = (mn.AOPC,),
                 n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Correlation of accuracy with each measure of each explainer across the rows (epochs or runs).

    ``history`` has an ``accuracy`` column and metric-name columns (``aopc_rel/<explainer>``,
    ``eval/random_ordering/aopc``, …); every explainer × measure present gives one row, and the
    random ordering (``explainer`` = :data:`RANDOM_ORDERING_LABEL`) one per measure it has. Pearson
    and Spearman with percentile-bootstrap CIs over the rows
    (:func:`~heatmapbench.metrics.summary.correlation_ci`).
    """
    columns = ["explainer", "measure", *(f"{m}{b}" for m in CORRELATIONS for b in ("", "_lo", "_hi")), "epochs"]
    subjects = [(name, measure, mn.explainer_metric(measure, name))
                for name in mn.explainers_in(history.columns, measures=measures) for measure in measures]
    subjects += [(RANDOM_ORDERING_LABEL, measure, mn.random_ordering_metric(measure))
                 for measure in measures if measure in (mn.AOPC, mn.AOPC_NORM)]
    rows = []
    for name, measure, column in subjects:
        if column not in history.columns:
            continue
        part = history[[accuracy, column]].dropna()
        row: dict = {"explainer": name, "measure": measure, "epochs": len(part)}
        for method in CORRELATIONS:
            r, lo, hi = correlation_ci(part[accuracy], part[column], method, n_boot=n_boot, seed=seed)
            row.update({method: r, f"{method}_lo": lo, f"{method}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
