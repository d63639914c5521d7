"""The figures of an evaluation: the AOPC curves (paper Fig. 4), the heatmap gallery, and accuracy
against AOPC during training (paper Fig. 7); every one drawn under :data:`~heatmapbench.evaluation.style.STYLE`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from heatmapbench.evaluation.core import Evaluation  # noqa: E402
from heatmapbench.evaluation.markdown import random_ordering_note  # noqa: E402
from heatmapbench.evaluation.style import RANDOM_ORDERING_LABEL, STYLE  # noqa: E402
from heatmapbench.metrics import names as mn  # noqa: E402
from heatmapbench.metrics.summary import curves_table  # noqa: E402

__all__ = ["plot_accuracy_vs_aopc", "plot_aopc_curves", "plot_gallery", "write_figures"]


def plot_aopc_curves(evaluation: Evaluation, path: Path, title: str = "") -> None:
    """Paper Fig. 4: AOPC_L against the perturbation steps L.

    Left: the absolute MoRF curve of each explainer beside the random ordering's curve and its
    95% band (the paper's view); right: the same curves relative to the random ordering.
    Bands are mean ± 1.96 s.e.m. over images.
    """
    table = evaluation.curves_table()
    table = table[table.order == "morf"]
    rand = curves_table({RANDOM_ORDERING_LABEL: {"morf": evaluation.random_curves}}, evaluation.random_curves)
    with plt.rc_context(STYLE):
        fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.8))
        ax.plot(rand.step, rand.aopc, color="0.35", ls="--", lw=2, label=RANDOM_ORDERING_LABEL)
        ax.fill_between(rand.step, rand.aopc_lo, rand.aopc_hi, color="0.5", alpha=0.25)
        for name, part in table.groupby("explainer", sort=False):
            line, = ax.plot(part.step, part.aopc, label=name)
            ax.fill_between(part.step, part.aopc_lo, part.aopc_hi, color=line.get_color(), alpha=0.12)
            ax_rel.plot(part.step, part.aopc_rel, color=line.get_color(), label=name)
            ax_rel.fill_between(part.step, part.aopc_rel_lo, part.aopc_rel_hi, color=line.get_color(), alpha=0.12)
        ax_rel.axhline(0.0, color="0.35", lw=1.2, ls="--", label=RANDOM_ORDERING_LABEL)
        ax.set_xlabel("perturbation steps L")
        ax.set_ylabel("AOPC$_L$ (MoRF)")
        ax.set_title("AOPC (higher: the heatmap finds what matters)")
        ax_rel.set_xlabel("perturbation steps L")
        ax_rel.set_ylabel("AOPC$_L$ − AOPC$_L$(random ordering)")
        ax_rel.set_title("relative to the random ordering")
        ax.legend(loc="upper left")
        fig.suptitle(title or f"MoRF, {evaluation.num_images} images")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def plot_gallery(evaluation: Evaluation, path: Path, class_names: Sequence[str] = (), n: int = 6,
                 title: str = "") -> None:
    """Images (rows) × explainers (columns) on one colour scale.

    Each image is titled with its true label, the predicted (scored) class and the clean score
    f(x⁽⁰⁾); each heatmap is divided by its own largest |relevance| so that one colour bar,
    from −1 to 1, reads every panel.
    """
    if evaluation.gallery_x is None:
        raise ValueError("the evaluation holds no gallery images (gallery_size=0)")
    names = evaluation.explainers
    n = min(n, evaluation.gallery_x.shape[0])
    label_of = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)  # noqa: E731
    with plt.rc_context(STYLE):
        cols = len(names) + 1
        fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols + 0.8, 2.35 * n), squeeze=False)
        image = None
        for i in range(n):
            img = evaluation.gallery_x[i].permute(1, 2, 0).numpy()
            axes[i, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            lines = []
            if evaluation.label is not None:
                lines.append(f"true: {label_of(int(evaluation.label[i]))}"[:24])
            if evaluation.target is not None:
                lines.append(f"pred: {label_of(int(evaluation.target[i]))}"[:24])
            if evaluation.clean_scores is not None:
                lines.append(f"score f(x⁰) = {float(evaluation.clean_scores[i]):.3g}")
            axes[i, 0].set_title("\n".join(lines), fontsize=9, loc="left")
            for j, name in enumerate(names, start=1):
                h = evaluation.gallery_heatmaps[name][i].float().numpy()
                v = float(np.abs(h).max()) or 1.0
                image = axes[i, j].imshow(h / v, cmap="seismic", vmin=-1, vmax=1)
                if i == 0:
                    axes[i, j].set_title(name, fontsize=10)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(title or "heatmaps", fontsize=12)
        fig.tight_layout(rect=(0, 0, 0.93, 1))
        if image is not None:
            bar = fig.colorbar(image, ax=axes[:, 1:].ravel().tolist(), fraction=0.025, pad=0.02)
            bar.set_label("relevance / max |relevance| of each heatmap")
        fig.savefig(path)
        plt.close(fig)


def plot_accuracy_vs_aopc(history: pd.DataFrame, path: Path, accuracy: str = "accuracy",
                          corr: pd.DataFrame | None = None, title: str = "") -> None:
    """Paper Fig. 7: accuracy and each explainer's AOPC against the epoch, one panel per measure.

    Panels are stacked, in the order of :data:`~heatmapbench.metrics.names.CORRELATED_MEASURES`
    (relative to the random ordering first), so the figure reads in a narrow artifact pane; the
    raw and normalised panels also draw the random ordering. Legends sit below the data and give
    each line's Pearson r with accuracy and its 95% CI when ``corr`` is given; each panel says over
    how many evaluations r was taken. Epoch 0 is labelled "before training".
    """
    names = mn.explainers_in(history.columns, measures=(mn.AOPC,))
    measures = [m for m in mn.CORRELATED_MEASURES if any(mn.explainer_metric(m, n) in history for n in names)]
    rows = {} if corr is None else {(r.explainer, r.measure): r for _, r in corr.iterrows()}

    def label(who: str, measure: str) -> str:
        r = rows.get((who, measure))
        if r is None or pd.isna(r.pearson):
            return who
        ci = "" if pd.isna(r.pearson_lo) else f" [{r.pearson_lo:+.2f}, {r.pearson_hi:+.2f}]"
        return f"{who}: r = {r.pearson:+.2f}{ci}"

    epochs = [int(e) for e in history.epoch]
    ticks = ["before\ntraining" if e == 0 else str(e) for e in epochs]
    evaluations = int(history[accuracy].notna().sum())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(measures), 1, figsize=(9.0, 4.4 * len(measures)), squeeze=False,
                                 layout="constrained")
        for ax, measure in zip(axes[:, 0], measures):
            ax.plot(epochs, history[accuracy], color="black", marker="o", lw=2, label="accuracy")
            ax.set_xticks(epochs, ticks)
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy")
            ax2 = ax.twinx()
            for k, name in enumerate(names):
                column = mn.explainer_metric(measure, name)
                if column in history:
                    ax2.plot(epochs, history[column], marker=".", color=f"C{k}", label=label(name, measure))
            if measure != mn.AOPC_REL and mn.random_ordering_metric(measure) in history:
                ax2.plot(epochs, history[mn.random_ordering_metric(measure)], color="0.35", ls="--", lw=2,
                         label=label(RANDOM_ORDERING_LABEL, measure))
            if measure == mn.AOPC_REL:
                ax2.axhline(0.0, color="0.35", ls="--", lw=1.2, label="random ordering (0)")
            ax2.set_ylabel(mn.MEASURE_LABELS[measure])
            heading = mn.MEASURE_LABELS[measure]
            if corr is not None:
                heading += f" · r with accuracy over n = {evaluations} evaluations [95% CI]"
            ax.set_title(heading, loc="left", fontsize=10)
            handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
            # below the panel, clear of the data (the constrained layout makes room for it)
            ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8,
                      frameon=False)
        note = "" if corr is None else random_ordering_note(corr)
        note = textwrap.fill(note.replace(" = ", "\u00a0=\u00a0"), width=95)  # never "r" / "= +0.94"
        fig.suptitle((title or "Accuracy and AOPC during training") + (f"\n{note}" if note else ""), fontsize=11)
        fig.savefig(path)
        plt.close(fig)


def write_figures(evaluation: Evaluation, folder: Path, class_names: Sequence[str] = (),
                  title: str = "") -> dict[str, Path]:
    """The figures of one evaluation: the AOPC curves and, with gallery images, the heatmap gallery."""
    files = {"plot": folder / "aopc_curves.png"}
    plot_aopc_curves(evaluation, files["plot"], title)
    if evaluation.gallery_x is not None:
        files["gallery"] = folder / "heatmap_gallery.png"
        plot_gallery(evaluation, files["gallery"], class_names, title=title)
    return files
