"""Is the ranking real? Reliability of explainer rankings by AOPC, within and across evaluations.

A ranking of explainers by mean AOPC is only worth reporting when the images agree on it and when
it survives reasonable changes of the protocol (Tomsett et al., "Sanity checks for saliency
metrics", AAAI 2020; Rong et al. 2022, ROAD). This module holds the statistics; the per-image
scores come from :func:`per_image_table` (one row per image × explainer × order).

Scores are *oriented* so that higher is better in every order: MoRF ``aopc − aopc_random``,
LeRF ``aopc_random − aopc`` (a good heatmap removes the least relevant regions first, so the
score falls *slower* than under a random ordering) and ABPC ``aopc_morf − aopc_lerf``
(Samek et al. 2015, appendix eq. 13; Blücher et al.'s SRG up to the 1/(L+1) factor).

* Within one evaluation: Krippendorff's α (ordinal) of the explainers' per-image ranks, raters =
  images, units = explainers (Tomsett's inter-rater reliability), with a bootstrap CI over images;
  the fraction of images on which each explainer beats the random ordering (Clopper–Pearson CI);
  the bootstrap probability that each explainer has the best mean; MoRF–LeRF agreement (Kendall τ).
* Across evaluations: Cronbach's α of an explainer's per-image scores over settings (Tomsett's
  internal consistency), Kendall's W of the settings' rankings and pairwise Kendall τ.

Every resampling is the seeded draw of :func:`~heatmapbench.metrics.summary.bootstrap_indices`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import krippendorff
import numpy as np
import pandas as pd
import torch
from scipy import stats

from heatmapbench.metrics import names as mn
from heatmapbench.metrics.summary import N_BOOT, bootstrap_indices, percentile_ci

if TYPE_CHECKING:
    from heatmapbench.evaluation.core import Evaluation

#: Orders a per-image table can be ranked by; ``abpc`` needs both ``morf`` and ``lerf`` rows.
RANKED_ORDERS = ("morf", "lerf", "abpc")
#: Columns of the per-image table, in order (``label`` is missing when labels are unknown).
PER_IMAGE_COLUMNS = ("image", "explainer", "order", "aopc", "aopc_random", "aopc_rel", "target", "label")
#: File name (without suffix) of the per-image table artifact of an evaluation.
PER_IMAGE_STEM = "per_image"


# -- the per-image table -------------------------------------------------------------------------
def per_image_table(evaluation: "Evaluation", image_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per image × explainer × order: AOPC (paper eq. 11), the random ordering's AOPC on
    the same image, their difference ``aopc_rel``, the scored class ``target`` and the ``label``.

    ``image`` is ``image_ids[i]`` or the image's position in the evaluated set (the dataset index
    for ``heatmapbench-evaluate``, which scores the first ``num_images`` of the test split), so the
    tables of runs on the same images join on it.
    """
    n = evaluation.num_images
    ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
    if ids.shape != (n,):
        raise ValueError(f"image_ids has {ids.shape} entries for {n} images")
    random = evaluation.random_aopc().double().numpy()
    frames = []
    for name in evaluation.explainers:
        for order in evaluation.curves[name]:
            aopc = evaluation.aopc(name, order).double().numpy()
            frame = pd.DataFrame({"image": ids, "explainer": name, "order": order, "aopc": aopc,
                                  "aopc_random": random, "aopc_rel": aopc - random})
            if evaluation.target is not None:
                frame["target"] = evaluation.target.numpy()
            if evaluation.label is not None:
                frame["label"] = evaluation.label.numpy()
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def write_table(table: pd.DataFrame, folder: Path, stem: str = PER_IMAGE_STEM) -> Path:
    """``<stem>.parquet`` when pyarrow is installed (typed, compressed, read fast), else ``<stem>.csv``."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = folder / f"{stem}.csv"
        table.to_csv(path, index=False)
        return path
    path = folder / f"{stem}.parquet"
    table.to_parquet(path, index=False)
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """Read what :func:`write_table` wrote (Parquet or CSV, by suffix)."""
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def score_matrix(table: pd.DataFrame, order: str) -> pd.DataFrame:
    """Images × explainers of oriented scores (higher is better) for ``order`` in :data:`RANKED_ORDERS`.

    Only images scored by every explainer are kept (an inner join), so ranks compare like with like.
    """
    if order not in RANKED_ORDERS:
        raise ValueError(f"order={order!r} is invalid: choose one of {list(RANKED_ORDERS)}")

    def wide(o: str, column: str) -> pd.DataFrame:
        part = table[table.order == o]
        if not len(part):
            raise ValueError(f"the per-image table has no {o!r} rows (evaluation.orders must include {o})")
        return part.pivot(index="image", columns="explainer", values=column)  # duplicates raise

    if order == "morf":
        scores = wide("morf", "aopc_rel")
    elif order == "lerf":
        scores = -wide("lerf", "aopc_rel")
    else:
        scores = wide("morf", "aopc") - wide("lerf", "aopc")
    return scores.dropna(axis=0, how="any")


def per_image_ranks(scores: np.ndarray) -> np.ndarray:
    """(N, K) rank of each explainer on each image, 1 = best (highest score); ties share the mean rank."""
    return stats.rankdata(-np.asarray(scores, dtype=np.float64), axis=1, method="average")


# -- resampling images ---------------------------------------------------------------------------
def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) how often each of ``n`` images is drawn in each resample.

    The draws of :func:`~heatmapbench.metrics.summary.bootstrap_indices` with the same seed, so the
    reliability resamples the same images as the evaluation's summary and tests.
    """
    idx = bootstrap_indices(n, n_boot, seed)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, n, dtype=torch.float64)).numpy()


# -- agreement of images on one ranking ----------------------------------------------------------
def _rank_counts(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, V) one-hot of each image's rank of each explainer over the ``V`` rank values, and those values."""
    domain = np.unique(ranks)
    return (ranks[..., None] == domain).astype(np.float64), domain


def _alpha_from_counts(counts: np.ndarray, domain: np.ndarray) -> float:
    if np.count_nonzero(counts.sum(axis=0)) < 2:  # every pairable value equal: no disagreement to expect
        return float("nan")
    return float(krippendorff.alpha(value_counts=counts, value_domain=domain, level_of_measurement="ordinal"))


def krippendorff_alpha(scores: np.ndarray) -> float:
    """Krippendorff's α (ordinal) of the explainers' per-image ranks: raters = images, units = explainers.

    1 when every image ranks the explainers alike, about 0 when the ranks are as good as random,
    negative when images disagree systematically. NaN when every image ties every explainer
    (no variation to agree on). Computed by the ``krippendorff`` package (Castro 2017) from the
    units × rank-values count matrix.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 2:
        raise ValueError(f"Krippendorff's α needs at least 2 images × 2 explainers, got {scores.shape}")
    onehot, domain = _rank_counts(per_image_ranks(scores))
    return _alpha_from_counts(onehot.sum(axis=0), domain)


def krippendorff_alpha_ci(scores: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """:func:`krippendorff_alpha` and its percentile-bootstrap CI over images: ``(alpha, lo, hi)``."""
    alpha = krippendorff_alpha(scores)
    onehot, domain = _rank_counts(per_image_ranks(scores))
    n, k, v = onehot.shape
    counts = (bootstrap_weights(n, n_boot, seed) @ onehot.reshape(n, k * v)).reshape(n_boot, k, v)
    boot = np.array([_alpha_from_counts(c, domain) for c in counts])
    return (alpha, *percentile_ci(boot, level))


# -- one evaluation ------------------------------------------------------------------------------
def beats_random(table: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per order × explainer: the fraction of images on which the heatmap's ordering beats the random
    ordering (MoRF: AOPC above random's; LeRF: below), with its exact Clopper–Pearson CI."""
    rows = []
    for (order, name), part in table.groupby(["order", "explainer"], sort=False):
        better = (part.aopc_rel > 0) if order == "morf" else (part.aopc_rel < 0)
        k, n = int(better.sum()), len(part)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
        rows.append({"order": order, "explainer": name, "beats_random": k / n, "beats_random_lo": ci.low,
                     "beats_random_hi": ci.high, "images": n})
    return pd.DataFrame(rows, columns=["order", "explainer", "beats_random", "beats_random_lo", "beats_random_hi",
                                       "images"])


def ranking_stability(scores: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per explainer: mean score, its rank among the means (1 = best), mean per-image rank, and
    ``p_best``, the fraction of bootstrap resamples of the images in which it has the best mean."""
    values = scores.to_numpy(dtype=np.float64)
    means = values.mean(axis=0)
    boot = bootstrap_weights(values.shape[0], n_boot, seed) @ values / values.shape[0]  # (B, K) resampled means
    best = boot.max(axis=1, keepdims=True)
    winners = (boot == best) / (boot == best).sum(axis=1, keepdims=True)  # a tie splits the win
    return pd.DataFrame({"explainer": list(scores.columns), "score": means,
                         "rank": stats.rankdata(-means, method="average"),
                         "mean_image_rank": per_image_ranks(values).mean(axis=0),
                         "p_best": winners.mean(axis=0)})


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ_b (scipy) of two score vectors over the same explainers; NaN when one is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.kendalltau(a, b).statistic)


def order_agreement(table: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float]:
    """MoRF against LeRF: Kendall τ_b of the explainers' mean scores, and the mean over images of the
    per-image τ_b with a bootstrap CI over images (images where one order ties everything are left out)."""
    morf, lerf = score_matrix(table, "morf"), score_matrix(table, "lerf")
    images = morf.index.intersection(lerf.index)
    names = [n for n in morf.columns if n in lerf.columns]
    morf, lerf = morf.loc[images, names].to_numpy(), lerf.loc[images, names].to_numpy()
    per_image = np.array([kendall_tau(m, l) for m, l in zip(morf, lerf)])
    kept = per_image[np.isfinite(per_image)]
    out = {"tau": kendall_tau(morf.mean(axis=0), lerf.mean(axis=0)), "tau_per_image": float("nan"),
           "tau_per_image_lo": float("nan"), "tau_per_image_hi": float("nan"), "images": float(len(kept))}
    if len(kept):
        boot = bootstrap_weights(len(kept), n_boot, seed) @ kept / len(kept)
        lo, hi = percentile_ci(boot)
        out.update(tau_per_image=float(kept.mean()), tau_per_image_lo=lo, tau_per_image_hi=hi)
    return out


def run_reliability(table: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, pd.DataFrame | dict]:
    """Everything of one evaluation's per-image table: per order the agreement of images
    (``alpha`` rows), per order × explainer the ranking table, and MoRF–LeRF agreement.

    Orders with fewer than 2 explainers or 2 images are left out (nothing to rank).
    """
    orders = [o for o in ("morf", "lerf") if (table.order == o).any()]
    if set(orders) == {"morf", "lerf"}:
        orders.append("abpc")
    alpha_rows, rank_frames = [], []
    for order in orders:
        scores = score_matrix(table, order)
        if scores.shape[0] < 2 or scores.shape[1] < 2:
            continue
        a, lo, hi = krippendorff_alpha_ci(scores.to_numpy(), n_boot=n_boot, seed=seed)
        alpha_rows.append({"order": order, "krippendorff_alpha": a, "krippendorff_alpha_lo": lo,
                           "krippendorff_alpha_hi": hi, "images": scores.shape[0], "explainers": scores.shape[1]})
        stability = ranking_stability(scores, n_boot=n_boot, seed=seed)
        stability.insert(0, "order", order)
        rank_frames.append(stability)
    ranking = pd.concat(rank_frames, ignore_index=True) if rank_frames else pd.DataFrame(
        columns=["order", "explainer", "score", "rank", "mean_image_rank", "p_best"])
    wins = beats_random(table)
    ranking = ranking.merge(wins, on=["order", "explainer"], how="outer")
    agreement = order_agreement(table, n_boot=n_boot, seed=seed) if {"morf", "lerf"} <= set(orders) else {}
    alpha = pd.DataFrame(alpha_rows, columns=["order", "krippendorff_alpha", "krippendorff_alpha_lo",
                                              "krippendorff_alpha_hi", "images", "explainers"])
    return {"alpha": alpha, "ranking": ranking, "agreement": agreement}


def reliability_metrics(result: dict) -> dict[str, float]:
    """The MLflow metrics of :func:`run_reliability` (NaNs are left out)."""
    metrics: dict[str, float] = {}
    for _, row in result["alpha"].iterrows():
        for bound in (None, *mn.BOUNDS):
            key = "krippendorff_alpha" + (f"_{bound}" if bound else "")
            metrics[mn.reliability_metric("krippendorff_alpha", row.order, bound)] = float(row[key])
    for _, row in result["ranking"].iterrows():
        for key in (mn.BEATS_RANDOM, mn.P_BEST):
            if key in row and pd.notna(row[key]):
                metrics[mn.ranking_metric(key, row.explainer, row.order)] = float(row[key])
    for key, value in result["agreement"].items():
        if key != "images":
            metrics[mn.reliability_metric(f"morf_lerf_{key}")] = float(value)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _g(value: float, fmt: str = ".3f") -> str:
    return "–" if value is None or not np.isfinite(value) else format(value, fmt)


def reliability_markdown(result: dict) -> str:
    """The reliability of one evaluation's ranking as Markdown."""
    lines = ["Agreement of the images on the ranking (Krippendorff's α, ordinal; 1 = every image ranks the "
             "explainers alike, 0 = no better than chance):", "",
             "| ranked by | α [95% CI] | images | explainers |", "|---|---|---|---|"]
    if not len(result["alpha"]):
        lines.append("| – | fewer than 2 explainers or images: nothing to rank in this run (heatmapbench-report "
                     "ranks the explainers of a sweep's runs together) | – | – |")
    for _, r in result["alpha"].iterrows():
        lines.append(f"| {r.order} | {_g(r.krippendorff_alpha)} [{_g(r.krippendorff_alpha_lo)}, "
                     f"{_g(r.krippendorff_alpha_hi)}] | {r.images} | {r.explainers} |")
    lines += ["", "| ranked by | explainer | rank | mean image rank | P(best mean) | beats random on [95% CI] |",
              "|---|---|---|---|---|---|"]
    ranking = result["ranking"].sort_values(["order", "rank"], kind="stable")
    for _, r in ranking.iterrows():
        wins = (f"{_g(r.beats_random, '.0%')} [{_g(r.beats_random_lo, '.0%')}, {_g(r.beats_random_hi, '.0%')}]"
                if pd.notna(r.get("beats_random")) else "–")
        lines.append(f"| {r.order} | {r.explainer} | {_g(r['rank'], '.3g')} | {_g(r.mean_image_rank, '.2f')} | "
                     f"{_g(r.p_best, '.2f')} | {wins} |")
    agreement = result["agreement"]
    if agreement:
        lines += ["", f"MoRF vs LeRF ranking: Kendall τ {_g(agreement['tau'], '+.3f')} (means); per image "
                      f"{_g(agreement['tau_per_image'], '+.3f')} [{_g(agreement['tau_per_image_lo'], '+.3f')}, "
                      f"{_g(agreement['tau_per_image_hi'], '+.3f')}] over {int(agreement['images'])} images."]
    return "\n".join(lines) + "\n"


# -- across evaluations --------------------------------------------------------------------------
def cronbach_alpha(items: np.ndarray) -> float:
    """Cronbach's α of an (N subjects × k items) matrix: k/(k−1) · (1 − Σ var(item) / var(total)).

    Here subjects = images, items = settings, values = one explainer's per-image scores: high when
    the settings order the images alike (Tomsett et al.'s internal consistency). Equal to Hoyt's
    ANOVA estimate and to ICC(3,k) (Shrout & Fleiss 1979). NaN when the total has no variance.
    """
    items = np.asarray(items, dtype=np.float64)
    if items.ndim != 2 or items.shape[0] < 2 or items.shape[1] < 2:
        raise ValueError(f"Cronbach's α needs at least 2 images × 2 settings, got {items.shape}")
    k = items.shape[1]
    total = items.sum(axis=1).var(ddof=1)
    if total == 0:
        return float("nan")
    return float(k / (k - 1) * (1 - items.var(axis=0, ddof=1).sum() / total))


def kendall_w(ranks: np.ndarray) -> float:
    """Kendall's W of an (m raters × n objects) matrix of ranks, corrected for ties.

    W = 12 S / (m² (n³ − n) − m Σ T), S the sum of squared deviations of the objects' rank sums from
    their mean, T = Σ (t³ − t) over each rater's groups of t ties (Kendall & Babington Smith 1939);
    equal to Friedman's χ² / (m (n − 1)). 1: every rater ranks alike; 0: no agreement.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    m, n = ranks.shape
    if m < 2 or n < 2:
        raise ValueError(f"Kendall's W needs at least 2 settings × 2 explainers, got {ranks.shape}")
    sums = ranks.sum(axis=0)
    s = float(((sums - sums.mean()) ** 2).sum())
    ties = sum(float((c ** 3 - c).sum()) for c in (np.unique(row, return_counts=True)[1] for row in ranks))
    denominator = m ** 2 * (n ** 3 - n) - m * ties
    return float("nan") if denominator == 0 else 12 * s / denominator
