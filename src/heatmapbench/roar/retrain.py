"""The retraining half of ROAR/KAR: heatmaps of whole datasets, the jobs, one retraining with Lightning.

A :class:`Job` is one retraining: a method (``roar``, ``kar``, or ``none`` for the unmodified data),
an explainer, a fraction t and a seed. :func:`retrain` builds a fresh model with the recipe's
factory after seeding everything with the job's seed (Hooker et al.: same architecture, optimiser and
schedule for every retraining), fits it on the modified training images, validates on the modified
validation images and returns the accuracy on the modified test images. Nothing here knows MLflow:
the command (:mod:`heatmapbench.app.roar`) records and resumes the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Job", "jobs", "dataset_heatmaps", "retrain", "UNMODIFIED"]

#: The method of the retraining on unmodified images (t = 0, shared by every explainer).
UNMODIFIED = "none"


@dataclass(frozen=True)
class Job:
    """One retraining."""

    method: str
    explainer: str
    fraction: float
    seed: int

    @property
    def key(self) -> str:
        """A stable id, e.g. ``roar/sensitivity_l2/t0.30/seed0``."""
        return f"{self.method}/{self.explainer}/t{self.fraction:.2f}/seed{self.seed}"


def jobs(methods: Sequence[str], explainers: Sequence[str], fractions: Sequence[float],
         seeds: Sequence[int]) -> list[Job]:
    """The unmodified retraining per seed, then every method × explainer × fraction × seed (seeds innermost)."""
    out = [Job(UNMODIFIED, "-", 0.0, s) for s in seeds]
    out += [Job(m, e, float(t), s) for m in methods for e in explainers for t in fractions for s in seeds]
    return out


def dataset_heatmaps(explainer: Callable, model: nn.Module, x: Tensor, target: Tensor,
                     batch_size: int = 256) -> Tensor:
    """(N, H, W) heatmaps of ``x`` for ``target``, in batches (on ``x``'s device; returned on the CPU)."""
    parts = [explainer(model, x[i:i + batch_size], target[i:i + batch_size]).cpu()
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts)


def retrain(build_module: Callable[[], pl.LightningModule], build_trainer: Callable[[], pl.Trainer],
            train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor] | None, test: tuple[Tensor, Tensor], *,
            seed: int, batch_size: int = 128) -> tuple[pl.LightningModule, dict[str, float]]:
    """Fit a fresh module on ``train`` with everything seeded by ``seed``; return it and its metrics.

    The metrics are the trainer's last ``callback_metrics`` plus ``test/acc`` (and ``test/loss``)
    on ``test``.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    module = build_module()
    g = torch.Generator().manual_seed(seed)
    loader = lambda xy, shuffle: DataLoader(TensorDataset(*xy), batch_size=batch_size, shuffle=shuffle,  # noqa: E731
                                            generator=g if shuffle else None)
    trainer = build_trainer()
    trainer.fit(module, train_dataloaders=loader(train, True),
                val_dataloaders=loader(val, False) if val is not None and len(val[0]) else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    for results in trainer.test(module, dataloaders=loader(test, False), verbose=False):
        metrics.update({k: float(v) for k, v in results.items()})
    return module, metrics
