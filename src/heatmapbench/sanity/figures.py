"""Figures of the randomisation test: similarity against the layer randomised (Adebayo et al. Fig. 2)
and the heatmap grid (rows explainers, columns randomisation depth)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from heatmapbench.evaluation.style import STYLE  # noqa: E402
from heatmapbench.sanity.mprt import TRAINED, MPRTResult  # noqa: E402

#: Axis labels of the measures.
MEASURE_LABELS = {"spearman_abs": "Spearman ρ of |h|", "ssim": "SSIM", "topk": "top-k intersection"}


def save_panels(fig, axes, ylabel: str, title: str, path: Path) -> None:
    """Label the first panel, put the legend in the last, title, save and close a row of panels."""
    axes[0, 0].set_ylabel(ylabel)
    axes[0, -1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_similarity(summary: pd.DataFrame, path: Path, title: str = "") -> None:
    """One panel per measure: mean similarity (95% CI band) against the layers randomised, one line per explainer.

    The x axis starts at the trained model (similarity 1) and goes from the output layer down, as
    Adebayo et al.'s Fig. 2; a line that stays high marks an explainer insensitive to the weights.
    """
    measures = list(dict.fromkeys(summary.measure))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(measures), figsize=(5.2 * len(measures), 4.2), squeeze=False, sharey=True)
        for ax, measure in zip(axes[0], measures):
            part = summary[summary.measure == measure]
            layers = [TRAINED] + list(dict.fromkeys(part.sort_values("depth").layer))
            for name, line in part.groupby("explainer", sort=False):
                line = line.sort_values("depth")
                xs = [0, *line.depth]
                ax.plot(xs, [1.0, *line["mean"]], marker="o", ms=3, label=name)
                ax.fill_between(line.depth, line.lo, line.hi, alpha=0.2)
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=90, fontsize=7)
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_title(MEASURE_LABELS.get(measure, measure))
            ax.set_xlabel("layer randomised (output first)")
        save_panels(fig, axes, "similarity to the trained model's heatmap", title, path)


def plot_heatmap_grid(result: MPRTResult, path: Path, image: int = 0) -> None:
    """Rows explainers, columns the trained model then every randomisation step: |h| / max |h| of one image."""
    names = list(result.gallery)
    columns = [TRAINED] + [s.label for s in result.steps]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(names), len(columns) + 1, squeeze=False,
                                 figsize=(1.3 * (len(columns) + 1), 1.4 * len(names)))
        x = result.gallery_x[image]  # (C, H, W) model space
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        for i, name in enumerate(names):
            axes[i, 0].imshow(x.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
            axes[i, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
            for j, h in enumerate(result.gallery[name][:, image]):
                h = h.abs()
                axes[i, j + 1].imshow((h / h.max().clamp_min(1e-30)).numpy(), cmap="gray", vmin=0, vmax=1)
        for j, label in enumerate(["input", *columns]):
            axes[0, j].set_title(label, fontsize=6, rotation=45 if j else 0)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{result.mode} randomisation, |heatmap| / max", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
