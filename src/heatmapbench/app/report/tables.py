"""The tables of ``heatmapbench-report``: runs as a long table, the comparison, training points."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from heatmapbench.metrics import names as mn
from heatmapbench.metrics.summary import N_BOOT
from heatmapbench.evaluation.correlation import correlations
from heatmapbench.evaluation.markdown import format_ci, format_number
from heatmapbench.evaluation.reliability import CrossRunReliability, cross_run_reliability, setting_scores

#: The cell of the comparison; other parameters join it only when they split a cell.
BASE_KEYS = ("explainer", "region_size", "perturbation")
#: Per-explainer metrics of an evaluate run (``<measure>/<explainer>``, see :mod:`heatmapbench.metrics.names`).
EXPLAINER_METRICS = (mn.AOPC, mn.AOPC_REL, "aopc_rel_lo", "aopc_rel_hi", mn.AOPC_LERF, mn.ABPC, "abpc_lo", "abpc_hi",
                     mn.COMPLEXITY_PNG, mn.COMPLEXITY_JPEG, mn.COMPLEXITY_ENTROPY)
#: Per-run metrics of an evaluate run: column of the report → metric name.
RUN_METRICS = {"random_ordering_aopc": mn.random_ordering_metric(mn.AOPC), "accuracy": mn.ACCURACY,
               "images": mn.IMAGES, "seconds": mn.SECONDS}
#: Parameters that never split a cell: replicates (seeds), precision, bookkeeping, and speed mechanics
#: that change no number beyond float reassociation (batch size, fusion; runs logged before
#: ``evaluation.fuse`` existed then still share cells with the ones after).
DEFAULT_IGNORE = ("paths.*", "logger.*", "hydra.*", "task_name", "seed", "evaluation.seed", "evaluation.explainers",
                  "evaluation.batch_size", "evaluation.fuse", "evaluation.orders", "evaluation.complexity", "evaluation.repeats",
                  "evaluation.random_repeats", "explainer._target_", "device", "progress", "gallery_size", "evaluation.n_boot",
                  "data.batch_size", "data.num_workers", "data.pin_memory", "data.data_dir", "data.download")


@dataclass
class Report:
    """The tables of a report; ``split_by`` are the parameters that joined the comparison's cell."""

    comparison: pd.DataFrame
    runs: pd.DataFrame
    training: pd.DataFrame
    training_correlation: pd.DataFrame
    split_by: list[str] = field(default_factory=list)
    reliability: CrossRunReliability | None = None
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The comparison (and the AOPC/accuracy correlation across training runs) as Markdown."""
        return comparison_markdown(self)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def _last_part(series: pd.Series) -> pd.Series:
    return series.map(lambda v: str(v).rsplit(".", 1)[-1].lower() if isinstance(v, str) and v else None)


def _run_kind(df: pd.DataFrame) -> pd.Series:
    """``evaluate``/``train``/other per run: the ``task`` tag, else guessed from the metrics."""
    kind = _col(df, "tags.task").astype(object)
    guess = np.where(_col(df, f"metrics.{mn.random_ordering_metric(mn.AOPC)}").notna(), "evaluate",
                     np.where(_col(df, f"metrics.{mn.TEST_ACC}").notna() | _col(df, f"metrics.{mn.VAL_ACC}").notna()
                              | _col(df, "params.trainer._target_").notna(), "train", "other"))
    return kind.where(kind.notna() & (kind != ""), pd.Series(guess, index=df.index))


def _explainers(df: pd.DataFrame) -> list[str]:
    """Explainer names of the ``aopc_rel/<name>`` and ``aopc/<name>`` columns, in first-seen order."""
    return mn.explainers_in(c[len("metrics."):] for c in df.columns if c.startswith("metrics."))


def _number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def long_format(runs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluate run × explainer with the run's identity, its parameters and its metrics."""
    df = runs_df[_run_kind(runs_df) == "evaluate"]
    params = [c for c in df.columns if c.startswith("params.")]
    rows = []
    for name in _explainers(df):
        part = df[_col(df, f"metrics.{mn.explainer_metric(mn.AOPC_REL, name)}").notna()
                  | _col(df, f"metrics.{mn.explainer_metric(mn.AOPC, name)}").notna()]
        if not len(part):
            continue
        out = pd.DataFrame({
            "run_id": part.run_id, "experiment": _col(part, "experiment"), "status": part.status,
            "explainer": name, "region_size": _number(_col(part, "params.evaluation.region_size")),
            "perturbation": _col(part, "tags.perturbation").fillna(_last_part(_col(part, "params.perturbation._target_"))),
            "model": _col(part, "tags.model").fillna(_last_part(_col(part, "params.model.net._target_"))),
            "data": _col(part, "tags.data").fillna(_last_part(_col(part, "params.data._target_"))),
            "steps": _number(_col(part, "params.evaluation.steps")),
            "sweep_id": _col(part, "tags.sweep_id"), "sweep_job": _col(part, "tags.sweep_job"),
        })
        for key in EXPLAINER_METRICS:
            out[key] = _col(part, f"metrics.{key}/{name}").astype(float)
        for key, metric in RUN_METRICS.items():
            out[key] = _col(part, f"metrics.{metric}").astype(float)
        for column in params:
            out[column] = part[column]
        rows.append(out)
    if not rows:
        return pd.DataFrame(columns=["run_id", "experiment", "status", *BASE_KEYS, "model", "data", "steps",
                                     "sweep_id", "sweep_job", *EXPLAINER_METRICS, *RUN_METRICS])
    long = pd.concat(rows, ignore_index=True)
    return long.sort_values(["perturbation", "region_size", "explainer", "run_id"], na_position="last",
                            ignore_index=True)


def split_keys(long: pd.DataFrame, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[str]:
    """The parameters beyond explainer × region size × perturbation that split a comparison cell.

    A candidate (``model``, ``data``, then every run parameter not matching an ``ignore``
    pattern) joins the key when it separates runs the key so far puts together, so a parameter
    that only restates the key (``perturbation._target_``) or that no run varies is left out,
    and runs differing only in ignored parameters (seeds) are averaged.
    """
    if not len(long):
        return []
    filled = long.astype(object).where(long.notna(), "–")
    keys = list(BASE_KEYS)
    groups = filled.groupby(keys).ngroups
    candidates = ["model", "data", "steps"] + sorted(c for c in long.columns if c.startswith("params."))
    skip = {"params.evaluation.region_size", "params.evaluation.steps"}
    for column in candidates:
        name = column[len("params."):] if column.startswith("params.") else column
        if column in skip or any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
            continue
        n = filled.groupby(keys + [column]).ngroups
        if n > groups:
            keys.append(column)
            groups = n
    return keys[len(BASE_KEYS):]


def comparison_table(long: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Mean per cell of the metrics; a single run's CI is kept, several runs give the std instead.

    Means are over the cell's runs that logged the metric (ABPC only exists with ``lerf``);
    ``runs`` counts them all.
    """
    keys = list(BASE_KEYS) + list(extra)
    columns = keys + ["aopc_rel", "aopc_rel_lo", "aopc_rel_hi", "aopc_rel_std", "aopc", "abpc", "abpc_lo", "abpc_hi",
                      "random_ordering_aopc", mn.COMPLEXITY_PNG, mn.COMPLEXITY_JPEG, mn.COMPLEXITY_ENTROPY, "accuracy",
                      "runs", "run_ids"]
    if not len(long):
        return pd.DataFrame(columns=columns)
    filled = long.copy()
    for key in keys:  # NaN keys would drop out of groupby
        filled[key] = filled[key].astype(object).where(filled[key].notna(), "–")
    grouped = filled.groupby(keys, sort=False)
    means = grouped[["aopc_rel", "aopc", "abpc", "random_ordering_aopc", mn.COMPLEXITY_PNG, mn.COMPLEXITY_JPEG,
                     mn.COMPLEXITY_ENTROPY, "accuracy"]].mean()
    table = means.join(grouped["aopc_rel"].std().rename("aopc_rel_std"))
    table["runs"] = grouped.size()
    table["run_ids"] = grouped["run_id"].agg(lambda ids: ";".join(sorted(ids)))
    single = table["runs"] == 1
    for bound in ("aopc_rel_lo", "aopc_rel_hi", "abpc_lo", "abpc_hi"):  # a CI only describes one run
        table[bound] = grouped[bound].first().where(single)
    table = table.reset_index()
    table["region_size"] = pd.to_numeric(table["region_size"].replace("–", np.nan), errors="coerce")
    # blocks of perturbation × region size, the best explainer first in each (the paper's ranking)
    order = list(extra) + ["perturbation", "region_size"]
    table = table.sort_values(order + ["aopc_rel"], ascending=[True] * len(order) + [False], kind="stable",
                              na_position="last", ignore_index=True)
    return table[columns]


def training_table(runs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per training run × explainer: final AOPC against the final test (else validation) accuracy."""
    df = runs_df[_run_kind(runs_df) == "train"]
    columns = ["run_id", "experiment", "run_name", "model", "data", "explainer", "accuracy", "accuracy_metric",
               "aopc", "aopc_rel"]
    test, val = _col(df, f"metrics.{mn.TEST_ACC}").astype(float), _col(df, f"metrics.{mn.VAL_ACC}").astype(float)
    accuracy = test.where(test.notna(), val)
    metric = pd.Series(np.where(test.notna(), mn.TEST_ACC, mn.VAL_ACC), index=df.index)
    rows = []
    for name in _explainers(df):
        aopc = _col(df, f"metrics.{mn.explainer_metric(mn.AOPC, name)}").astype(float)
        keep = aopc.notna() & accuracy.notna()
        if not keep.any():
            continue
        part = df[keep]
        rows.append(pd.DataFrame({
            "run_id": part.run_id, "experiment": _col(part, "experiment"), "run_name": _col(part, "tags.mlflow.runName"),
            "model": _col(part, "tags.model").fillna(_last_part(_col(part, "params.model.net._target_"))),
            "data": _col(part, "tags.data").fillna(_last_part(_col(part, "params.data._target_"))),
            "explainer": name, "accuracy": accuracy[keep], "accuracy_metric": metric[keep], "aopc": aopc[keep],
            "aopc_rel": _col(part, f"metrics.{mn.explainer_metric(mn.AOPC_REL, name)}").astype(float)}))
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.concat(rows, ignore_index=True)[columns].sort_values(["explainer", "accuracy"], ignore_index=True)


def training_correlation(training: pd.DataFrame) -> pd.DataFrame:
    """Pearson and Spearman correlation of final accuracy and final AOPC across training runs, per explainer.

    The per-epoch correlation of one training run (:func:`~heatmapbench.evaluation.correlation.correlations`)
    applied to one row per run instead of one per epoch.
    """
    columns = ["explainer", "runs", *mn.CORRELATION_METHODS]
    if not len(training):
        return pd.DataFrame(columns=columns)
    wide = training.pivot(index="run_id", columns="explainer", values="aopc")
    wide.columns = [mn.explainer_metric(mn.AOPC, name) for name in wide.columns]
    wide["accuracy"] = training.groupby("run_id").accuracy.first()
    return correlations(wide).rename(columns={"epochs": "runs"})[columns]


def build_report(runs_df: pd.DataFrame, ignore: Sequence[str] = DEFAULT_IGNORE, per_image: pd.DataFrame | None = None,
                 *, n_boot: int = N_BOOT, seed: int = 0) -> Report:
    """All tables of a report from runs as ``mlflow.search_runs(output_format="pandas")`` returns them.

    ``per_image`` (the runs' per-image AOPC tables with a ``run_id`` column, see
    :func:`~heatmapbench.app.report.store.per_image_tables`) adds the across-runs reliability.
    """
    long = long_format(runs_df)
    extra = split_keys(long, ignore)
    training = training_table(runs_df)
    report = Report(comparison=comparison_table(long, extra), runs=long, training=training,
                    training_correlation=training_correlation(training), split_by=extra)
    if per_image is not None and len(per_image):
        data = sorted(long.loc[long.run_id.isin(per_image.run_id), "data"].dropna().astype(str).unique())
        if len(data) > 1:
            report.notes.append(f"reliability across runs needs runs on the same images; these runs use {data}: "
                                "select one data set, e.g. +tags.data=" + data[0])
        else:
            scores = setting_scores(per_image, long, [k for k in extra if k != "data"])
            report.reliability = cross_run_reliability(scores, n_boot=n_boot, seed=seed)
    return report


def comparison_markdown(report: Report) -> str:
    """The comparison as a Markdown table (run ids shortened to 8 characters; the CSV has them in full)."""
    table, extra = report.comparison, report.split_by
    lines: list[str] = []
    if len(table):
        has_abpc = table["abpc"].notna().any()
        head = ["explainer", "region", "perturbation", *extra, "AOPC rel. random [95% CI]", "AOPC"]
        head += ["ABPC [95% CI]"] if has_abpc else []
        head += ["runs", "run ids"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in table.iterrows():
            if pd.notna(r.aopc_rel_lo):
                rel = format_ci(r.aopc_rel, r.aopc_rel_lo, r.aopc_rel_hi)
            elif pd.notna(r.aopc_rel_std):
                rel = f"{format_number(r.aopc_rel)} ± {format_number(r.aopc_rel_std)} (std)"
            else:
                rel = format_number(r.aopc_rel)
            cells = [str(r.explainer), format_number(r.region_size, ".0f"), str(r.perturbation),
                     *(str(r[k]) for k in extra), rel, format_number(r.aopc)]
            if has_abpc:
                cells.append(format_ci(r.abpc, r.abpc_lo, r.abpc_hi) if pd.notna(r.abpc_lo) else format_number(r.abpc))
            cells += [str(r.runs), " ".join(i[:8] for i in r.run_ids.split(";"))]
            lines.append("| " + " | ".join(cells) + " |")
    if len(report.training):
        lines += ["" if lines else "", "AOPC against accuracy across training runs (final values):", "",
                  "| explainer | runs | Pearson | Spearman |", "|---|---|---|---|"]
        for _, r in report.training_correlation.iterrows():
            lines.append(f"| {r.explainer} | {r.runs} | {format_number(r.pearson, '+.3f')} | "
                         f"{format_number(r.spearman, '+.3f')} |")
    return "\n".join(lines).lstrip("\n") + "\n"
