"""Across runs: is the explainers' ranking a property of the explainers or of the protocol?

A *setting* is one protocol choice: perturbation × region size × order (× every other parameter
that splits the comparison, e.g. the model). From the per-image tables of the selected runs
(``evaluation/per_image.parquet``), on the images every setting scored:

* per setting: the explainers' mean oriented score (higher is better: MoRF AOPC − random, LeRF
  random − AOPC), their rank, and Krippendorff's α of the per-image ranks (do the images agree?);
* across settings: Kendall's W of the settings' rankings (with a bootstrap CI over images and
  Friedman's p), pairwise Kendall τ between settings, and per explainer Cronbach's α of its
  per-image scores over the settings (do the settings order the images alike?, Tomsett et al. 2020).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from heatmapbench.metrics import names as mn
from heatmapbench.metrics.summary import N_BOOT
from heatmapbench.evaluation.reliability import (
    bootstrap_weights,
    cronbach_alpha,
    kendall_tau,
    kendall_w,
    krippendorff_alpha_ci,
    percentile_ci,
)

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


def reliability_metrics(result: CrossRunReliability) -> dict[str, float]:
    """The summary run's metrics (NaNs left out)."""
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


def _g(value, fmt: str = ".3f") -> str:
    return "–" if value is None or not np.isfinite(value) else format(value, fmt)


def reliability_markdown(result: CrossRunReliability) -> str:
    """The across-runs reliability as Markdown: agreement, per-explainer consistency, per-setting ranks."""
    lines = ["## Is the ranking stable across settings?", ""]
    a = result.agreement
    if "kendall_w" in a:
        lines += [f"Kendall's W of the {int(a['settings'])} settings' rankings of {int(a['explainers'])} explainers "
                  f"on {int(a['images'])} images: **{_g(a['kendall_w'])}** [{_g(a['kendall_w_lo'])}, "
                  f"{_g(a['kendall_w_hi'])}] (1 = every setting ranks alike; Friedman p = {_g(a['kendall_w_p'], '.2g')}); "
                  f"pairwise Kendall τ between settings: mean {_g(a['tau_mean'], '+.2f')}, "
                  f"min {_g(a['tau_min'], '+.2f')}.", ""]
    if len(result.consistency):
        has_alpha = "cronbach_alpha" in result.consistency
        lines += ["| explainer | Cronbach's α over settings [95% CI] | mean rank | best–worst rank | first in |",
                  "|---|---|---|---|---|"]
        for _, r in result.consistency.iterrows():
            alpha = (f"{_g(r.cronbach_alpha)} [{_g(r.cronbach_alpha_lo)}, {_g(r.cronbach_alpha_hi)}]"
                     if has_alpha else "–")
            lines.append(f"| {r.explainer} | {alpha} | {_g(r.mean_rank, '.2f')} | {_g(r.best_rank, 'g')}–"
                         f"{_g(r.worst_rank, 'g')} | {int(r.first_in)}/{int(r.settings)} |")
        lines.append("")
    if "ranking" in result.settings:
        lines += ["| setting | ranking (best first) | Krippendorff's α of images [95% CI] | images |",
                  "|---|---|---|---|"]
        for _, r in result.settings.iterrows():
            lines.append(f"| {r.setting} | {r.ranking} | {_g(r.krippendorff_alpha)} [{_g(r.krippendorff_alpha_lo)}, "
                         f"{_g(r.krippendorff_alpha_hi)}] | {int(r.images)} |")
    lines += [f"\nNote: {note}." for note in result.notes]
    return "\n".join(lines) + "\n"
