"""Heatmaps plus region-perturbation curves for several explainers on the same images.

Shared by the training callback (``AOPCCallback``) and ``heatmapbench-evaluate``: both
compute one :class:`Evaluation` per batch of images, concatenate the batches and hand the
result to :mod:`heatmapbench.evaluation.writer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation.settings import EvaluationSettings
from heatmapbench.explain import Explainer, get_explainer
from heatmapbench.accel.fusion import fusion
from heatmapbench.metrics.complexity import heatmap_entropy, heatmap_jpeg_size, heatmap_png_size
from heatmapbench.metrics.summary import (
    N_BOOT,
    Statistics,
    aopc,
    bootstrap_indices,
    curves_table,
    pairwise_table,
    summary_table,
)
from heatmapbench.perturbation import Perturbation, get_perturbation, region_perturbation
from heatmapbench.perturbation.engine import check_batch, check_target_range, eval_mode
from heatmapbench.accel.layout import fast_model, to_layout
from heatmapbench.accel.precision import autocast, check_precision


#: Explainers as the Python API takes them: a name, an object, a list of names and objects, or a
#: mapping from the name shown in tables to a name or an object.
ExplainerSpec = Union[str, Explainer, Sequence[Union[str, Explainer]], Mapping[str, Union[str, Explainer]]]


def build_explainers(explainers: ExplainerSpec) -> dict[str, Explainer]:
    """Explainers keyed by the name their results are shown under, every name resolved once here.

    A registered name is shown as itself; an object given without a name under its class's
    ``name`` (pass a mapping to choose, e.g. two LRP variants). Unknown names fail at once,
    listing the known ones.
    """
    given = explainers
    if isinstance(explainers, (str, Explainer)):
        explainers = [explainers]
    if isinstance(explainers, Mapping):
        items = list(explainers.items())
    else:
        items = [(e if isinstance(e, str) else getattr(e, "name", type(e).__name__), e) for e in explainers]
    if not items:
        raise ValueError(f"explainers={given!r} is invalid: name at least one explainer (a registered name or an "
                         "Explainer)")
    labels = [label for label, _ in items]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"explainers {twice} appear more than once; pass a mapping {{label: explainer}} "
                         "to give each its own label")
    return {label: get_explainer(e) for label, e in items}


def build_perturbation(perturbation: str | Perturbation | Mapping) -> Perturbation:
    """A perturbation from its name, its config node (``_target_``) or an instance."""
    if isinstance(perturbation, Mapping) or OmegaConf.is_config(perturbation):
        from hydra.utils import instantiate

        perturbation = instantiate(perturbation)
    return get_perturbation(perturbation)


def build_settings(settings: EvaluationSettings | Mapping | None) -> EvaluationSettings:
    """Evaluation settings from an instance, a mapping of its fields, or the defaults (None)."""
    if settings is None:
        return EvaluationSettings()
    if isinstance(settings, EvaluationSettings):
        return settings
    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_container(settings, resolve=True)
    return EvaluationSettings(**dict(settings))


@dataclass
class Evaluation:
    """Per-image results of several explainers on the same images.

    Attributes
    ----------
    steps
        L.
    curves
        ``curves[explainer][order]``: (N, L+1) f(x⁽⁰⁾) − f(x⁽ᵏ⁾), averaged over repeats.
    random_curves
        (N, L+1) the random-ordering baseline, averaged over ``random_repeats``.
    complexity
        ``complexity[explainer]``: {"png": (N,), "jpeg": (N,), "entropy": (N,)}.
    target, label
        (N,) the scored (predicted) class and, when known, the true label.
    gallery_x, gallery_heatmaps
        The first images in pixel space and their heatmaps, for the gallery figure.
    clean_scores
        (N,) f(x⁽⁰⁾), the unperturbed score of the target class (logit or probability).
    forwards
        How the engine ran the curves' forwards: ``incremental (…)`` or ``full (why)``
        (:attr:`EvaluationSettings.incremental`).
    """

    steps: int
    curves: dict[str, dict[str, Tensor]]
    random_curves: Tensor
    complexity: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    target: Tensor | None = None
    label: Tensor | None = None
    gallery_x: Tensor | None = None
    gallery_heatmaps: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    clean_scores: Tensor | None = None
    forwards: str = ""

    @property
    def explainers(self) -> list[str]:
        return list(self.curves)

    @property
    def num_images(self) -> int:
        return int(self.random_curves.shape[0])

    # -- per image ---------------------------------------------------------------------
    def aopc(self, name: str, order: str = "morf") -> Tensor:
        """(N,) AOPC per image (paper eq. 11)."""
        return aopc(self.curves[name][order])

    def random_aopc(self) -> Tensor:
        return aopc(self.random_curves)

    def aopc_relative(self, name: str) -> Tensor:
        """(N,) MoRF AOPC minus the random ordering's AOPC on the same image (paper Fig. 4)."""
        return self.aopc(name) - self.random_aopc()

    def aopc_norm(self, name: str | None = None) -> float:
        """Mean AOPC over mean clean score f(x⁽⁰⁾) of the same images; ``name=None``: the random ordering.

        A ratio of means, so one image with a score near 0 cannot blow it up. NaN when the mean
        clean score is not positive (the ratio then has no meaning) or was not recorded.
        """
        if self.clean_scores is None:
            return float("nan")
        f0 = float(self.clean_scores.double().mean())
        if not f0 > 0:
            return float("nan")
        values = self.random_aopc() if name is None else self.aopc(name)
        return float(values.double().mean()) / f0

    def abpc(self, name: str) -> Tensor | None:
        """(N,) ABPC = AOPC_MoRF − AOPC_LeRF (paper appendix eq. 13), when LeRF was run."""
        if "lerf" not in self.curves[name]:
            return None
        return self.aopc(name, "morf") - self.aopc(name, "lerf")

    # -- combining batches -------------------------------------------------------------
    @classmethod
    def concat(cls, parts: Sequence["Evaluation"], gallery_size: int = 8,
               images: Sequence[Tensor] | None = None) -> "Evaluation":
        """Join the evaluations of batches of images into one, rows in image order.

        ``images`` gives each part's (B,) indices in the evaluated set, for batches that come in any
        order (the shards of a distributed or resumed run, :func:`~heatmapbench.evaluation.shards.merge_shards`);
        without it the parts are consecutive batches, in order. A part's gallery rows are its first
        images; the joined gallery is the ``gallery_size`` lowest-indexed of them (None when no part has
        one, or ``gallery_size`` is 0). The one way per-image results are joined, in memory or from files.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        layout = lambda e: (e.steps, {n: list(c) for n, c in e.curves.items()})  # noqa: E731
        if any(layout(p) != layout(first) for p in parts[1:]):
            raise ValueError("evaluations of different settings (steps, explainers or orders) cannot be joined")
        if images is None:
            ends = torch.tensor([p.num_images for p in parts]).cumsum(0).tolist()
            images = [torch.arange(end - p.num_images, end) for p, end in zip(parts, ends)]
        images = [torch.as_tensor(i).long().cpu().reshape(-1) for i in images]
        if len(images) != len(parts) or any(i.numel() != p.num_images for i, p in zip(images, parts)):
            raise ValueError(f"images must give one index per image of each part: {[i.numel() for i in images]} for "
                             f"parts of {[p.num_images for p in parts]} images")
        order = torch.argsort(torch.cat(images), stable=True)

        def take(tensors: Sequence[Tensor | None], rows: Tensor) -> Tensor | None:
            if not tensors or any(t is None for t in tensors):
                return None
            return torch.cat(list(tensors)).index_select(0, rows)

        shown = [(i[:p.gallery_x.shape[0]], p) for i, p in zip(images, parts) if p.gallery_x is not None]
        gallery = [p for _, p in shown] if shown and gallery_size else []
        g_order = torch.argsort(torch.cat([i for i, _ in shown]), stable=True)[:gallery_size] if gallery else None
        return cls(
            steps=first.steps,
            curves={n: {o: take([p.curves[n][o] for p in parts], order) for o in first.curves[n]} for n in first.curves},
            random_curves=take([p.random_curves for p in parts], order),
            complexity={n: {k: take([p.complexity[n][k] for p in parts], order) for k in first.complexity[n]}
                        for n in first.complexity},
            target=take([p.target for p in parts], order),
            label=take([p.label for p in parts], order),
            gallery_x=take([p.gallery_x for p in gallery], g_order) if gallery else None,
            gallery_heatmaps={n: take([p.gallery_heatmaps[n] for p in gallery], g_order) for n in first.curves}
            if gallery else {},
            seconds=sum(p.seconds for p in parts),
            clean_scores=take([p.clean_scores for p in parts], order),
            forwards="; ".join(dict.fromkeys(p.forwards for p in parts if p.forwards)),
        )

    # -- tables (heatmapbench.metrics.summary) ----------------------------------------
    def per_image(self, name: str) -> dict[str, Tensor]:
        """(N,) per-image metrics of one explainer: ``aopc``, ``aopc_rel`` (+ ``aopc_lerf``, ``abpc``)."""
        metrics = {mn.AOPC: self.aopc(name), mn.AOPC_REL: self.aopc_relative(name)}
        if "lerf" in self.curves[name]:
            metrics[mn.AOPC_LERF] = self.aopc(name, "lerf")
            metrics[mn.ABPC] = self.abpc(name)
        return metrics

    def statistics(self, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
                   alpha: float = 0.05) -> Statistics:
        """The summary and the pairwise tests from one bootstrap draw (``n_boot`` resamples of the images).

        Compute it once per evaluation and hand it to everything that prints, logs or writes it.
        """
        idx = bootstrap_indices(self.num_images, n_boot, seed)
        return Statistics(summary=self.summary(indices=idx, level=level),
                          pairwise=self.pairwise(indices=idx, level=level, alpha=alpha),
                          n_boot=n_boot, seed=seed, level=level)

    def summary(self, n_boot: int = N_BOOT, seed: int = 0, *, level: float = 0.95,
                indices: Tensor | None = None) -> pd.DataFrame:
        """One row per explainer: means with bootstrap CIs (Tomsett et al.) and Table I sizes."""
        complexity = {n: {mn.COMPLEXITY[k]: v for k, v in c.items()} for n, c in self.complexity.items()}
        return summary_table({n: self.per_image(n) for n in self.explainers}, self.random_aopc(),
                             complexity=complexity, level=level, n_boot=n_boot, seed=seed, indices=indices)

    def pairwise(self, metric: str = "aopc_rel", n_boot: int = N_BOOT, seed: int = 0, *, level: float = 0.95,
                 alpha: float = 0.05, indices: Tensor | None = None) -> pd.DataFrame:
        """Paired bootstrap tests of "A beats B" for every ordered pair, Holm–Bonferroni adjusted."""
        if metric not in ("aopc_rel", "abpc"):
            raise ValueError(f"metric={metric!r} is invalid: choose aopc_rel or abpc")
        values = {n: self.aopc_relative(n) if metric == "aopc_rel" else self.abpc(n) for n in self.explainers}
        return pairwise_table(values, metric, alpha=alpha, level=level, n_boot=n_boot, seed=seed, indices=indices)

    def curves_table(self) -> pd.DataFrame:
        """Fig. 4 as numbers: per explainer and step L, AOPC_L and AOPC_L relative to random."""
        return curves_table(self.curves, self.random_curves)


def predicted_class(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """(N,) argmax of the model's scores, in eval mode without autograd (no labels needed)."""
    from heatmapbench.perturbation import eval_mode

    with eval_mode(model), torch.inference_mode():
        parts = [model(x[i:i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(parts)  # outside inference mode: a normal tensor


class ModelScoresNotFinite(ValueError):
    """The model's own scores of the clean images are NaN or inf: no heatmap can be judged on them."""


def check_scores_finite(scores: Tensor, precision: str = "fp32") -> None:
    """Raise :class:`ModelScoresNotFinite` naming how many images have NaN/inf scores ``(B, ...)``."""
    bad = ~torch.isfinite(scores.reshape(scores.shape[0], -1)).all(dim=1)  # (B,)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ModelScoresNotFinite(
            f"the model's scores are not finite (NaN or inf) for {int(bad.sum())} of {len(bad)} images (first: "
            f"image {first}) at precision {precision}: the model is at fault, not an explainer; check its weights "
            "(a diverged training?) and its input normalisation")


def evaluate_batch(model: nn.Module, x: Tensor, explainers: ExplainerSpec | None = None,
                   settings: EvaluationSettings | Mapping | None = None,
                   perturbation: str | Perturbation | Mapping = "uniform", *,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   value_range: tuple[float, float] = (0.0, 1.0), target: Tensor | None = None,
                   label: Tensor | None = None, gallery_size: int = 0, seed_offset: int = 0,
                   progress: Callable[[int], Any] | None = None) -> Evaluation:
    """Heatmaps of every explainer and their perturbation curves on one batch ``x`` (model space).

    ``explainers`` and ``perturbation`` are objects or registered names (see
    :func:`build_explainers`); default: ``settings.explainers`` and the paper's uniform noise.
    ``settings`` fixes what is scored (default: the paper's, :class:`EvaluationSettings`).
    Names are resolved once here; pass objects when calling this per batch.
    ``seed_offset`` makes the draws of consecutive batches differ while staying reproducible.
    ``progress(n)`` is called after every forward pass of the perturbation engine with its ``n``
    inputs; :func:`engine_forwards` is their total.
    """
    import time

    start = time.perf_counter()
    settings = build_settings(settings)
    explainers = build_explainers(settings.explainers if explainers is None else explainers)
    perturbation = build_perturbation(perturbation)
    check_precision(settings.precision, x.device)
    check_batch(x, target)  # an empty batch, NaN/inf, negative targets: before any forward
    if target is not None:  # and classes the model has, before the explainers index with them
        with eval_mode(model), torch.inference_mode():
            check_target_range(target, model(x[:1]).shape[1])
    # one layout for the whole batch: the explainers' and the engine's passes all run in it
    with fast_model(model, settings.layout) as nhwc:
        x = to_layout(x, nhwc)
        if target is None:
            target = predicted_class(model, x)
        common = dict(target=target, perturbation=perturbation, mean=mean, std=std, value_range=value_range,
                      **settings.engine_kwargs())
        seed = settings.seed + seed_offset
        zeros = torch.zeros(x.shape[0], x.shape[2], x.shape[3], device=x.device)
        random = region_perturbation(model, x, zeros, order="random", repeats=settings.random_repeats,
                                     seed=seed, progress=progress, **common)
        random_curves = random.curves.mean(dim=0)
        clean_scores = random.scores[0, :, 0].detach().float().cpu()
        check_scores_finite(clean_scores, settings.precision)  # before any explainer is blamed for NaN heatmaps
        curves: dict[str, dict[str, Tensor]] = {}
        complexity: dict[str, dict[str, Tensor]] = {}
        gallery: dict[str, Tensor] = {}
        for name, explainer in explainers.items():
            with autocast(settings.precision, x.device), fusion(settings.fuse):
                heatmap = explainer(model, x, target)  # (B, H, W)
            curves[name] = {order: region_perturbation(model, x, heatmap, order=order, repeats=settings.repeats,
                                                       seed=seed, progress=progress, **common).curves.mean(dim=0).cpu()
                            for order in settings.orders}
            if settings.complexity:
                complexity[name] = {"png": heatmap_png_size(heatmap), "jpeg": heatmap_jpeg_size(heatmap, quality=90),
                                    "entropy": heatmap_entropy(heatmap)}
            if gallery_size:
                gallery[name] = heatmap[:gallery_size].cpu()
        gallery_x = None
        if gallery_size:
            m = torch.tensor(mean if mean is not None else [0.0], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(std if std is not None else [1.0], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            lo, hi = value_range
            gallery_x = ((x[:gallery_size] * s + m - lo) / (hi - lo)).clamp(0, 1).cpu()  # [0, 1] for display
    return Evaluation(steps=settings.steps, curves=curves, random_curves=random_curves.cpu(),
                      complexity=complexity, target=target.cpu(),
                      label=None if label is None else label.cpu(), gallery_x=gallery_x,
                      gallery_heatmaps=gallery, seconds=time.perf_counter() - start, clean_scores=clean_scores,
                      forwards=random.settings["incremental"])


def engine_forwards(settings: EvaluationSettings, images: int, explainers: int, device: str = "cpu") -> int:
    """Inputs the perturbation engine forwards in :func:`evaluate_batch` for ``images`` images.

    Each engine call scores the clean images once and R·L perturbed ones per image: the random
    ordering with R = ``random_repeats``, every explainer and order with R = ``repeats``; with the
    automatic batch size (``batch_size`` None) on a CPU it first forwards one image to measure the model.
    """
    probe = int(settings.batch_size is None and device == "cpu")
    per_call = lambda repeats: images * (1 + repeats * settings.steps) + probe  # noqa: E731
    return per_call(settings.random_repeats) + explainers * len(settings.orders) * per_call(settings.repeats)
