"""Hooker et al.'s Fig. 4: test accuracy after retraining against the fraction of pixels replaced."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from heatmapbench.evaluation.style import STYLE  # noqa: E402
from heatmapbench.roar.retrain import UNMODIFIED  # noqa: E402
from heatmapbench.sanity.figures import save_panels  # noqa: E402


def plot_accuracy(table: pd.DataFrame, path: Path, title: str = "", baseline: str = "random") -> None:
    """One panel per method (ROAR, KAR): mean test accuracy over seeds against t, the seeds' range as a
    band, one line per explainer (``baseline`` dashed); t = 0 is the retraining on unmodified images."""
    methods = [m for m in ("roar", "kar") if m in set(table.method)]
    base = table[table.method == UNMODIFIED].accuracy
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(5.4 * max(1, len(methods)), 4.0),
                                 squeeze=False, sharey=True)
        for ax, method in zip(axes[0], methods):
            part = table[table.method == method]
            for name, rows in part.groupby("explainer", sort=True):
                stats = rows.groupby("fraction").accuracy.agg(["mean", "min", "max"]).reset_index()
                if len(base):
                    stats = pd.concat([pd.DataFrame({"fraction": [0.0], "mean": [base.mean()], "min": [base.min()],
                                                     "max": [base.max()]}), stats], ignore_index=True)
                style = {"ls": "--", "color": "grey"} if name == baseline else {}
                ax.plot(stats.fraction * 100, stats["mean"], marker="o", ms=3, label=name, **style)
                ax.fill_between(stats.fraction * 100, stats["min"], stats["max"], alpha=0.15,
                                color=style.get("color"))
            ax.set_title({"roar": "ROAR: top-t replaced (lower = better)",
                          "kar": "KAR: bottom-t replaced (higher = better)"}[method])
            ax.set_xlabel("t, % of pixels replaced")
        save_panels(fig, axes, "test accuracy after retraining", title, path)
