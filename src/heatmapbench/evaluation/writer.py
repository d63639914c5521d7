"""Every file of one evaluation, written into a folder: the curves and summary tables (CSV and Markdown),
the per-image table, the reliability of the ranking and, unless asked not to, the figures.

The same writer serves the training callback (per epoch) and ``heatmapbench-evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from heatmapbench.evaluation.core import Evaluation
from heatmapbench.evaluation.figures import write_figures
from heatmapbench.evaluation.markdown import summary_markdown
from heatmapbench.evaluation.reliability import per_image_table, run_reliability, run_reliability_markdown, write_table
from heatmapbench.metrics.summary import Statistics

__all__ = ["write_curves_csv", "write_evaluation"]


def write_curves_csv(evaluation: Evaluation, path: Path) -> pd.DataFrame:
    """Explainer × step table of AOPC_L and AOPC_L relative to random, with CIs."""
    table = evaluation.curves_table()
    table.to_csv(path, index=False)
    return table


def write_evaluation(evaluation: Evaluation, folder: Path, class_names: Sequence[str] = (),
                     title: str = "", statistics: Statistics | None = None,
                     reliability: dict | None = None, figures: bool = True) -> dict[str, Path]:
    """Write every artifact of one evaluation into ``folder``; return them by kind.

    ``figures=False`` writes the tables only (no curves plot, no gallery: most of the time
    of this function); :func:`~heatmapbench.evaluation.figures.write_figures` draws them later.

    ``statistics`` is the evaluation's one bootstrap (:meth:`Evaluation.statistics`), shared with
    whatever else the caller logs or prints; by default it is computed here. ``reliability`` is
    :func:`~heatmapbench.evaluation.reliability.run_reliability` of the evaluation's per-image
    table, when the caller already has it (computed here otherwise, from the same resampling).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {"curves": folder / "aopc_curves.csv",
             "summary_csv": folder / "summary.csv", "summary_md": folder / "summary.md",
             "pairwise": folder / "pairwise_tests.csv"}
    write_curves_csv(evaluation, files["curves"])
    computed = evaluation.statistics() if statistics is None else statistics
    summary, pairwise = computed.summary, computed.pairwise
    summary.to_csv(files["summary_csv"], index=False)
    pairwise.to_csv(files["pairwise"], index=False)
    files["summary_md"].write_text(summary_markdown(summary, pairwise))
    table = per_image_table(evaluation)
    files["per_image"] = write_table(table, folder)
    if reliability is None:
        reliability = run_reliability(table, n_boot=computed.n_boot, seed=computed.seed)
    files["reliability_csv"] = folder / "reliability.csv"
    files["reliability_md"] = folder / "reliability.md"
    reliability["ranking"].merge(reliability["alpha"], on="order", how="left").to_csv(files["reliability_csv"],
                                                                                      index=False)
    files["reliability_md"].write_text(run_reliability_markdown(reliability))
    if figures:
        files.update(write_figures(evaluation, folder, class_names, title))
    return files
