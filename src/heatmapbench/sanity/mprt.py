"""The model-parameter randomisation test (MPRT; Adebayo et al., NeurIPS 2018) for several explainers.

For every step of a :func:`~heatmapbench.sanity.randomisation.schedule` (cascading from the output
layer down, or one layer at a time), a copy of the model with those layers re-initialised explains
the same images for the same classes (the trained model's predictions), and each heatmap is compared
with the trained model's by the measures of :mod:`heatmapbench.sanity.similarity`, per image. A
heatmap that stays similar while the weights it should depend on are random explains the input, not
the model: Adebayo et al. found guided backprop and deconvnet to stay similar, gradients to change.

Lower similarity after randomisation is better. Summaries are means over the images with percentile
bootstrap CIs (:func:`heatmapbench.metrics.summary.mean_ci`, one draw of image indices for every
cell, so all intervals resample the same images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from heatmapbench.metrics.summary import N_BOOT, bootstrap_indices, mean_ci
from heatmapbench.sanity.randomisation import MODES, RandomisationStep, randomised_copy, schedule
from heatmapbench.sanity.similarity import SIMILARITIES

__all__ = ["MPRTResult", "model_randomisation", "heatmaps"]

#: The label of the trained model's own column in figures and tables.
TRAINED = "trained"


def heatmaps(explainer: Callable, model: nn.Module, x: Tensor, target: Tensor,
             batch_size: int | None = None) -> Tensor:
    """(N, H, W) heatmaps of ``x`` in batches of ``batch_size`` (``None``: one batch)."""
    step = len(x) if batch_size is None else int(batch_size)
    return torch.cat([explainer(model, x[i:i + step], target[i:i + step]) for i in range(0, len(x), step)])


@dataclass
class MPRTResult:
    """Per-image similarities of every explainer's heatmaps to the trained model's.

    Attributes
    ----------
    mode
        ``cascading`` or ``independent``.
    steps
        The randomised models, output layer first.
    similarity
        ``similarity[measure][explainer]``: (S, N) float64, one row per step, one column per image.
    target
        (N,) the classes explained (the trained model's predictions unless given).
    gallery_x, gallery
        The first images and ``gallery[explainer]``: (1 + S, G, H, W) heatmaps, the trained model's first.
    """

    mode: str
    steps: list[RandomisationStep]
    similarity: dict[str, dict[str, Tensor]]
    target: Tensor
    gallery_x: Tensor | None = None
    gallery: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def explainers(self) -> list[str]:
        return list(next(iter(self.similarity.values())))

    @property
    def num_images(self) -> int:
        return int(self.target.shape[0])

    def summary(self, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
        """One row per explainer × measure × step: mean similarity over the images with a bootstrap CI.

        Images where a measure is undefined (Spearman of a constant heatmap) are left out of that
        cell; ``images`` counts those kept. ``depth`` is 1 for the output layer's step.
        """
        idx = bootstrap_indices(self.num_images, n_boot, seed)
        rows = []
        for measure, per_explainer in self.similarity.items():
            for name, values in per_explainer.items():
                for depth, (step, v) in enumerate(zip(self.steps, values), start=1):
                    finite = torch.isfinite(v)
                    row = {"explainer": name, "mode": self.mode, "measure": measure, "depth": depth,
                           "layer": step.label, "images": int(finite.sum())}
                    if bool(finite.all()):
                        m, lo, hi = mean_ci(v, level=level, indices=idx)
                    elif bool(finite.any()):
                        m, lo, hi = mean_ci(v[finite], level=level, n_boot=n_boot, seed=seed)
                    else:
                        m = lo = hi = float("nan")
                    rows.append({**row, "mean": m, "lo": lo, "hi": hi})
        return pd.DataFrame(rows)


def model_randomisation(model: nn.Module, x: Tensor, explainers: dict[str, Callable], *,
                        target: Tensor | None = None, mode: str = "cascading", max_steps: int | None = None,
                        layers: Sequence[str] | None = None, measures: Sequence[str] = tuple(SIMILARITIES),
                        topk: float = 0.1, ssim_window: int = 7, seed: int = 42, batch_size: int | None = None,
                        gallery_size: int = 4, progress: Callable[[str], Any] | None = None) -> MPRTResult:
    """Run the randomisation test of ``explainers`` on ``x`` (model space, (N, C, H, W)).

    ``model`` is never modified: each step explains a re-initialised deep copy
    (:func:`~heatmapbench.sanity.randomisation.randomised_copy`). ``target`` defaults to the trained
    model's predicted classes, kept for every randomised model (as Adebayo et al. and Quantus do).
    """
    from heatmapbench.evaluation.core import predicted_class

    start = time.perf_counter()
    unknown = [m for m in measures if m not in SIMILARITIES]
    if unknown or not measures:
        raise ValueError(f"measures {list(measures)} are invalid: choose from {', '.join(SIMILARITIES)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: choose one of {', '.join(MODES)}")
    steps = schedule(model, mode, max_steps, None if layers is None else list(layers))
    if target is None:
        target = predicted_class(model, x)
    options = {"topk": {"fraction": topk}, "ssim": {"win_size": ssim_window}}
    trained = {name: heatmaps(e, model, x, target, batch_size) for name, e in explainers.items()}
    similarity = {m: {name: torch.empty(len(steps), len(x), dtype=torch.float64) for name in explainers}
                  for m in measures}
    g = min(gallery_size, len(x))
    gallery = {name: [h[:g].cpu()] for name, h in trained.items()}
    for s, step in enumerate(steps):
        if progress is not None:
            progress(f"{mode} {s + 1}/{len(steps)}: {step.label}")
        random_model = randomised_copy(model, step.layers, seed)
        for name, explainer in explainers.items():
            h = heatmaps(explainer, random_model, x, target, batch_size)  # (N, H, W)
            for m in measures:
                similarity[m][name][s] = SIMILARITIES[m](trained[name], h, **options.get(m, {})).cpu()
            gallery[name].append(h[:g].cpu())
        del random_model
    return MPRTResult(mode=mode, steps=steps, similarity=similarity, target=target.cpu(),
                      gallery_x=x[:g].detach().cpu() if g else None,
                      gallery={n: torch.stack(v) for n, v in gallery.items()} if g else {},
                      seconds=time.perf_counter() - start)
