"""``heatmapbench-report``: compare the runs of a sweep, straight from the MLflow store.

One job per module: :mod:`~heatmapbench.app.report.store` reads the runs, :mod:`~heatmapbench.app.report.tables`
builds the tables, :mod:`~heatmapbench.app.report.figures` draws the figures and
:mod:`~heatmapbench.app.report.command` writes them, logs them to a summary run and is the command.
"""

from heatmapbench.app.report.command import main, run_report, write_report
from heatmapbench.app.report.store import filter_string, load_runs, runs_frame
from heatmapbench.app.report.tables import DEFAULT_IGNORE, Report, build_report, comparison_markdown

__all__ = ["DEFAULT_IGNORE", "Report", "build_report", "comparison_markdown", "filter_string", "load_runs", "main",
           "run_report", "runs_frame", "write_report"]
