"""``heatmapbench-report``: compare the runs of a sweep, straight from the MLflow store.

    heatmapbench-report sweep_id=multirun/2025-01-31_12-00-00
    heatmapbench-report experiments=[heatmapbench-evaluate,heatmapbench-train] +tags.model=vgg16
    heatmapbench-report filter="metrics.`eval/accuracy` > 0.5 and params.evaluation.steps = '100'"

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

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from heatmapbench.app.plumbing import launchers_checked, user_errors_exit
from heatmapbench.app.schema import ConfigError, validate
from heatmapbench.metrics.summary import N_BOOT
from heatmapbench.registry import conf_dir
from heatmapbench.app.preflight import check_logger, check_tracking_store
from heatmapbench.app.report.figures import plot_accuracy_vs_aopc_runs, plot_rank_per_setting, plot_region_sizes
from heatmapbench.app.report.agreement import agreement_reports, write_agreement
from heatmapbench.evaluation.reliability import cross_run_reliability_markdown, cross_run_reliability_metrics
from heatmapbench.app.report.store import filter_string, load_runs, per_image_tables
from heatmapbench.app.report.tables import DEFAULT_IGNORE, Report, build_report, long_format
from heatmapbench.app.store import make_logger, retry_locked
from heatmapbench.app.provenance import flatten
from heatmapbench.app.tracking import tracked_run


# -- files -----------------------------------------------------------------------------------
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
    if report.reliability is not None or report.notes:
        files["reliability_md"] = folder / "reliability.md"
        files["reliability_md"].write_text(reliability_markdown_of(report))
    rel = report.reliability
    if rel is not None and "ranking" in rel.settings:
        for kind, table, index in (("settings", rel.settings, False), ("consistency", rel.consistency, False),
                                   ("tau", rel.tau, True)):
            files[f"reliability_{kind}_csv"] = folder / f"reliability_{kind}.csv"
            table.to_csv(files[f"reliability_{kind}_csv"], index=index)
        files["rank_png"] = folder / "rank_per_setting.png"
        w = rel.agreement.get("kendall_w", float("nan"))
        plot_rank_per_setting(rel.settings, rel.explainers, files["rank_png"],
                              title=f"rank per setting (1 = best), Kendall's W = {w:.2f}")
    return files


def reliability_markdown_of(report: Report) -> str:
    """The across-runs reliability of ``report`` as Markdown, with why parts of it are missing."""
    text = cross_run_reliability_markdown(report.reliability) if report.reliability is not None else ""
    return text + "".join(f"\nNote: {note}.\n" for note in report.notes)


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
    if str(cfg.tracking_uri).startswith(("http://", "https://")):
        check_tracking_store(cfg.tracking_uri)  # an unreachable server fails in ~10 s, not after minutes of retries
    if cfg.log_summary:
        check_logger(cfg.logger)
    runs_df = load_runs(cfg.tracking_uri, exclude_experiment=cfg.summary_experiment, **selection)
    ignore = list(cfg.ignore_params) if cfg.get("ignore_params") is not None else DEFAULT_IGNORE
    per_image = None
    if cfg.get("reliability", True):
        evaluated = runs_df[runs_df.run_id.isin(long_format(runs_df).run_id)]
        per_image, missing = per_image_tables(evaluated)
        if missing:
            print(f"{len(missing)} of {len(evaluated)} evaluate runs have no per-image table (evaluated before it "
                  "was logged): the reliability across runs leaves them out", flush=True)
    report = build_report(runs_df, ignore, per_image, n_boot=int(cfg.get("n_boot", N_BOOT)), seed=int(cfg.get("seed", 0)))
    if not len(report.comparison) and not len(report.training):
        raise ConfigError(f"the {len(runs_df)} selected runs hold no AOPC metrics (neither heatmapbench-evaluate nor "
                          "heatmapbench-train runs); check experiments/sweep_id/tags/filter")
    folder = Path(cfg.output_dir)
    files = write_report(report, folder)
    agreements = []
    if cfg.get("agreement", True):  # several measures of the same explainers and model: do they agree?
        agreements = agreement_reports(report.runs, per_image, runs_df, n_boot=int(cfg.get("n_boot", N_BOOT)),
                                       seed=int(cfg.get("seed", 0)))
        if agreements:
            files.update(write_agreement(agreements, folder))
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
            metrics = {"runs": float(len(runs_df)), "rows": float(len(report.comparison))}
            if report.reliability is not None:
                metrics.update(cross_run_reliability_metrics(report.reliability))
            retry_locked(logger.log_metrics)(metrics)
        run_id = logger.run_id
    print("\n" + report.markdown())
    if "reliability_md" in files:
        print(files["reliability_md"].read_text())
    if "agreement_md" in files:
        print(files["agreement_md"].read_text())
    print(f"{len(runs_df)} runs → {len(report.comparison)} comparison rows"
          + (f", {len(report.training)} training points" if len(report.training) else "")
          + f"; files in {folder}", flush=True)
    if run_id is not None:
        print(f"summary MLflow run {run_id} (experiment {cfg.logger.experiment_name!r}, {cfg.tracking_uri}), "
              "artifacts under report/", flush=True)
    return {"run_id": run_id, "files": files, "report": report, "runs": runs_df, "agreement": agreements}


@launchers_checked
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="report")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_report(cfg)

