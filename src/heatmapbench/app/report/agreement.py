"""Metric agreement in ``heatmapbench-report``: the measures the selected runs carry for the same
explainers and model, each measure's ranking, and Kendall's τ between the rankings
(:mod:`heatmapbench.metrics.agreement`).

Measures, all oriented so that higher is better, per model × data × weights:

* from every evaluate run's per-image table: ``MoRF <perturbation>`` (AOPC relative to random),
  ``LeRF <perturbation>`` (−AOPC LeRF relative to random) and ``ABPC <perturbation>`` when LeRF was
  run; ROAD is the run with ``perturbation=road``; the region size joins the name where runs differ in it;
* from an evaluate run with ``sanity=mprt`` (``sanity/mprt_per_image.csv``): ``MPRT`` = −Spearman of
  |h| with the trained model's heatmap after cascading randomisation of the whole network, per image;
* from ROAR runs (``task=roar``): ``ROAR`` = −the mean test accuracy over the removal fractions, per
  training seed (lower accuracy after retraining without the marked pixels = better).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from heatmapbench.app.report.store import read_run_table
from heatmapbench.evaluation.reliability import score_matrix
from heatmapbench.metrics.agreement import Measure, measure_agreement, rankings
from heatmapbench.metrics.summary import N_BOOT

#: Where an evaluate run with ``sanity=mprt`` keeps its per-image similarities.
MPRT_TABLE = "sanity/mprt_per_image.csv"
#: The per-seed accuracies a ROAR parent run logs (:mod:`heatmapbench.app.roar`: TABLE under roar/).
ROAR_TABLE = "roar/roar_accuracy.csv"


@dataclass
class Agreement:
    """The measures of one model × data, their rankings and the pairwise τ."""

    group: str
    measures: list[Measure]
    rankings: pd.DataFrame
    tau: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _mprt_measure(table: pd.DataFrame) -> Measure | None:
    part = table[(table["mode"] == "cascading") & (table.measure == "spearman_abs")]
    if not len(part):
        return None
    last = part[part.depth == part.depth.max()]
    scores = -last.pivot(index="image", columns="explainer", values="similarity")
    return Measure("MPRT", scores, unit="image", lower_is_better=True)


def _roar_measure(table: pd.DataFrame) -> Measure | None:
    part = table[table.method == "roar"]
    if not len(part):
        return None
    scores = -part.groupby(["seed", "explainer"]).accuracy.mean().unstack("explainer")
    return Measure("ROAR", scores, unit="seed", lower_is_better=True)


def _group(run: dict) -> str:
    """``<network> / <data> / <weights>`` of a run: measures are compared only on the same weights.

    A heatmapbench-train checkpoint counts as the network inside it (logged as the short class name
    ``model.net.net``, or as ``model.net.net._target_`` by older runs). The weights are an evaluate
    run's ``weights`` tag or a ROAR run's ``ckpt_path``; a ROAR run without one explains a model it
    trained itself, which no other run measured, so it gets a group of its own.
    """
    model = run.get("tags.model")
    inner = run.get("params.model.net.net") or run.get("params.model.net.net._target_")
    if model == "from_checkpoint" and isinstance(inner, str) and inner:
        model = inner.rsplit(".", 1)[-1]
    if run.get("tags.task") == "roar":
        weights = run.get("params.ckpt_path") or f"trained by ROAR {run.get('tags.roar_id')}"
    else:
        weights = run.get("tags.weights")
    if isinstance(weights, str) and weights and "/" in weights:
        weights = os.path.normpath(weights)
    return f"{model} / {run.get('tags.data')}" + (f" / {weights}" if weights else "")


def collect_measures(long: pd.DataFrame, per_image: pd.DataFrame | None, runs: pd.DataFrame) -> dict[str, list[Measure]]:
    """Measures per ``network / data`` group from the report's long table, per-image tables and runs."""
    groups: dict[str, list[Measure]] = {}
    records = {r["run_id"]: r for r in runs.to_dict("records")}  # (itertuples would rename the dotted columns)

    def add(group: str, measure: Measure | None) -> None:
        if measure is not None and measure.name not in {m.name for m in groups.get(group, [])}:
            groups.setdefault(group, []).append(measure)

    by_run = long.drop_duplicates("run_id").set_index("run_id")
    sizes = long.groupby(["model", "data", "perturbation"], dropna=False).region_size.nunique()
    if per_image is not None and len(per_image):
        for run_id, table in per_image.groupby("run_id", sort=False):
            if run_id not in by_run.index or run_id not in records:
                continue
            row = by_run.loc[run_id]
            several = sizes.get((row.model, row.data, row.perturbation), 1) > 1
            suffix = f" {row.perturbation}" + (f" r{int(row.region_size)}" if several else "")
            for order in ("morf", "lerf", "abpc"):
                try:
                    scores = score_matrix(table, order)
                except ValueError:  # this run has no LeRF
                    continue
                name = f"{'ABPC' if order == 'abpc' else order.replace('morf', 'MoRF').replace('lerf', 'LeRF')}{suffix}"
                if len(scores) and scores.shape[1] >= 2:
                    add(_group(records[run_id]), Measure(name, scores, lower_is_better=order == "lerf"))
    for run_id, run in records.items():
        uri, task = run.get("artifact_uri"), run.get("tags.task")
        if uri is None:
            continue
        if task == "evaluate" and run_id in by_run.index:
            table = read_run_table(str(uri), [MPRT_TABLE])
            add(_group(run), None if table is None else _mprt_measure(table))
        elif task == "roar" and run.get("tags.roar_role") == "parent":
            table = read_run_table(str(uri), [ROAR_TABLE])
            add(_group(run), None if table is None else _roar_measure(table))
    return groups


def agreement_reports(long: pd.DataFrame, per_image: pd.DataFrame | None, runs: pd.DataFrame, *,
                      n_boot: int = N_BOOT, seed: int = 0) -> list[Agreement]:
    """One :class:`Agreement` per model × data that has at least two measures."""
    out = []
    for group, measures in collect_measures(long, per_image, runs).items():
        if len(measures) < 2:
            continue
        out.append(Agreement(group, measures, rankings(measures),
                             measure_agreement(measures, n_boot=n_boot, seed=seed)))
    return out


def agreement_markdown(agreements: list[Agreement]) -> str:
    """Rankings (1 = best) per measure and τ between measures, per model × data."""
    lines = ["## Do the measures agree? Rankings of the explainers and Kendall's τ between measures", ""]
    for a in agreements:
        wide = a.rankings.pivot(index="explainer", columns="measure", values="rank")[[m.name for m in a.measures]]
        units = {m.name: f"{m.scores.shape[0]} {m.unit}s" for m in a.measures}
        lines += [f"### {a.group}", "", "rank (1 = best; measures oriented so that higher is better)", "",
                  "| explainer | " + " | ".join(f"{c} ({units[c]})" for c in wide.columns) + " |",
                  "|---|" + "---|" * len(wide.columns)]
        for name, row in wide.iterrows():
            lines.append(f"| {name} | " + " | ".join("–" if v != v else f"{v:g}" for v in row) + " |")
        lines += ["", "| measure A | measure B | Kendall τ_b [95% CI] | explainers | resampled |", "|---|---|---|---|---|"]
        for r in a.tau.itertuples(index=False):
            lines.append(f"| {r.measure_a} | {r.measure_b} | {r.tau:.2f} [{r.tau_lo:.2f}, {r.tau_hi:.2f}] | "
                         f"{r.explainers} | {'paired' if r.paired else 'independently'} |")
        lines.append("")
    return "\n".join(lines)


def write_agreement(agreements: list[Agreement], folder: Path) -> dict[str, Path]:
    """``agreement.md``, ``agreement_rankings.csv``, ``agreement_tau.csv`` and the τ-matrix figure."""
    from heatmapbench.app.report.figures import plot_agreement

    files = {"agreement_md": folder / "agreement.md", "agreement_rankings_csv": folder / "agreement_rankings.csv",
             "agreement_tau_csv": folder / "agreement_tau.csv", "agreement_png": folder / "metric_agreement.png"}
    files["agreement_md"].write_text(agreement_markdown(agreements))
    pd.concat([a.rankings.assign(group=a.group) for a in agreements]).to_csv(files["agreement_rankings_csv"],
                                                                             index=False)
    pd.concat([a.tau.assign(group=a.group) for a in agreements]).to_csv(files["agreement_tau_csv"], index=False)
    plot_agreement(agreements, files["agreement_png"])
    return files
