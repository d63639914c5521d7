"""Do the evaluation measures agree? Rankings of the same explainers by several measures, and Kendall's τ
between them with bootstrap confidence intervals.

LATEC (Klein et al., NeurIPS 2024) found that evaluation metrics often rank the same explainers
differently; Tomsett et al. (AAAI 2020) that MoRF- and LeRF-type metrics disagree. Here every measure is
a table *units × explainers* of scores oriented so that higher is better (AOPC MoRF relative to random;
−AOPC LeRF; ABPC; ROAD's MoRF; −accuracy under ROAR; −similarity after model randomisation). A measure's
ranking is by its mean over the units; the agreement of two measures is Kendall's τ_b of their mean
scores over the explainers both rank.

Confidence intervals resample the units: the images for per-image measures, the training seeds for
ROAR. Measures on the same units (the same image ids, or the same seeds) are resampled together (one
draw per replicate), measures on different units independently. τ_b is computed in closed form per
replicate: with ``s_a[i,j] = sign(a_i − a_j)`` over the pairs i < j,
``τ_b = Σ s_a s_b / sqrt(Σ s_a² · Σ s_b²)`` (equal to ``scipy.stats.kendalltau``; NaN when one
measure ties every explainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from heatmapbench.evaluation.reliability import bootstrap_weights
from heatmapbench.metrics.summary import N_BOOT, percentile_ci

__all__ = ["Measure", "kendall_tau_b", "rankings", "measure_agreement"]


@dataclass
class Measure:
    """One measure's scores: ``scores`` is units × explainers, higher = better; ``unit`` names the rows
    (``image``, ``seed``); ``lower_is_better`` records that the logged quantity was negated."""

    name: str
    scores: pd.DataFrame
    unit: str = "image"
    lower_is_better: bool = False

    def __post_init__(self) -> None:
        self.scores = self.scores.dropna(axis=0, how="any").astype(np.float64)
        if self.scores.shape[0] < 1 or self.scores.shape[1] < 2:
            raise ValueError(f"measure {self.name!r} needs at least one {self.unit} and two explainers, got "
                             f"{self.scores.shape[0]} × {self.scores.shape[1]}")

    @property
    def key(self) -> tuple:
        """Measures with the same key are resampled together."""
        return (self.unit, tuple(self.scores.index))


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """τ_b of the last axes of ``a`` and ``b`` (``(..., K)``), batched; NaN where one side ties everything."""
    i, j = np.triu_indices(a.shape[-1], k=1)
    sa, sb = np.sign(a[..., i] - a[..., j]), np.sign(b[..., i] - b[..., j])
    den = np.sqrt((sa * sa).sum(-1) * (sb * sb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (sa * sb).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def rankings(measures: Sequence[Measure]) -> pd.DataFrame:
    """One row per explainer, per measure its mean score and its rank (1 = best; ties share the mean rank)."""
    frames = []
    for m in measures:
        means = m.scores.mean(axis=0)
        frames.append(pd.DataFrame({"explainer": means.index, "measure": m.name, "score": means.to_numpy(),
                                    "rank": stats.rankdata(-means.to_numpy(), method="average"),
                                    "units": m.scores.shape[0], "unit": m.unit}))
    return pd.concat(frames, ignore_index=True)


def measure_agreement(measures: Sequence[Measure], *, n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95) -> pd.DataFrame:
    """Kendall τ_b between every pair of measures' rankings, with a bootstrap CI over their units.

    Returns one row per pair: ``measure_a``, ``measure_b``, ``tau``, ``tau_lo``, ``tau_hi``, the number
    of common ``explainers`` and whether the two were resampled ``paired`` (same units).
    """
    names = [m.name for m in measures]
    if len(set(names)) != len(names):
        raise ValueError(f"measure names must be distinct, got {names}")
    draws: dict[tuple, np.ndarray] = {}
    boot: dict[str, pd.DataFrame] = {}
    for m in measures:  # (B, K) resampled means; one draw per set of units
        if m.key not in draws:
            draws[m.key] = bootstrap_weights(m.scores.shape[0], n_boot, seed + len(draws))
        w = draws[m.key]
        boot[m.name] = pd.DataFrame(w @ m.scores.to_numpy() / m.scores.shape[0], columns=m.scores.columns)
    rows = []
    for a, b in combinations(measures, 2):
        common = [e for e in a.scores.columns if e in set(b.scores.columns)]
        row = {"measure_a": a.name, "measure_b": b.name, "explainers": len(common), "paired": a.key == b.key,
               "tau": np.nan, "tau_lo": np.nan, "tau_hi": np.nan}
        if len(common) >= 2:
            row["tau"] = float(kendall_tau_b(a.scores[common].mean(axis=0).to_numpy(),
                                             b.scores[common].mean(axis=0).to_numpy()))
            taus = kendall_tau_b(boot[a.name][common].to_numpy(), boot[b.name][common].to_numpy())
            row["tau_lo"], row["tau_hi"] = percentile_ci(taus, level)
        rows.append(row)
    return pd.DataFrame(rows, columns=["measure_a", "measure_b", "tau", "tau_lo", "tau_hi", "explainers", "paired"])
