"""The figures users look at first read right on first sight (what they say, where legends sit)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation import figures as evaluation_figures
from heatmapbench.evaluation.correlation import correlations
from heatmapbench.evaluation.figures import plot_accuracy_vs_aopc
from heatmapbench.evaluation.style import epoch_label


def _history() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for epoch, acc in enumerate([0.1, 0.7, 0.8, 0.85]):
        row = {"epoch": epoch, "step": epoch * 10, "accuracy": acc,
               mn.random_ordering_metric(mn.AOPC): 0.5 + epoch, mn.random_ordering_metric(mn.AOPC_NORM): 0.1}
        for name in ("random", "lrp_epsilon_0.01"):
            for measure in (mn.AOPC, mn.AOPC_REL, mn.AOPC_NORM):
                row[mn.explainer_metric(measure, name)] = float(rng.normal()) + acc
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """The accuracy-vs-AOPC figure as drawn (kept open instead of closed after saving)."""
    figures = []
    monkeypatch.setattr(evaluation_figures.plt, "close", figures.append)
    history = _history()
    corr = correlations(history, measures=mn.CORRELATED_MEASURES, n_boot=200)
    plot_accuracy_vs_aopc(history, tmp_path / "accuracy_vs_aopc.png", corr=corr)
    assert (tmp_path / "accuracy_vs_aopc.png").stat().st_size > 0
    yield figures[0]
    plt.close(figures[0])


def test_accuracy_vs_aopc_panels_stacked_with_legends_outside_the_data(drawn):
    panels = [ax for ax in drawn.axes if ax.get_legend() is not None]
    assert len(panels) == 3  # aopc_rel, aopc_norm, aopc: one above the other
    lefts = {round(ax.get_position().x0, 3) for ax in panels}
    assert len(lefts) == 1
    drawn.canvas.draw()
    renderer = drawn.canvas.get_renderer()
    for ax in panels:
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.y1 <= ax.xaxis.label.get_window_extent(renderer).y0  # below the data and the axis label
    boxes = [ax.get_legend().get_window_extent(renderer) for ax in panels]
    for upper, lower in zip(panels[1:], boxes[:-1]):  # and above the next panel's title
        assert lower.y0 >= upper.title.get_window_extent(renderer).y1 or \
            lower.y0 >= upper._left_title.get_window_extent(renderer).y1


def test_accuracy_vs_aopc_says_n_and_the_ci_and_names_epoch_zero(drawn):
    panels = [ax for ax in drawn.axes if ax.get_legend() is not None]
    for ax in panels:
        assert "n = 4 evaluations" in ax.get_title(loc="left")
        assert ax.get_xticklabels()[0].get_text() == "before\ntraining"
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(t.startswith("lrp_epsilon_0.01: r = ") and "[" in t for t in texts), texts


def test_epoch_label():
    assert epoch_label(0) == "before training"
    assert epoch_label(3) == "after epoch 3"
