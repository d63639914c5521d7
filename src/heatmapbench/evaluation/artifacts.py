"""Tables and figures of an :class:`~heatmapbench.evaluation.core.Evaluation`, as files.

The same writers serve the training callback (per epoch) and ``heatmapbench-evaluate``.
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

from heatmapbench.metrics import names as mn  # noqa: E402
from heatmapbench.evaluation.core import Evaluation  # noqa: E402
from heatmapbench.metrics.summary import (  # noqa: E402
    CORRELATIONS,
    N_BOOT,
    Statistics,
    correlation_ci,
    curves_table,
    format_p,
)
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


#: Figures: paper-ready resolution and fonts (every writer here draws under it).
STYLE = {"figure.dpi": 150, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
         "legend.fontsize": 9, "xtick.labelsize": 10, "ytick.labelsize": 10, "savefig.bbox": "tight"}
#: How the random-ordering baseline is labelled in tables and figures (it is not the ``random`` explainer).
RANDOM_ORDERING_LABEL = "random ordering"


def settings_title(settings, perturbation, images: int, prefix: str = "") -> str:
    """``"<prefix>MoRF · 9×9 grid regions · L=100 · uniform · 64 images"``: the settings a figure shows."""
    name = type(perturbation).__name__.lower() if perturbation is not None else "?"
    parts = [f"{settings.region_size}×{settings.region_size} {settings.regions} regions", f"L={settings.steps}",
             f"perturbation: {name}", f"{settings.score}", f"{images} images"]
    return prefix + " · ".join(parts)


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


def correlations(history: pd.DataFrame, accuracy: str = "accuracy", measures: Sequence[str] = (mn.AOPC,),
                 n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Correlation of accuracy with each measure of each explainer across the rows (epochs or runs).

    ``history`` has an ``accuracy`` column and metric-name columns (``aopc_rel/<explainer>``,
    ``eval/random_ordering/aopc``, …); every explainer × measure present gives one row, and the
    random ordering (``explainer`` = :data:`RANDOM_ORDERING_LABEL`) one per measure it has. Pearson
    and Spearman with percentile-bootstrap CIs over the rows
    (:func:`~heatmapbench.metrics.summary.correlation_ci`).
    """
    columns = ["explainer", "measure", *(f"{m}{b}" for m in CORRELATIONS for b in ("", "_lo", "_hi")), "epochs"]
    subjects = [(name, measure, mn.explainer_metric(measure, name))
                for name in mn.explainers_in(history.columns, measures=measures) for measure in measures]
    subjects += [(RANDOM_ORDERING_LABEL, measure, mn.random_ordering_metric(measure))
                 for measure in measures if measure in (mn.AOPC, mn.AOPC_NORM)]
    rows = []
    for name, measure, column in subjects:
        if column not in history.columns:
            continue
        part = history[[accuracy, column]].dropna()
        row: dict = {"explainer": name, "measure": measure, "epochs": len(part)}
        for method in CORRELATIONS:
            r, lo, hi = correlation_ci(part[accuracy], part[column], method, n_boot=n_boot, seed=seed)
            row.update({method: r, f"{method}_lo": lo, f"{method}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def random_ordering_note(corr: pd.DataFrame, threshold: float = 0.5) -> str:
    """A plain sentence when the random ordering's AOPC correlates with accuracy (|Pearson r| ≥ threshold)."""
    rand = corr[(corr.explainer == RANDOM_ORDERING_LABEL) & (corr.pearson.abs() >= threshold)]
    if not len(rand):
        return ""
    found = ", ".join(f"{mn.MEASURE_LABELS[r.measure]} r = {r.pearson:+.2f}" for _, r in rand.iterrows())
    return (f"The random ordering correlates with accuracy too ({found}): those measures grow with the "
            "network's scores whatever the heatmap, so their correlation says little about the heatmaps; "
            "read AOPC relative to the random ordering.")


def correlation_markdown(corr: pd.DataFrame) -> str:
    """The correlations as a Markdown table, AOPC relative to random first, then the random ordering's note."""
    measures = [m for m in mn.CORRELATED_MEASURES if m in set(corr.measure)]
    head = ["explainer"] + [f"r(accuracy, {mn.MEASURE_LABELS[m]}) [95% CI]" for m in measures]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda r: "–" if pd.isna(r.pearson) else (  # noqa: E731
        f"{r.pearson:+.2f}" + ("" if pd.isna(r.pearson_lo) else f" [{r.pearson_lo:+.2f}, {r.pearson_hi:+.2f}]"))
    for name, part in corr.groupby("explainer", sort=False):
        by = part.set_index("measure")
        lines.append("| " + " | ".join([name] + [cell(by.loc[m]) if m in by.index else "–" for m in measures]) + " |")
    note = random_ordering_note(corr)
    epochs = int(corr.epochs.max()) if len(corr) else 0
    lines.append(f"\nPearson r over {epochs} evaluations; CIs: percentile bootstrap over the evaluations "
                 "(rough with few evaluations; none below 4).")
    return "\n".join(lines + ([note] if note else [])) + "\n"


def epoch_label(epoch: int) -> str:
    """How an evaluation's epoch reads in titles and on axes: epoch 0 is the untrained network."""
    return "before training" if int(epoch) == 0 else f"after epoch {int(epoch)}"


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


def write_evaluation(evaluation: Evaluation, folder: Path, class_names: Sequence[str] = (),
                     title: str = "", statistics: Statistics | None = None,
                     reliability: dict | None = None, figures: bool = True) -> dict[str, Path]:
    """Write every artifact of one evaluation into ``folder``; return them by kind.

    ``figures=False`` writes the tables only (no curves plot, no gallery: most of the time
    of this function); :func:`write_figures` draws them later.

    ``statistics`` is the evaluation's one bootstrap (:meth:`Evaluation.statistics`), shared with
    whatever else the caller logs or prints; by default it is computed here. ``reliability`` is
    :func:`~heatmapbench.evaluation.reliability.run_reliability` of the evaluation's per-image
    table, when the caller already has it (computed here otherwise, from the same resampling).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {"curves": folder / "aopc_curves.csv",
             "summary_csv": folder / "summary.csv", "summary_md": folder / "summary.md",
             "pairwise": folder / "pairwise_tests.csv"}
    write_curves_csv(evaluation, files["curves"])
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
    if figures:
        files.update(write_figures(evaluation, folder, class_names, title))
    return files


def write_figures(evaluation: Evaluation, folder: Path, class_names: Sequence[str] = (),
                  title: str = "") -> dict[str, Path]:
    """The figures of one evaluation: the AOPC curves and, with gallery images, the heatmap gallery."""
    files = {"plot": folder / "aopc_curves.png"}
    plot_aopc_curves(evaluation, files["plot"], title)
    if evaluation.gallery_x is not None:
        files["gallery"] = folder / "heatmap_gallery.png"
        plot_gallery(evaluation, files["gallery"], class_names, title=title)
    return files
