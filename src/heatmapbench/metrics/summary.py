"""The one home of AOPC summaries: AOPC, AOPC relative to random, ABPC, bootstrap CIs and tests.

Per image (paper eq. 11): ``AOPC = 1/(L+1) Σ_{k=0..L} curve_k``; relative to random is the
explainer's AOPC minus the random ordering's on the same image (Fig. 4); ABPC (appendix
eq. 13) is ``AOPC_MoRF − AOPC_LeRF``. Following Tomsett et al. (AAAI 2020), every mean is
reported with a confidence interval and differences between explainers are tested rather than
compared as bare means. Used by the engine's callers, :class:`~heatmapbench.evaluation.Evaluation`
(hence the training callback and ``heatmapbench-evaluate``) and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
import torch
from torch import Tensor

from heatmapbench.metrics import names as mn
from heatmapbench.perturbation.curves import aopc

if TYPE_CHECKING:
    from heatmapbench.perturbation.engine import PerturbationResult

__all__ = ["N_BOOT", "aopc", "relative_to_random", "abpc", "bootstrap_indices", "mean_ci", "paired_bootstrap_test",
           "PairedTest", "holm", "format_p", "Statistics", "summary_table", "pairwise_table", "curves_table",
           "correlation_ci", "CORRELATIONS", "percentile_ci"]

#: Bootstrap resamples when none are given (evaluation.n_boot sets them for the CLIs and the callback).
N_BOOT = 2000


def _per_image_aopc(result: PerturbationResult | Tensor) -> Tensor:
    """(B,) AOPC per image, averaged over repeats; a tensor is taken as already (B,) or (R, B)."""
    a = aopc(result.curves) if hasattr(result, "curves") else torch.as_tensor(result)
    return a.mean(dim=0) if a.ndim == 2 else a


def _check_pair(a: PerturbationResult, b: PerturbationResult, what: str) -> None:
    if a.curves.shape[1:] != b.curves.shape[1:]:
        raise ValueError(f"{what}: results differ in images or steps: {tuple(a.curves.shape)} vs "
                         f"{tuple(b.curves.shape)}; evaluate the same images with the same steps")


def relative_to_random(result: PerturbationResult, random_result: PerturbationResult) -> Tensor:
    """AOPC relative to the random ordering (paper Fig. 4), per image: (B,).

    ``mean_R AOPC(result) − mean_R AOPC(random_result)`` on the same images and steps. Higher is
    better for MoRF.
    """
    _check_pair(result, random_result, "relative_to_random")
    return _per_image_aopc(result) - _per_image_aopc(random_result)


def abpc(morf: PerturbationResult, lerf: PerturbationResult) -> Tensor:
    """Area between the perturbation curves, per image (paper appendix eq. 13): (B,).

    ABPC = 1/(L+1) Σ_{k=0..L} f(x_LeRF⁽ᵏ⁾) − f(x_MoRF⁽ᵏ⁾) = AOPC_MoRF − AOPC_LeRF, each
    averaged over its repeats. Blücher et al.'s SRG is the same quantity up to the 1/(L+1) factor.
    """
    _check_pair(morf, lerf, "abpc")
    return (lerf.scores.mean(dim=0) - morf.scores.mean(dim=0)).mean(dim=-1)


def _flat(values: Tensor) -> Tensor:
    v = torch.as_tensor(values).detach().reshape(-1).double().cpu()
    if v.numel() == 0:
        raise ValueError("need at least one value")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("values contain NaN or inf")
    return v


def bootstrap_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> Tensor:
    """(n_boot, n) image indices drawn with replacement: one resampling of n images.

    Draw it once per evaluation and pass it to :func:`mean_ci` and :func:`paired_bootstrap_test`
    so that every interval and test printed or logged for that evaluation resamples the same
    images (paired across explainers) and agrees wherever it is shown.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if n < 1:
        raise ValueError("need at least one image to resample")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_boot, n), generator=g)


def _indices(n: int, n_boot: int, seed: int, indices: Tensor | None) -> Tensor:
    if indices is None:
        return bootstrap_indices(n, n_boot, seed)
    if indices.ndim != 2 or indices.shape[1] != n:
        raise ValueError(f"bootstrap indices of shape {tuple(indices.shape)} do not resample {n} values")
    return indices


def percentile_ci(replicates: Tensor | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates: their ``(1 − level)/2`` and ``(1 + level)/2``
    quantiles (linear interpolation); NaN, NaN when none is finite.

    Non-finite replicates (a statistic undefined on some resamples, such as a correlation of a
    constant resample) are left out. The one percentile helper of the package: every bootstrap CI
    here (means, paired tests, correlations, reliability, agreement, sanity checks) ends in it.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = torch.as_tensor(replicates).detach().reshape(-1).double().cpu()
    values = values[torch.isfinite(values)]
    if not values.numel():
        return float("nan"), float("nan")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(values, q).tolist()
    return float(lo), float(hi)


def mean_ci(values: Tensor, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0,
            indices: Tensor | None = None) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval: ``(mean, lo, hi)``.

    ``values`` is flattened (e.g. the per-image AOPCs). Seeded, so the interval is reproducible;
    ``indices`` (from :func:`bootstrap_indices`) replaces the draw of ``n_boot`` and ``seed``.
    """
    v = _flat(values)
    bm = v[_indices(v.numel(), n_boot, seed, indices)].mean(dim=1)
    return (float(v.mean()), *percentile_ci(bm, level))


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (B, n) arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=1) / den, np.nan)


#: The methods of :func:`correlation_ci`; their one list is :data:`heatmapbench.metrics.names.CORRELATION_METHODS`.
CORRELATIONS = mn.CORRELATION_METHODS


def correlation_ci(x: Sequence[float], y: Sequence[float], method: str = "pearson", *, level: float = 0.95,
                   n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """Correlation of paired values and its percentile-bootstrap CI: ``(r, lo, hi)``.

    The pairs (x_i, y_i) (e.g. accuracy and AOPC of one epoch) are resampled together with
    :func:`bootstrap_indices`; resamples with fewer than 3 distinct pairs, or in which x or y is
    constant, are dropped. ``r`` is NaN below 3 pairs or when x or y is constant; the CI is NaN when fewer than
    half the resamples have a correlation (with few pairs it is wide: that is the honest answer).
    """
    if method not in CORRELATIONS:
        raise ValueError(f"method={method!r} is invalid: choose one of {CORRELATIONS}")
    xv, yv = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xv.shape != yv.shape or xv.ndim != 1:
        raise ValueError(f"x and y must be 1-D and paired, got shapes {xv.shape} and {yv.shape}")
    keep = np.isfinite(xv) & np.isfinite(yv)
    xv, yv = xv[keep], yv[keep]
    nan = (float("nan"),) * 3
    if len(xv) < 3:
        return nan
    if method == "spearman":
        rank = lambda a: stats.rankdata(a, axis=-1)  # noqa: E731
    else:
        rank = lambda a: a  # noqa: E731
    r = float(_rowwise_pearson(rank(xv)[None], rank(yv)[None])[0])
    if not math.isfinite(r):
        return nan
    idx = bootstrap_indices(len(xv), n_boot, seed).numpy()
    boot = _rowwise_pearson(rank(xv[idx]), rank(yv[idx]))
    distinct = 1 + (np.diff(np.sort(idx, axis=1), axis=1) != 0).sum(axis=1)
    boot = boot[np.isfinite(boot) & (distinct >= 3)]  # two distinct pairs always correlate ±1
    if len(boot) < n_boot / 2:
        return r, float("nan"), float("nan")
    lo, hi = percentile_ci(boot, level)
    return r, lo, hi


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_bootstrap_test` on the differences d = a − b.

    mean_diff, lo, hi : the mean of d and its bootstrap CI.
    p_value : one-sided bootstrap p-value of "A does not beat B", ``(#{null means ≥ observed} + 1) /
        (B + 1)``; it cannot be below ``1/(B+1)`` (see :func:`format_p`). Small means A beats B.
    prob_a_better : fraction of bootstrap resamples in which mean(d) > 0.
    n_boot : B, the resamples behind the p-value.
    """

    mean_diff: float
    lo: float
    hi: float
    p_value: float
    prob_a_better: float
    n_boot: int = N_BOOT


def paired_bootstrap_test(a: Tensor, b: Tensor, *, level: float = 0.95, n_boot: int = N_BOOT,
                          seed: int = 0, indices: Tensor | None = None) -> PairedTest:
    """Paired bootstrap test of "explainer A beats explainer B" (higher is better).

    ``a`` and ``b`` are per-image scores on the same images (e.g. AOPC relative to random, or
    ABPC), shape (B,). Images are resampled with replacement as pairs. The p-value resamples the
    differences shifted to mean zero (the null "no difference") and counts means ≥ the observed.
    """
    va, vb = _flat(a), _flat(b)
    if va.shape != vb.shape:
        raise ValueError(f"paired test needs the same images: {va.numel()} vs {vb.numel()} values")
    d = va - vb
    idx = _indices(d.numel(), n_boot, seed, indices)
    bm = d[idx].mean(dim=1)
    obs = float(d.mean())
    null = bm - obs  # bootstrap distribution under H0: mean difference 0
    b_ = idx.shape[0]
    p = (float((null >= obs).sum()) + 1) / (b_ + 1)
    lo, hi = percentile_ci(bm, level)
    return PairedTest(obs, lo, hi, p, float((bm > 0).double().mean()), b_)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down; controls the family-wise error rate).

    With p sorted ascending, ``p_adj(i) = max_{j ≤ i} min(1, (m − j + 1) · p(j))``; reject
    hypothesis i at level α iff ``p_adj(i) < α``. Returned in the input order.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must be a 1-D sequence in [0, 1], got {p_values!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def format_p(p: float, n_boot: int) -> str:
    """A bootstrap p-value for print: at the resampling floor 1/(B+1) it reads ``< 1/(B+1)``.

    No resampling count can show a p-value smaller than 1/(B+1), so printing it as a number
    (0.0005 for B = 2000) would claim a precision the test does not have.
    """
    if p <= 1.0 / (n_boot + 1) * (1 + 1e-9):
        return f"< 1/{n_boot + 1}"
    return f"{p:.4f}"


# -- tables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Statistics:
    """Everything printed or logged about one evaluation, from one bootstrap draw.

    summary : one row per explainer (see :func:`summary_table`); ``attrs["eval/random_ordering/aopc"]``
        holds the random ordering's (mean, lo, hi).
    pairwise : the paired tests of every ordered pair of explainers (see :func:`pairwise_table`).
    n_boot, seed, level : the resampling behind them.
    """

    summary: pd.DataFrame
    pairwise: pd.DataFrame
    n_boot: int
    seed: int
    level: float = 0.95


def summary_table(metrics: Mapping[str, Mapping[str, Tensor]], random_aopc: Tensor, *,
                  complexity: Mapping[str, Mapping[str, Tensor]] | None = None, level: float = 0.95,
                  n_boot: int = N_BOOT, seed: int = 0, indices: Tensor | None = None) -> pd.DataFrame:
    """One row per explainer: the mean of each per-image metric with its bootstrap CI.

    ``metrics[explainer][key]`` are (N,) per-image values (``aopc``, ``aopc_rel``, ...); each
    gives columns ``key``, ``key_lo``, ``key_hi``. ``complexity[explainer][key]`` adds plain
    means (Table I). ``attrs["eval/random_ordering/aopc"]`` (:func:`heatmapbench.metrics.names.random_ordering_metric`)
    is the random ordering's ``(mean, lo, hi)``.
    """
    n = int(torch.as_tensor(random_aopc).numel())
    idx = _indices(n, n_boot, seed, indices)
    rows = []
    for name, per_image in metrics.items():
        row: dict = {"explainer": name, "images": n}
        for key, values in per_image.items():
            m, lo, hi = mean_ci(values, level=level, indices=idx)
            row.update({key: m, f"{key}_lo": lo, f"{key}_hi": hi})
        for key, values in (complexity or {}).get(name, {}).items():
            row[key] = float(torch.as_tensor(values).double().mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs[mn.random_ordering_metric(mn.AOPC)] = mean_ci(random_aopc, level=level, indices=idx)
    return table


PAIRWISE_COLUMNS = ["a", "b", "metric", "mean_diff", "lo", "hi", "p_value", "p_holm", "significant"]


def pairwise_table(values: Mapping[str, Tensor | None], metric: str = "aopc_rel", *, alpha: float = 0.05,
                   level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0,
                   indices: Tensor | None = None) -> pd.DataFrame:
    """Paired bootstrap tests of "A beats B" for every ordered pair of explainers.

    ``values[explainer]`` are (N,) per-image scores on the same images (``None``: not measured,
    skipped). The k(k−1) one-sided p-values are Holm–Bonferroni adjusted together (``p_holm``);
    ``significant`` is ``p_holm < alpha``, so the chance of any false "A beats B" in the table is
    at most ``alpha``.
    """
    names = [n for n, v in values.items() if v is not None]
    rows = []
    if len(names) > 1:
        n = int(torch.as_tensor(values[names[0]]).numel())
        idx = _indices(n, n_boot, seed, indices)
        for a in names:
            for b in names:
                if a != b:
                    t = paired_bootstrap_test(values[a], values[b], level=level, indices=idx)
                    rows.append({"a": a, "b": b, "metric": metric, "mean_diff": t.mean_diff, "lo": t.lo,
                                 "hi": t.hi, "p_value": t.p_value})
    table = pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)
    if rows:
        table["p_holm"] = holm(table.p_value.to_numpy())
        table["significant"] = table.p_holm < alpha
    table.attrs.update({"n_boot": int(n_boot if indices is None else indices.shape[0]), "alpha": alpha})
    return table


def curves_table(curves: Mapping[str, Mapping[str, Tensor]], random_curves: Tensor) -> pd.DataFrame:
    """Fig. 4 as numbers: per explainer, order and step L, AOPC_L and AOPC_L relative to random.

    ``curves[explainer][order]`` and ``random_curves`` are (N, L+1) per-image curves.
    AOPC_L = 1/(L+1) Σ_{k=0..L} curve_k (the running mean); CIs are mean ± 1.96·s.e.m. over
    images (a normal approximation: bootstrapping every step would dominate the cost).
    """
    steps = torch.arange(random_curves.shape[-1], dtype=torch.float64)
    running = lambda c: c.double().cumsum(dim=-1) / (steps + 1)  # noqa: E731  (N, L+1)
    rand = running(random_curves)
    n = rand.shape[0]

    def sem(v: Tensor) -> Tensor:
        return v.std(dim=0) / math.sqrt(n) if n > 1 else torch.zeros(v.shape[1], dtype=v.dtype)

    frames = []
    for name, by_order in curves.items():
        for order, c in by_order.items():
            a = running(c)
            rel = a - rand
            frames.append(pd.DataFrame({
                "explainer": name, "order": order, "step": steps.long().numpy(),
                "aopc": a.mean(0).numpy(), "aopc_lo": (a.mean(0) - 1.96 * sem(a)).numpy(),
                "aopc_hi": (a.mean(0) + 1.96 * sem(a)).numpy(),
                "aopc_rel": rel.mean(0).numpy(), "aopc_rel_lo": (rel.mean(0) - 1.96 * sem(rel)).numpy(),
                "aopc_rel_hi": (rel.mean(0) + 1.96 * sem(rel)).numpy()}))
    return pd.concat(frames, ignore_index=True)
