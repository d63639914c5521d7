"""The tables of an evaluation as Markdown: the paper-style summary with its tests, and the
correlations of accuracy with AOPC; :func:`format_number`, the one way a number is printed in a table.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from heatmapbench.evaluation.style import RANDOM_ORDERING_LABEL
from heatmapbench.metrics import names as mn
from heatmapbench.metrics.summary import N_BOOT, format_p

__all__ = ["MISSING", "correlation_markdown", "format_ci", "format_number", "random_ordering_note", "summary_markdown"]

#: What a table shows for a value that was not measured (None or NaN).
MISSING = "–"


def format_number(value: Any, spec: str = ".4g") -> str:
    """``value`` in the format ``spec`` (``".4g"``, ``"+.3f"``, ``".0%"`` …), or :data:`MISSING` when it is
    None or NaN (not measured, or undefined such as a correlation of a constant)."""
    if value is None:
        return MISSING
    try:
        if math.isnan(value):
            return MISSING
    except TypeError:  # no number (a pandas NA): format says how it prints
        pass
    return format(value, spec)


def format_ci(value: Any, lo: Any, hi: Any, spec: str = ".4g") -> str:
    """``value [lo, hi]``, each by :func:`format_number` in the format ``spec``: an estimate and its interval."""
    return f"{format_number(value, spec)} [{format_number(lo, spec)}, {format_number(hi, spec)}]"


def summary_markdown(summary: pd.DataFrame, pairwise: pd.DataFrame | None = None) -> str:
    """The paper-style tables as Markdown: AOPC relative to random with CI, ABPC, Table I, tests."""
    lines = ["| explainer | AOPC rel. random [95% CI] | AOPC | ABPC [95% CI] | PNG bytes | JPEG-90 bytes | entropy |",
             "|---|---|---|---|---|---|---|"]

    def with_ci(r: pd.Series, k: str) -> str:
        if pd.isna(r.get(k)):
            return MISSING
        return format_ci(r[k], r[k + '_lo'], r[k + '_hi'])

    for _, row in summary.sort_values(mn.AOPC_REL, ascending=False).iterrows():
        lines.append(f"| {row.explainer} | {with_ci(row, mn.AOPC_REL)} | {format_number(row.get(mn.AOPC))} | "
                     f"{with_ci(row, mn.ABPC)} | {format_number(row.get(mn.COMPLEXITY_PNG), '.0f')} | "
                     f"{format_number(row.get(mn.COMPLEXITY_JPEG), '.0f')} | "
                     f"{format_number(row.get(mn.COMPLEXITY_ENTROPY), '.3f')} |")
    if mn.random_ordering_metric(mn.AOPC) in summary.attrs:
        m, lo, hi = summary.attrs[mn.random_ordering_metric(mn.AOPC)]
        lines.append(f"\nRandom ordering: AOPC {format_ci(m, lo, hi)}.")
    if pairwise is not None and len(pairwise):
        n_boot = int(pairwise.attrs.get("n_boot", N_BOOT))
        alpha = pairwise.attrs.get("alpha", 0.05)
        lines += ["", f"Paired bootstrap tests ({n_boot} resamples of the images), one-sided p of \"A beats B\"; "
                      f"Holm–Bonferroni over all {len(pairwise)} ordered pairs.", "",
                  f"| A | B | mean(A − B) [95% CI] | p | Holm p | significant (Holm p < {alpha:g}) |",
                  "|---|---|---|---|---|---|"]
        for _, r in pairwise.iterrows():
            if r.mean_diff > 0:
                lines.append(f"| {r.a} | {r.b} | {format_ci(r.mean_diff, r.lo, r.hi)} | "
                             f"{format_p(r.p_value, n_boot)} | {format_p(r.p_holm, n_boot)} | "
                             f"{'yes' if r.significant else 'no'} |")
    return "\n".join(lines) + "\n"


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
    cell = lambda r: MISSING if pd.isna(r.pearson) else (  # noqa: E731
        f"{r.pearson:+.2f}" + ("" if pd.isna(r.pearson_lo) else f" [{r.pearson_lo:+.2f}, {r.pearson_hi:+.2f}]"))
    for name, part in corr.groupby("explainer", sort=False):
        by = part.set_index("measure")
        lines.append("| " + " | ".join([name] + [cell(by.loc[m]) if m in by.index else MISSING for m in measures]) + " |")
    note = random_ordering_note(corr)
    epochs = int(corr.epochs.max()) if len(corr) else 0
    lines.append(f"\nPearson r over {epochs} evaluations; CIs: percentile bootstrap over the evaluations "
                 "(rough with few evaluations; none below 4).")
    return "\n".join(lines + ([note] if note else [])) + "\n"

