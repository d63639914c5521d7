"""The figures of ``heatmapbench-report``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from heatmapbench.evaluation.style import STYLE  # noqa: E402


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
    fig.savefig(path, dpi=STYLE["savefig.dpi"])
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
    fig.savefig(path, dpi=STYLE["savefig.dpi"])
    plt.close(fig)


def plot_rank_per_setting(settings: pd.DataFrame, explainers: Sequence[str], path: Path, title: str = "") -> None:
    """Each explainer's rank (1 = best mean score) per setting: rows settings, columns explainers.

    Columns are ordered by mean rank: a ranking that never flips shows one colour down each
    column, a flip shows as a change of colour; each row label carries the setting's Krippendorff α
    (how far the images agree on that setting's ranking).
    """
    ranks = settings[[f"rank/{name}" for name in explainers]].to_numpy(dtype=float)
    columns = np.argsort(ranks.mean(axis=0), kind="stable")
    ranks = ranks[:, columns]
    names = [explainers[j] for j in columns]
    rows = [f"{s}  (α {a:.2f})" if np.isfinite(a) else str(s)
            for s, a in zip(settings.setting, settings.get("krippendorff_alpha", pd.Series(np.nan, settings.index)))]
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 3.6, 0.32 * len(rows) + 1.6), dpi=100)
    image = ax.imshow(ranks, cmap="viridis_r", vmin=1, vmax=len(names), aspect="auto")
    for i in range(ranks.shape[0]):
        for j in range(ranks.shape[1]):
            ax.text(j, i, f"{ranks[i, j]:g}", ha="center", va="center", fontsize=7,
                    color="white" if ranks[i, j] > (len(names) + 1) / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title or "rank of each explainer per setting (1 = best)", fontsize=9)
    fig.colorbar(image, ax=ax, label="rank", fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=STYLE["savefig.dpi"])
    plt.close(fig)


def plot_agreement(agreements, path: Path) -> None:
    """Per model × data, the matrix of Kendall's τ between the measures' rankings, with 95% CIs in the cells."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(agreements), squeeze=False,
                                 figsize=(max(4.5, 1.25 * len(agreements[0].measures) + 2) * len(agreements),
                                          max(3.8, 1.0 * len(agreements[0].measures) + 1.5)))
        for ax, a in zip(axes[0], agreements):
            names = [m.name for m in a.measures]
            k = len(names)
            tau = np.eye(k)
            text = [["1" if i == j else "" for j in range(k)] for i in range(k)]
            for r in a.tau.itertuples(index=False):
                i, j = names.index(r.measure_a), names.index(r.measure_b)
                tau[i, j] = tau[j, i] = r.tau
                text[i][j] = text[j][i] = f"{r.tau:.2f}\n[{r.tau_lo:.2f}, {r.tau_hi:.2f}]"
            image = ax.imshow(tau, cmap="RdBu", vmin=-1, vmax=1)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
            ax.set_xticks(range(k))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(k))
            ax.set_yticklabels(names, fontsize=8)
            ax.set_title(f"{a.group}: Kendall τ between rankings", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
