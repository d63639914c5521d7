"""``heatmapbench-report``: compare the runs of a sweep, straight from the MLflow store.

    heatmapbench-report sweep_id=multirun/2025-01-31_12-00-00
    heatmapbench-report experiments=[heatmapbench-evaluate,heatmapbench-train] +tags.model=vgg16
    heatmapbench-report filter="metrics.accuracy > 0.5 and params.evaluation.steps = '100'"

Reads the selected runs (experiment, sweep id, tag equality, a raw MLflow filter; FINISHED
only unless ``include_failed=true``) and writes

* ``comparison.md`` / ``comparison.csv``: one row per explainer × region size × perturbation
  (× every other parameter that differs between otherwise equal runs, e.g. the model) with the
  AOPC relative to random (Samek et al. 2015, Eq. 11 minus the random ordering's AOPC, Fig. 4), its 95%
  bootstrap CI when the cell holds one run, the mean over the cell's runs otherwise, AOPC, ABPC
  and the run ids;
* ``runs_long.csv``: every selected evaluate run × explainer;
* ``aopc_vs_region_size.png``: AOPC relative to random against the region size, one line per
  explainer, one panel per perturbation;
* ``aopc_vs_accuracy.csv`` / ``.png`` (when training runs are selected): final AOPC of each
  explainer against the final test (else validation) accuracy, one point per run × explainer
  (the across-runs view of the paper's Fig. 7);

then logs them as artifacts of one summary run in ``summary_experiment``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from scipy import stats  # noqa: E402

from heatmapbench.cli import user_errors_exit  # noqa: E402
from heatmapbench.config import ConfigError, validate  # noqa: E402
from heatmapbench.registry import conf_dir  # noqa: E402
from heatmapbench.tracking import flatten, make_logger, retry_locked, tracked_run  # noqa: E402

#: The cell of the comparison; other parameters join it only when they split a cell.
BASE_KEYS = ("explainer", "region_size", "perturbation")
#: Per-explainer metrics of an evaluate run (``<key>/<explainer>``).
EXPLAINER_METRICS = ("aopc", "aopc_rel", "aopc_rel_lo", "aopc_rel_hi", "aopc_lerf", "abpc", "abpc_lo", "abpc_hi",
                     "png", "jpeg", "entropy")
#: Per-run metrics of an evaluate run.
RUN_METRICS = ("aopc_random", "accuracy", "images", "seconds")
#: ``aopc/<name>`` metrics of the training callback that are not explainers.
NOT_EXPLAINERS = frozenset({"accuracy", "seconds", "subset_accuracy", "random_baseline"})
#: Parameters that never split a cell: replicates (seeds), precision, bookkeeping.
DEFAULT_IGNORE = ("paths.*", "logger.*", "hydra.*", "task_name", "seed", "evaluation.seed", "evaluation.explainers",
                  "evaluation.batch_size", "evaluation.orders", "evaluation.complexity", "evaluation.repeats",
                  "evaluation.random_repeats", "explainer._target_", "device", "progress", "gallery_size", "n_boot",
                  "data.batch_size", "data.num_workers", "data.pin_memory", "data.data_dir", "data.download")


# -- reading the store ---------------------------------------------------------------------
def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _tag_key(key: str) -> str:
    return f"tags.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"tags.`{key}`"


def filter_string(sweep_id: str | None = None, tags: dict[str, Any] | None = None, raw: str | None = None) -> str:
    """One MLflow search filter (clauses joined by ``and``) from a sweep id, tag equalities and a raw filter."""
    parts = []
    if sweep_id:
        parts.append(f"tags.sweep_id = {_quote(str(sweep_id))}")
    for key, value in (tags or {}).items():
        parts.append(f"{_tag_key(str(key))} = {_quote(str(value))}")
    if raw:
        parts.append(str(raw))
    return " and ".join(parts)


def runs_frame(runs: Iterable[Any], experiment_names: dict[str, str] | None = None) -> pd.DataFrame:
    """MLflow runs as the frame ``mlflow.search_runs(output_format="pandas")`` returns, plus ``experiment``."""
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
               "experiment": (experiment_names or {}).get(run.info.experiment_id, run.info.experiment_id),
               "status": run.info.status, "artifact_uri": run.info.artifact_uri,
               "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True)}
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def load_runs(tracking_uri: str, experiments: Sequence[str] | None, *, sweep_id: str | None = None,
              tags: dict[str, Any] | None = None, filter: str | None = None, include_failed: bool = False,
              exclude_experiment: str | None = None) -> pd.DataFrame:
    """The selected runs of ``experiments`` (all but ``exclude_experiment`` when empty) as a frame.

    Raises ``ConfigError`` (nothing is written to the store) when the store or an experiment does
    not exist, the filter is not valid MLflow syntax, or no run matches.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"tracking_uri={tracking_uri!r} is invalid: no MLflow store there; run heatmapbench-evaluate "
                          "or heatmapbench-train first, or point tracking_uri (or paths.mlruns_dir) at the store")
    client = MlflowClient(tracking_uri=tracking_uri)
    known = {e.name: e.experiment_id for e in retry_locked(client.search_experiments)()}
    if experiments:
        unknown = [name for name in experiments if name not in known]
        if unknown:
            raise ConfigError(f"experiments={list(experiments)} is invalid: no experiment {unknown} in {tracking_uri}; "
                              f"known: {sorted(known)}")
        names = list(experiments)
    else:
        names = [name for name in known if name != exclude_experiment]
    query = filter_string(sweep_id, tags, filter)
    ids = [known[name] for name in names]
    try:
        runs = []
        token = None
        while True:  # pages of 1000 runs
            page = retry_locked(client.search_runs)(ids, filter_string=query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as err:
        raise ConfigError(f"filter {query!r} is invalid: {err.message}. MLflow syntax: clauses joined by 'and', e.g. "
                          "tags.model = 'vgg16' and metrics.accuracy > 0.5 and params.`evaluation.steps` = '100'") from err
    df = runs_frame(runs, {v: k for k, v in known.items()})
    if len(df) and "tags.task" in df:
        df = df[df["tags.task"].fillna("") != "report"]  # earlier summaries are not runs to compare
    where = f"experiments {names}" + (f" with filter {query!r}" if query else "")
    if not len(df):
        raise ConfigError(f"no runs match in {where} ({tracking_uri}); check sweep_id/tags/filter/experiments")
    if not include_failed:
        kept = df[df.status == "FINISHED"]
        if not len(kept):
            counts = ", ".join(f"{n} {s}" for s, n in df.status.value_counts().items())
            raise ConfigError(f"no FINISHED runs match in {where} ({counts}); include_failed=true reports them anyway")
        df = kept
    return df.reset_index(drop=True)


# -- the tables ------------------------------------------------------------------------------
@dataclass
class Report:
    """The tables of a report; ``split_by`` are the parameters that joined the comparison's cell."""

    comparison: pd.DataFrame
    runs: pd.DataFrame
    training: pd.DataFrame
    training_correlation: pd.DataFrame
    split_by: list[str] = field(default_factory=list)

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
    guess = np.where(_col(df, "metrics.aopc_random").notna(), "evaluate",
                     np.where(_col(df, "metrics.test/acc").notna() | _col(df, "metrics.val/acc").notna()
                              | _col(df, "params.trainer._target_").notna(), "train", "other"))
    return kind.where(kind.notna() & (kind != ""), pd.Series(guess, index=df.index))


def _explainers(df: pd.DataFrame) -> list[str]:
    """Explainer names of the ``aopc_rel/<name>`` and ``aopc/<name>`` columns, in first-seen order."""
    names: dict[str, None] = {}
    for column in df.columns:
        for prefix in ("metrics.aopc_rel/", "metrics.aopc/"):
            if column.startswith(prefix) and column[len(prefix):] not in NOT_EXPLAINERS:
                names.setdefault(column[len(prefix):])
    return list(names)


def _number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def long_format(runs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluate run × explainer with the run's identity, its parameters and its metrics."""
    df = runs_df[_run_kind(runs_df) == "evaluate"]
    params = [c for c in df.columns if c.startswith("params.")]
    rows = []
    for name in _explainers(df):
        part = df[df.get(f"metrics.aopc_rel/{name}", pd.Series(np.nan, index=df.index)).notna()
                  | df.get(f"metrics.aopc/{name}", pd.Series(np.nan, index=df.index)).notna()]
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
        for key in RUN_METRICS:
            out[key] = _col(part, f"metrics.{key}").astype(float)
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
                      "aopc_random", "png", "jpeg", "entropy", "accuracy", "runs", "run_ids"]
    if not len(long):
        return pd.DataFrame(columns=columns)
    filled = long.copy()
    for key in keys:  # NaN keys would drop out of groupby
        filled[key] = filled[key].astype(object).where(filled[key].notna(), "–")
    grouped = filled.groupby(keys, sort=False)
    means = grouped[["aopc_rel", "aopc", "abpc", "aopc_random", "png", "jpeg", "entropy", "accuracy"]].mean()
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
    test, val = _col(df, "metrics.test/acc").astype(float), _col(df, "metrics.val/acc").astype(float)
    accuracy = test.where(test.notna(), val)
    metric = pd.Series(np.where(test.notna(), "test/acc", "val/acc"), index=df.index)
    rows = []
    for name in _explainers(df):
        aopc = _col(df, f"metrics.aopc/{name}").astype(float)
        keep = aopc.notna() & accuracy.notna()
        if not keep.any():
            continue
        part = df[keep]
        rows.append(pd.DataFrame({
            "run_id": part.run_id, "experiment": _col(part, "experiment"), "run_name": _col(part, "tags.mlflow.runName"),
            "model": _col(part, "tags.model").fillna(_last_part(_col(part, "params.model.net._target_"))),
            "data": _col(part, "tags.data").fillna(_last_part(_col(part, "params.data._target_"))),
            "explainer": name, "accuracy": accuracy[keep], "accuracy_metric": metric[keep], "aopc": aopc[keep],
            "aopc_rel": _col(part, f"metrics.aopc_rel/{name}").astype(float)}))
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.concat(rows, ignore_index=True)[columns].sort_values(["explainer", "accuracy"], ignore_index=True)


def training_correlation(training: pd.DataFrame) -> pd.DataFrame:
    """Pearson and Spearman correlation of final accuracy and final AOPC across training runs, per explainer."""
    rows = []
    for name, part in training.groupby("explainer", sort=False):
        pearson = spearman = float("nan")
        if len(part) >= 3 and part.accuracy.nunique() > 1 and part.aopc.nunique() > 1:
            pearson = float(stats.pearsonr(part.accuracy, part.aopc)[0])
            spearman = float(stats.spearmanr(part.accuracy, part.aopc)[0])
        rows.append({"explainer": name, "runs": len(part), "pearson": pearson, "spearman": spearman})
    return pd.DataFrame(rows, columns=["explainer", "runs", "pearson", "spearman"])


def build_report(runs_df: pd.DataFrame, ignore: Sequence[str] = DEFAULT_IGNORE) -> Report:
    """All tables of a report from runs as ``mlflow.search_runs(output_format="pandas")`` returns them."""
    long = long_format(runs_df)
    extra = split_keys(long, ignore)
    training = training_table(runs_df)
    return Report(comparison=comparison_table(long, extra), runs=long, training=training,
                  training_correlation=training_correlation(training), split_by=extra)


# -- files -----------------------------------------------------------------------------------
def _g(value: Any, fmt: str = ".4g") -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, fmt)


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
            rel = _g(r.aopc_rel)
            if pd.notna(r.aopc_rel_lo):
                rel += f" [{_g(r.aopc_rel_lo)}, {_g(r.aopc_rel_hi)}]"
            elif pd.notna(r.aopc_rel_std):
                rel += f" ± {_g(r.aopc_rel_std)} (std)"
            cells = [str(r.explainer), _g(r.region_size, ".0f"), str(r.perturbation), *(str(r[k]) for k in extra),
                     rel, _g(r.aopc)]
            if has_abpc:
                cells.append(_g(r.abpc) + (f" [{_g(r.abpc_lo)}, {_g(r.abpc_hi)}]" if pd.notna(r.abpc_lo) else ""))
            cells += [str(r.runs), " ".join(i[:8] for i in r.run_ids.split(";"))]
            lines.append("| " + " | ".join(cells) + " |")
    if len(report.training):
        lines += ["" if lines else "", "AOPC against accuracy across training runs (final values):", "",
                  "| explainer | runs | Pearson | Spearman |", "|---|---|---|---|"]
        for _, r in report.training_correlation.iterrows():
            lines.append(f"| {r.explainer} | {r.runs} | {_g(r.pearson, '+.3f')} | {_g(r.spearman, '+.3f')} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def plot_region_sizes(comparison: pd.DataFrame, path: Path, extra: Sequence[str] = ()) -> None:
    """AOPC relative to random against the region size: one panel per perturbation, one line per explainer.

    Error bars: a single run's 95% bootstrap CI, else ± the std over the cell's runs.
    """
    panels = sorted(comparison.perturbation.astype(str).unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), dpi=100, squeeze=False,
                             sharey=True)
    for ax, panel in zip(axes[0], panels):
        part = comparison[comparison.perturbation.astype(str) == panel]
        for label, line in part.groupby(["explainer", *extra], sort=True):
            line = line.sort_values("region_size")
            label = " ".join(str(v) for v in (label if isinstance(label, tuple) else (label,)))
            lo = (line.aopc_rel - line.aopc_rel_lo).fillna(line.aopc_rel_std).fillna(0.0)
            hi = (line.aopc_rel_hi - line.aopc_rel).fillna(line.aopc_rel_std).fillna(0.0)
            ax.errorbar(line.region_size, line.aopc_rel, yerr=np.vstack([lo.to_numpy(), hi.to_numpy()]),
                        marker="o", capsize=3, label=label)
        sizes = sorted(part.region_size.dropna().unique())
        if sizes:
            ax.set_xticks(sizes)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"perturbation: {panel}")
        ax.set_xlabel("region size (pixels per side)")
    axes[0, 0].set_ylabel("AOPC relative to random")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_aopc_runs(training: pd.DataFrame, path: Path) -> None:
    """Final AOPC against final accuracy, one point per training run and explainer."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, part in training.groupby("explainer", sort=True):
        ax.scatter(part.accuracy, part.aopc, label=name)
    ax.set_xlabel("final accuracy (" + ", ".join(sorted(training.accuracy_metric.unique())) + ")")
    ax.set_ylabel("final AOPC (MoRF)")
    ax.set_title(f"AOPC against accuracy, {training.run_id.nunique()} training runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """Write every table and figure of ``report`` into ``folder``; return them by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"comparison_md": folder / "comparison.md", "comparison_csv": folder / "comparison.csv",
             "runs_csv": folder / "runs_long.csv"}
    files["comparison_md"].write_text(report.markdown())
    report.comparison.to_csv(files["comparison_csv"], index=False)
    report.runs.to_csv(files["runs_csv"], index=False)
    if len(report.comparison):
        files["region_size_png"] = folder / "aopc_vs_region_size.png"
        plot_region_sizes(report.comparison, files["region_size_png"], report.split_by)
    if len(report.training):
        files["accuracy_csv"] = folder / "aopc_vs_accuracy.csv"
        files["accuracy_png"] = folder / "aopc_vs_accuracy.png"
        report.training.to_csv(files["accuracy_csv"], index=False)
        report.training_correlation.to_csv(folder / "aopc_vs_accuracy_correlation.csv", index=False)
        files["accuracy_corr_csv"] = folder / "aopc_vs_accuracy_correlation.csv"
        plot_accuracy_vs_aopc_runs(report.training, files["accuracy_png"])
    return files


# -- the command -----------------------------------------------------------------------------
def _selection(cfg: DictConfig) -> dict[str, Any]:
    """The run selection of the config, type-checked."""
    experiments = OmegaConf.to_container(cfg.experiments) if OmegaConf.is_config(cfg.experiments) else cfg.experiments
    if isinstance(experiments, str):
        experiments = [experiments]
    if experiments is not None and not (isinstance(experiments, list) and all(isinstance(e, str) for e in experiments)):
        raise ConfigError(f"experiments={experiments!r} is invalid: give a list of experiment names, "
                          "e.g. experiments=[heatmapbench-evaluate,heatmapbench-train]")
    tags = OmegaConf.to_container(cfg.tags) if OmegaConf.is_config(cfg.tags) else cfg.tags
    if tags is not None and not isinstance(tags, dict):
        raise ConfigError(f"tags={tags!r} is invalid: give tag equalities as +tags.model=vgg16")
    # +tags.mlflow.user=me composes as nested keys: back to the dotted tag name
    return {"experiments": experiments, "sweep_id": cfg.sweep_id, "tags": flatten(tags or {}), "filter": cfg.filter,
            "include_failed": bool(cfg.include_failed)}


def run_report(cfg: DictConfig) -> dict[str, Any]:
    """Select the runs, write the tables and figures, log them to a summary run, print the table."""
    validate(cfg, groups=("paths", "logger"))
    selection = _selection(cfg)
    runs_df = load_runs(cfg.tracking_uri, exclude_experiment=cfg.summary_experiment, **selection)
    ignore = list(cfg.ignore_params) if cfg.get("ignore_params") is not None else DEFAULT_IGNORE
    report = build_report(runs_df, ignore)
    if not len(report.comparison) and not len(report.training):
        raise ConfigError(f"the {len(runs_df)} selected runs hold no AOPC metrics (neither heatmapbench-evaluate nor "
                          "heatmapbench-train runs); check experiments/sweep_id/tags/filter")
    folder = Path(cfg.output_dir)
    files = write_report(report, folder)
    run_id = None
    if cfg.log_summary:
        query = filter_string(selection["sweep_id"], selection["tags"], selection["filter"])
        tags = {"task": "report", "report_experiments": ",".join(sorted(set(runs_df.experiment.astype(str)))),
                "report_filter": query or "(none)", "report_runs": str(len(runs_df)),
                "report_split_by": ",".join(report.split_by) or "(none)"}
        if selection["sweep_id"]:
            tags["sweep_id"] = str(selection["sweep_id"])
        name = f"report {selection['sweep_id'] or query or ','.join(selection['experiments'] or ['all'])}"[:250]
        logger = make_logger(cfg.logger, run_name=cfg.logger.get("run_name") or name)
        with tracked_run(logger, cfg, extra_tags=tags):
            for path in files.values():
                retry_locked(logger.experiment.log_artifact)(logger.run_id, str(path), "report")
            retry_locked(logger.log_metrics)({"runs": float(len(runs_df)), "rows": float(len(report.comparison))})
        run_id = logger.run_id
    print("\n" + report.markdown())
    print(f"{len(runs_df)} runs → {len(report.comparison)} comparison rows"
          + (f", {len(report.training)} training points" if len(report.training) else "")
          + f"; files in {folder}", flush=True)
    if run_id is not None:
        print(f"summary MLflow run {run_id} (experiment {cfg.logger.experiment_name!r}, {cfg.tracking_uri}), "
              "artifacts under report/", flush=True)
    return {"run_id": run_id, "files": files, "report": report, "runs": runs_df}


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="report")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_report(cfg)


if __name__ == "__main__":
    main()
