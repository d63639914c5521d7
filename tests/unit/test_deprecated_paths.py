"""Old import paths keep working for one release: each warns once with the new home, then forwards."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.helpers import cli_env

#: old module -> (new module, a name both must give the same object for)
MOVED = {
    "heatmapbench.explain.graph": ("heatmapbench.explain.canonize", "canonize"),
    "heatmapbench.fuse": ("heatmapbench.accel.fusion", "fused"),
    "heatmapbench.runtime": ("heatmapbench.accel.layout", "channels_last"),
    "heatmapbench.train": ("heatmapbench.app.train", "run_train"),
    "heatmapbench.evaluate": ("heatmapbench.app.evaluate", "run_evaluate"),
    "heatmapbench.cli": ("heatmapbench.app.plumbing", "user_errors_exit"),
    "heatmapbench.adapt": ("heatmapbench.app.adapt_model", "apply_model_preprocessing"),
    "heatmapbench.config": ("heatmapbench.app.schema", "ConfigError"),
    "heatmapbench.config.schema": ("heatmapbench.app.schema", "validate"),
    "heatmapbench.tracking": ("heatmapbench.app.tracking", "tracked_run"),
    "heatmapbench.preflight": ("heatmapbench.app.preflight", "check_logger"),
    "heatmapbench.ui": ("heatmapbench.app.ui", "training_view_urls"),
    "heatmapbench.metric_names": ("heatmapbench.metrics.names", "explainer_metric"),
    "heatmapbench.report": ("heatmapbench.app.report", "run_report"),
    "heatmapbench.report.cli": ("heatmapbench.app.report.command", "run_report"),
    "heatmapbench.report.store": ("heatmapbench.app.report.store", "load_runs"),
    "heatmapbench.report.tables": ("heatmapbench.app.report.tables", "build_report"),
    "heatmapbench.report.reliability": ("heatmapbench.evaluation.reliability", "cross_run_reliability"),
    "heatmapbench.app.report.reliability": ("heatmapbench.evaluation.reliability", "cross_run_reliability"),
    "heatmapbench.evaluation.artifacts": ("heatmapbench.evaluation.writer", "write_evaluation"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_forwards(old, monkeypatch):
    new, name = MOVED[old]
    for module in [m for m in sys.modules if m == old or m.startswith(old + ".")]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated .* import from {new} instead"):
        shim = importlib.import_module(old)
    assert getattr(shim, name) is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match=f"it moved to {new}"):
        shim.no_such_name  # noqa: B018


def test_renamed_names_keep_their_meaning(monkeypatch):
    """The report's ``reliability_metrics`` (across runs) and the evaluation's (one run) got distinct names
    in their one home; each old name still gives the function it gave."""
    from heatmapbench.evaluation import reliability

    for old in ("heatmapbench.app.report.reliability", "heatmapbench.evaluation.artifacts"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning):
        report = importlib.import_module("heatmapbench.app.report.reliability")
    assert report.reliability_metrics is reliability.cross_run_reliability_metrics
    assert report.reliability_markdown is reliability.cross_run_reliability_markdown
    with pytest.warns(DeprecationWarning, match="evaluation.reliability.reliability_markdown is deprecated .* use "
                                                "heatmapbench.evaluation.reliability.run_reliability_markdown"):
        assert reliability.reliability_markdown is reliability.run_reliability_markdown
    with pytest.warns(DeprecationWarning):
        artifacts = importlib.import_module("heatmapbench.evaluation.artifacts")
    from heatmapbench.evaluation import figures, markdown, style

    assert (artifacts.STYLE, artifacts.summary_markdown, artifacts.plot_gallery) == (
        style.STYLE, markdown.summary_markdown, figures.plot_gallery)


#: ``python -m <old>`` for each old command path, in one interpreter: runpy.run_module with run_name
#: "__main__" is what ``-m`` runs (each command's Hydra state is cleared when its ``main`` returns)
PYTHON_M = """
import runpy, sys
for old in sys.argv[1:]:
    sys.argv = [old, "--cfg", "job"]
    print(f"=== {old}", flush=True)
    try:
        runpy.run_module(old, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    print(f"=== {old} exit {code}", flush=True)
"""


def test_python_m_old_command_paths_still_run(tmp_path):
    olds = ("heatmapbench.train", "heatmapbench.evaluate", "heatmapbench.report")
    proc = subprocess.run([sys.executable, "-c", PYTHON_M, *olds], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for old in olds:
        shown = proc.stdout.split(f"=== {old}\n", 1)[1].split(f"=== {old} exit ", 1)
        assert shown[1].startswith("0\n") and "paths:" in shown[0], (old, proc.stdout[-2000:], proc.stderr[-2000:])
