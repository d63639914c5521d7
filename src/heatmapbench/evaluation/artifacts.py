"""Tables and figures of an :class:`~heatmapbench.evaluation.core.Evaluation`, as files.

The same writers serve the training callback (per epoch) and ``heatmapbench-evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from heatmapbench import metric_names as mn  # noqa: E402
from heatmapbench.evaluation.core import Evaluation  # noqa: E402
from heatmapbench.metrics.summary import N_BOOT, Statistics, format_p  # noqa: E402
from heatmapbench.evaluation.reliability import (  # noqa: E402
    per_image_table,
    reliability_markdown,
    run_reliability,
    write_table,
)


def write_curves_csv(evaluation: Evaluation, path: Path) -> pd.DataFrame:
    """Explainer × step table of AOPC_L and AOPC_L relative to random, with CIs."""
    table = evaluation.curves_table()
    table.to_csv(path, index=False)
    return table


def plot_aopc_curves(evaluation: Evaluation, path: Path, title: str = "") -> None:
    """Paper Fig. 4: AOPC relative to random against the perturbation step, one line per explainer."""
    table = evaluation.curves_table()
    table = table[table.order == "morf"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, part in table.groupby("explainer", sort=False):
        ax.plot(part.step, part.aopc_rel, label=name)
        ax.fill_between(part.step, part.aopc_rel_lo, part.aopc_rel_hi, alpha=0.15)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("perturbation steps L")
    ax.set_ylabel("AOPC relative to random")
    ax.set_title(title or f"MoRF, {evaluation.num_images} images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gallery(evaluation: Evaluation, path: Path, class_names: Sequence[str] = (), n: int = 6) -> None:
    """A few images (rows) × explainers (columns), with each image's predicted class."""
    if evaluation.gallery_x is None:
        raise ValueError("the evaluation holds no gallery images (gallery_size=0)")
    names = evaluation.explainers
    n = min(n, evaluation.gallery_x.shape[0])
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.6 * (len(names) + 1), 1.7 * n), dpi=100,
                             squeeze=False)
    for i in range(n):
        img = evaluation.gallery_x[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        pred = int(evaluation.target[i]) if evaluation.target is not None else -1
        label = class_names[pred] if 0 <= pred < len(class_names) else str(pred)
        axes[i, 0].set_title(f"pred: {label}"[:22], fontsize=7)
        for j, name in enumerate(names, start=1):
            h = evaluation.gallery_heatmaps[name][i].numpy()
            v = float(np.abs(h).max()) or 1.0
            axes[i, j].imshow(h, cmap="seismic", vmin=-v, vmax=v)
            if i == 0:
                axes[i, j].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_markdown(summary: pd.DataFrame, pairwise: pd.DataFrame | None = None) -> str:
    """The paper-style tables as Markdown: AOPC relative to random with CI, ABPC, Table I, tests."""
    lines = ["| explainer | AOPC rel. random [95% CI] | AOPC | ABPC [95% CI] | PNG bytes | JPEG-90 bytes | entropy |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda r, k: (f"{r[k]:.4g} [{r[k + '_lo']:.4g}, {r[k + '_hi']:.4g}]"  # noqa: E731
                        if k in r and pd.notna(r[k]) else "–")
    num = lambda r, k, f: format(r[k], f) if k in r and pd.notna(r[k]) else "–"  # noqa: E731
    for _, row in summary.sort_values(mn.AOPC_REL, ascending=False).iterrows():
        lines.append(f"| {row.explainer} | {fmt(row, mn.AOPC_REL)} | {num(row, mn.AOPC, '.4g')} | {fmt(row, mn.ABPC)} | "
                     f"{num(row, mn.COMPLEXITY_PNG, '.0f')} | {num(row, mn.COMPLEXITY_JPEG, '.0f')} | "
                     f"{num(row, mn.COMPLEXITY_ENTROPY, '.3f')} |")
    if mn.random_ordering_metric(mn.AOPC) in summary.attrs:
        m, lo, hi = summary.attrs[mn.random_ordering_metric(mn.AOPC)]
        lines.append(f"\nRandom ordering: AOPC {m:.4g} [{lo:.4g}, {hi:.4g}].")
    if pairwise is not None and len(pairwise):
        n_boot = int(pairwise.attrs.get("n_boot", N_BOOT))
        alpha = pairwise.attrs.get("alpha", 0.05)
        lines += ["", f"Paired bootstrap tests ({n_boot} resamples of the images), one-sided p of \"A beats B\"; "
                      f"Holm–Bonferroni over all {len(pairwise)} ordered pairs.", "",
                  f"| A | B | mean(A − B) [95% CI] | p | Holm p | significant (Holm p < {alpha:g}) |",
                  "|---|---|---|---|---|---|"]
        for _, r in pairwise.iterrows():
            if r.mean_diff > 0:
                lines.append(f"| {r.a} | {r.b} | {r.mean_diff:.4g} [{r.lo:.4g}, {r.hi:.4g}] | "
                             f"{format_p(r.p_value, n_boot)} | {format_p(r.p_holm, n_boot)} | "
                             f"{'yes' if r.significant else 'no'} |")
    return "\n".join(lines) + "\n"


def correlations(history: pd.DataFrame, accuracy: str = "accuracy") -> pd.DataFrame:
    """Pearson and Spearman correlation between accuracy and each ``aopc/<explainer>`` over epochs."""
    rows = []
    for name in mn.explainers_in(history.columns, measures=(mn.AOPC,)):
        column = mn.explainer_metric(mn.AOPC, name)
        part = history[[accuracy, column]].dropna()
        pearson = spearman = float("nan")
        if len(part) >= 3 and part[accuracy].nunique() > 1 and part[column].nunique() > 1:
            pearson = float(stats.pearsonr(part[accuracy], part[column])[0])
            spearman = float(stats.spearmanr(part[accuracy], part[column])[0])
        rows.append({"explainer": name, "pearson": pearson, "spearman": spearman, "epochs": len(part)})
    return pd.DataFrame(rows, columns=["explainer", "pearson", "spearman", "epochs"])


def plot_accuracy_vs_aopc(history: pd.DataFrame, path: Path, accuracy: str = "accuracy") -> None:
    """Paper Fig. 7: accuracy (left axis) and AOPC per explainer (right axis) against the epoch."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot(history.epoch, history[accuracy], color="black", marker="o", label=accuracy)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    for name in mn.explainers_in(history.columns, measures=(mn.AOPC,)):
        column = mn.explainer_metric(mn.AOPC, name)
        ax2.plot(history.epoch, history[column], marker=".", ls="--", label=column)
    ax2.set_ylabel("AOPC (MoRF)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=7, loc="lower right")
    ax.set_title("Accuracy and AOPC during training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_evaluation(evaluation: Evaluation, folder: Path, class_names: Sequence[str] = (),
                     title: str = "", statistics: Statistics | None = None,
                     reliability: dict | None = None) -> dict[str, Path]:
    """Write every artifact of one evaluation into ``folder``; return them by kind.

    ``statistics`` is the evaluation's one bootstrap (:meth:`Evaluation.statistics`), shared with
    whatever else the caller logs or prints; by default it is computed here. ``reliability`` is
    :func:`~heatmapbench.evaluation.reliability.run_reliability` of the evaluation's per-image
    table, when the caller already has it (computed here otherwise, from the same resampling).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {"curves": folder / "aopc_curves.csv", "plot": folder / "aopc_curves.png",
             "summary_csv": folder / "summary.csv", "summary_md": folder / "summary.md",
             "pairwise": folder / "pairwise_tests.csv"}
    write_curves_csv(evaluation, files["curves"])
    plot_aopc_curves(evaluation, files["plot"], title)
    computed = evaluation.statistics() if statistics is None else statistics
    summary, pairwise = computed.summary, computed.pairwise
    summary.to_csv(files["summary_csv"], index=False)
    pairwise.to_csv(files["pairwise"], index=False)
    files["summary_md"].write_text(summary_markdown(summary, pairwise))
    table = per_image_table(evaluation)
    files["per_image"] = write_table(table, folder)
    if reliability is None:
        reliability = run_reliability(table, n_boot=computed.n_boot, seed=computed.seed)
    files["reliability_csv"] = folder / "reliability.csv"
    files["reliability_md"] = folder / "reliability.md"
    reliability["ranking"].merge(reliability["alpha"], on="order", how="left").to_csv(files["reliability_csv"],
                                                                                      index=False)
    files["reliability_md"].write_text(reliability_markdown(reliability))
    if evaluation.gallery_x is not None:
        files["gallery"] = folder / "heatmap_gallery.png"
        plot_gallery(evaluation, files["gallery"], class_names)
    return files
