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
* Across evaluations (the runs of a sweep, compared by ``heatmapbench-report``): Cronbach's α of an
  explainer's per-image scores over settings (Tomsett's internal consistency), Kendall's W of the
  settings' rankings and pairwise Kendall τ (:func:`cross_run_reliability`).

Each result comes with its MLflow metrics and its Markdown: :func:`run_reliability_metrics` and
:func:`run_reliability_markdown` for one evaluation, :func:`cross_run_reliability_metrics` and
:func:`cross_run_reliability_markdown` across runs.

Every resampling is the seeded draw of :func:`~heatmapbench.metrics.summary.bootstrap_indices`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import krippendorff
import numpy as np
import pandas as pd
import torch
from scipy import stats

from heatmapbench._moved import names_moved
from heatmapbench.evaluation.markdown import MISSING, format_ci, format_number
from heatmapbench.metrics import names as mn
from heatmapbench.metrics.summary import N_BOOT, bootstrap_indices, percentile_ci

if TYPE_CHECKING:
    from heatmapbench.evaluation.core import Evaluation

__all__ = ["PER_IMAGE_COLUMNS", "PER_IMAGE_STEM", "RANKED_ORDERS", "SETTING_KEYS", "CrossRunReliability", "beats_random",
           "bootstrap_weights", "cronbach_alpha", "cross_run_reliability", "cross_run_reliability_markdown",
           "cross_run_reliability_metrics", "kendall_tau", "kendall_w", "krippendorff_alpha", "krippendorff_alpha_ci",
           "order_agreement", "per_image_ranks", "per_image_table", "ranking_stability", "read_table", "run_reliability",
           "run_reliability_markdown", "run_reliability_metrics", "score_matrix", "setting_scores", "write_table"]

#: The names these functions had when the report kept its own copies (until the next release).
__getattr__ = names_moved(__name__, {"reliability_metrics": f"{__name__}.run_reliability_metrics",
                                      "reliability_markdown": f"{__name__}.run_reliability_markdown"})

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
            raise ValueError(f"the per-image table has no {o!r} rows: order={order!r} needs the {o} curves (score "
                             f"with {o} among the orders)")
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


def run_reliability_metrics(result: dict) -> dict[str, float]:
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


def run_reliability_markdown(result: dict) -> str:
    """The reliability of one evaluation's ranking (:func:`run_reliability`) as Markdown."""
    lines = ["Agreement of the images on the ranking (Krippendorff's α, ordinal; 1 = every image ranks the "
             "explainers alike, 0 = no better than chance):", "",
             "| ranked by | α [95% CI] | images | explainers |", "|---|---|---|---|"]
    if not len(result["alpha"]):
        lines.append("| – | fewer than 2 explainers or images: nothing to rank in this run (heatmapbench-report "
                     "ranks the explainers of a sweep's runs together) | – | – |")
    for _, r in result["alpha"].iterrows():
        alpha = format_ci(r.krippendorff_alpha, r.krippendorff_alpha_lo, r.krippendorff_alpha_hi, ".3f")
        lines.append(f"| {r.order} | {alpha} | {r.images} | {r.explainers} |")
    lines += ["", "| ranked by | explainer | rank | mean image rank | P(best mean) | beats random on [95% CI] |",
              "|---|---|---|---|---|---|"]
    ranking = result["ranking"].sort_values(["order", "rank"], kind="stable")
    for _, r in ranking.iterrows():
        wins = (format_ci(r.beats_random, r.beats_random_lo, r.beats_random_hi, ".0%")
                if pd.notna(r.get("beats_random")) else MISSING)
        lines.append(f"| {r.order} | {r.explainer} | {format_number(r['rank'], '.3g')} | "
                     f"{format_number(r.mean_image_rank, '.2f')} | {format_number(r.p_best, '.2f')} | {wins} |")
    agreement = result["agreement"]
    if agreement:
        per_image = format_ci(agreement["tau_per_image"], agreement["tau_per_image_lo"], agreement["tau_per_image_hi"],
                              "+.3f")
        lines += ["", f"MoRF vs LeRF ranking: Kendall τ {format_number(agreement['tau'], '+.3f')} (means); per image "
                      f"{per_image} over {int(agreement['images'])} images."]
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


# -- across runs: the tables of heatmapbench-report ----------------------------------------------
#: Columns of a run that say which setting it scored (order comes from the per-image table).
SETTING_KEYS = ("perturbation", "region_size")


@dataclass
class CrossRunReliability:
    """The tables of the across-runs reliability; ``notes`` say what was left out and why."""

    settings: pd.DataFrame  # one row per setting: its keys, images, α [CI], rank/<explainer>, score/<explainer>
    consistency: pd.DataFrame  # one row per explainer: Cronbach's α [CI], mean/min/max rank, times first
    tau: pd.DataFrame  # settings × settings Kendall τ of the mean scores
    agreement: dict[str, float] = field(default_factory=dict)  # Kendall's W [CI], its p, τ mean/min
    explainers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def setting_scores(per_image: pd.DataFrame, runs: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Per-image oriented scores with their setting: ``setting``, setting keys, ``image``, ``explainer``, ``score``.

    ``per_image`` is the per-image tables of the runs with a ``run_id`` column; ``runs`` has one
    row per run (or run × explainer) with the setting keys. Runs of the same setting (replicates,
    or one explainer per sweep job) are pooled; a replicated image × explainer is averaged.
    """
    keys = [*SETTING_KEYS, *[k for k in extra if k not in SETTING_KEYS]]
    settings = runs.drop_duplicates("run_id").set_index("run_id")[keys]
    rows = per_image[per_image.order.isin(["morf", "lerf"])].join(settings, on="run_id", how="inner")
    rows = rows.assign(score=np.where(rows.order == "morf", rows.aopc_rel, -rows.aopc_rel))
    keys = [*keys, "order"]
    rows = rows.sort_values(keys, kind="stable", na_position="last")  # settings in a readable order
    filled = rows.astype({k: object for k in keys}).fillna({k: "–" for k in keys})
    scores = filled.groupby([*keys, "image", "explainer"], sort=False, dropna=False).score.mean().reset_index()
    scores.insert(0, "setting", scores[keys].apply(_label, axis=1, keys=keys))
    return scores


def _label(row: pd.Series, keys: Sequence[str]) -> str:
    parts = [str(row.perturbation), f"{row.region_size:g}px" if isinstance(row.region_size, (int, float))
             and np.isfinite(row.region_size) else f"{row.region_size}px", str(row.order)]
    parts += [f"{k.removeprefix('params.')}={row[k]}" for k in keys if k not in (*SETTING_KEYS, "order")]
    return " ".join(parts)


def cross_run_reliability(scores: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> CrossRunReliability:
    """All across-runs reliability tables from :func:`setting_scores`."""
    notes: list[str] = []
    settings = list(dict.fromkeys(scores.setting))
    counts = scores.groupby("explainer").setting.nunique()
    explainers = [e for e in dict.fromkeys(scores.explainer) if counts[e] == len(settings)]
    dropped = sorted(set(scores.explainer) - set(explainers))
    if dropped:
        notes.append(f"explainers not scored in every setting are left out: {dropped}")
    cube = scores[scores.explainer.isin(explainers)].pivot_table(
        index="image", columns=["setting", "explainer"], values="score", sort=False).dropna(axis=0, how="any")
    dropped_images = scores.image.nunique() - len(cube)
    if dropped_images:
        notes.append(f"{dropped_images} images not scored in every setting are left out")
    x = np.stack([cube[s][explainers].to_numpy() for s in settings]) if len(cube) else np.empty((0, 0, 0))
    # x: (S settings, I images, E explainers)
    keys = [c for c in scores.columns if c not in ("setting", "image", "explainer", "score")]
    table = scores.drop_duplicates("setting").set_index("setting").loc[settings, keys].reset_index()
    table["images"] = x.shape[1] if x.size else 0
    empty = CrossRunReliability(settings=table, consistency=pd.DataFrame(), tau=pd.DataFrame(), explainers=explainers,
                                notes=notes)
    if len(explainers) < 2 or x.shape[1] < 2:
        notes.append("fewer than 2 explainers or 2 images in common: no ranking to compare")
        return empty
    means = x.mean(axis=1)  # (S, E)
    ranks = stats.rankdata(-means, axis=1, method="average")
    alphas = np.array([krippendorff_alpha_ci(x[s], n_boot=n_boot, seed=seed) for s in range(len(settings))])
    table["krippendorff_alpha"], table["krippendorff_alpha_lo"], table["krippendorff_alpha_hi"] = alphas.T
    table["ranking"] = [" > ".join(np.array(explainers)[np.argsort(r, kind="stable")]) for r in ranks]
    for j, name in enumerate(explainers):
        table[f"rank/{name}"] = ranks[:, j]
    for j, name in enumerate(explainers):
        table[f"score/{name}"] = means[:, j]

    tau = pd.DataFrame([[kendall_tau(means[a], means[b]) for b in range(len(settings))]
                        for a in range(len(settings))], index=settings, columns=settings)
    consistency = pd.DataFrame({"explainer": explainers, "mean_rank": ranks.mean(axis=0),
                                "best_rank": ranks.min(axis=0), "worst_rank": ranks.max(axis=0),
                                "first_in": (ranks == 1).sum(axis=0), "settings": len(settings)})
    agreement: dict[str, float] = {"settings": float(len(settings)), "explainers": float(len(explainers)),
                                   "images": float(x.shape[1])}
    if len(settings) >= 2:
        weights = bootstrap_weights(x.shape[1], n_boot, seed)  # (B, I): one resampling of images for everything
        boot_means = np.einsum("bi,sie->bse", weights, x) / x.shape[1]
        boot_w = np.array([kendall_w(stats.rankdata(-m, axis=1)) for m in boot_means])
        w = kendall_w(ranks)
        m, n = ranks.shape
        lo, hi = percentile_ci(boot_w)
        off = tau.to_numpy()[~np.eye(len(settings), dtype=bool)]
        agreement.update(kendall_w=w, kendall_w_lo=float(lo), kendall_w_hi=float(hi),
                         kendall_w_p=float(stats.chi2.sf(w * m * (n - 1), n - 1)) if np.isfinite(w) else np.nan,
                         tau_mean=float(np.nanmean(off)) if np.isfinite(off).any() else np.nan,
                         tau_min=float(np.nanmin(off)) if np.isfinite(off).any() else np.nan)
        items = np.moveaxis(x, 0, -1)  # (I images, E explainers, S settings)
        draws = [np.repeat(np.arange(x.shape[1]), c.astype(int)) for c in weights]  # image indices per resample
        alpha, alpha_lo, alpha_hi = [], [], []
        for j in range(len(explainers)):
            alpha.append(cronbach_alpha(items[:, j, :]))
            lo, hi = percentile_ci(np.array([cronbach_alpha(items[i, j, :]) for i in draws]))
            alpha_lo.append(lo)
            alpha_hi.append(hi)
        consistency.insert(1, "cronbach_alpha", alpha)
        consistency.insert(2, "cronbach_alpha_lo", alpha_lo)
        consistency.insert(3, "cronbach_alpha_hi", alpha_hi)
    else:
        notes.append("one setting only: nothing to compare across settings")
    consistency["images"] = x.shape[1]
    return CrossRunReliability(settings=table, consistency=consistency.sort_values("mean_rank", kind="stable",
                                                                                   ignore_index=True),
                               tau=tau, agreement=agreement, explainers=explainers, notes=notes)


def cross_run_reliability_metrics(result: CrossRunReliability) -> dict[str, float]:
    """The MLflow metrics of :func:`cross_run_reliability`, logged by the report's summary run (NaNs left out)."""
    metrics = {}
    for key, value in result.agreement.items():
        stem, bound = (key[:-3], key[-2:]) if key.endswith(("_lo", "_hi")) else (key, None)
        metrics[mn.reliability_metric(stem, bound=bound)] = float(value)
    if "cronbach_alpha" in result.consistency:
        for _, row in result.consistency.iterrows():
            for bound in (None, "lo", "hi"):
                key = "cronbach_alpha" + (f"_{bound}" if bound else "")
                metrics[mn.explainer_reliability_metric("cronbach_alpha", row.explainer, bound)] = float(row[key])
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def cross_run_reliability_markdown(result: CrossRunReliability) -> str:
    """The across-runs reliability as Markdown: agreement, per-explainer consistency, per-setting ranks."""
    lines = ["## Is the ranking stable across settings?", ""]
    a = result.agreement
    if "kendall_w" in a:
        lines += [f"Kendall's W of the {int(a['settings'])} settings' rankings of {int(a['explainers'])} explainers "
                  f"on {int(a['images'])} images: **{format_number(a['kendall_w'], '.3f')}** "
                  f"[{format_number(a['kendall_w_lo'], '.3f')}, {format_number(a['kendall_w_hi'], '.3f')}] "
                  f"(1 = every setting ranks alike; Friedman p = {format_number(a['kendall_w_p'], '.2g')}); "
                  f"pairwise Kendall τ between settings: mean {format_number(a['tau_mean'], '+.2f')}, "
                  f"min {format_number(a['tau_min'], '+.2f')}.", ""]
    if len(result.consistency):
        has_alpha = "cronbach_alpha" in result.consistency
        lines += ["| explainer | Cronbach's α over settings [95% CI] | mean rank | best–worst rank | first in |",
                  "|---|---|---|---|---|"]
        for _, r in result.consistency.iterrows():
            alpha = (format_ci(r.cronbach_alpha, r.cronbach_alpha_lo, r.cronbach_alpha_hi, ".3f")
                     if has_alpha else MISSING)
            lines.append(f"| {r.explainer} | {alpha} | {format_number(r.mean_rank, '.2f')} | "
                         f"{format_number(r.best_rank, 'g')}–{format_number(r.worst_rank, 'g')} | "
                         f"{int(r.first_in)}/{int(r.settings)} |")
        lines.append("")
    if "ranking" in result.settings:
        lines += ["| setting | ranking (best first) | Krippendorff's α of images [95% CI] | images |",
                  "|---|---|---|---|"]
        for _, r in result.settings.iterrows():
            alpha = format_ci(r.krippendorff_alpha, r.krippendorff_alpha_lo, r.krippendorff_alpha_hi, ".3f")
            lines.append(f"| {r.setting} | {r.ranking} | {alpha} | {int(r.images)} |")
    lines += [f"\nNote: {note}." for note in result.notes]
    return "\n".join(lines) + "\n"
