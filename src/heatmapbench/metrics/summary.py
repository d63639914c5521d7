"""The one home of AOPC summaries: AOPC, AOPC relative to random, ABPC, bootstrap CIs and tests.

Per image (paper eq. 11): ``AOPC = 1/(L+1) Σ_{k=0..L} curve_k``; relative to random is the
explainer's AOPC minus the random ordering's on the same image (Fig. 4); ABPC (appendix
eq. 13) is ``AOPC_MoRF − AOPC_LeRF``. Following Tomsett et al. (AAAI 2020), every mean is
reported with a confidence interval and differences between explainers are tested rather than
compared as bare means. Used by the engine's callers, :class:`~heatmapbench.evaluation.Evaluation`
(hence the training callback and ``heatmapbench-evaluate``) and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # the engine itself uses aopc() below
    from heatmapbench.perturbation.engine import PerturbationResult

__all__ = ["aopc", "relative_to_random", "abpc", "mean_ci", "paired_bootstrap_test", "PairedTest"]


def aopc(curves: Tensor) -> Tensor:
    """Per-image AOPC of perturbation curves ``(..., L+1)``: ``1/(L+1) Σ_{k=0..L} curve_k`` (eq. 11)."""
    return curves.mean(dim=-1)


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


def _boot_means(v: Tensor, n_boot: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    return v[idx].mean(dim=1)  # (n_boot,)


def mean_ci(values: Tensor, *, level: float = 0.95, n_boot: int = 10_000,
            seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval: ``(mean, lo, hi)``.

    ``values`` is flattened (e.g. the per-image AOPCs). Seeded, so the interval is reproducible.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = _flat(values)
    bm = _boot_means(v, n_boot, seed)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(bm, q).tolist()
    return float(v.mean()), float(lo), float(hi)


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_bootstrap_test` on the differences d = a − b.

    mean_diff, lo, hi : the mean of d and its bootstrap CI.
    p_value : one-sided bootstrap p-value of "A does not beat B" (fraction of bootstrap means
        of d that are ≤ 0, centred under H0). Small means A beats B.
    prob_a_better : fraction of bootstrap resamples in which mean(d) > 0.
    """

    mean_diff: float
    lo: float
    hi: float
    p_value: float
    prob_a_better: float


def paired_bootstrap_test(a: Tensor, b: Tensor, *, level: float = 0.95, n_boot: int = 10_000,
                          seed: int = 0) -> PairedTest:
    """Paired bootstrap test of "explainer A beats explainer B" (higher is better).

    ``a`` and ``b`` are per-image scores on the same images (e.g. AOPC relative to random, or
    ABPC), shape (B,). Images are resampled with replacement as pairs. The p-value resamples the
    differences shifted to mean zero (the null "no difference") and counts means ≥ the observed.
    """
    va, vb = _flat(a), _flat(b)
    if va.shape != vb.shape:
        raise ValueError(f"paired test needs the same images: {va.numel()} vs {vb.numel()} values")
    d = va - vb
    bm = _boot_means(d, n_boot, seed)
    obs = float(d.mean())
    null = bm - obs  # bootstrap distribution under H0: mean difference 0
    p = (float((null >= obs).sum()) + 1) / (n_boot + 1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(bm, q).tolist()
    return PairedTest(obs, float(lo), float(hi), p, float((bm > 0).double().mean()))
