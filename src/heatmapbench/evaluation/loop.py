"""One evaluation as a Lightning prediction loop: its images split over processes, GPUs and machines.

``Trainer.predict`` runs :class:`EvaluationModule` over the batches of one fixed grid
(:func:`~heatmapbench.evaluation.shards.plan_batches`): with W processes, rank r scores grid
batches r, r+W, r+2W, … whole. No sampler pads anything, so no image is scored twice, and each
batch is scored with ``seed_offset`` = its first image whichever rank scores it: one process and
N processes draw the same random numbers for every image and give the same per-image AOPC.
The plan is rank 0's (broadcast when the loop starts), so every rank agrees on it even while
rank 0 is already writing. :class:`ShardWriter` writes each scored batch as a shard as soon as
it is done; at the end of the loop every rank waits for the others, so rank 0 can merge.

The module knows nothing of explanations: it hands each batch to
:func:`~heatmapbench.evaluation.core.evaluate_batch` with gradients enabled (the explainers
need them; run the Trainer with ``inference_mode=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from heatmapbench.evaluation.core import Evaluation, engine_forwards, evaluate_batch
from heatmapbench.evaluation.settings import EvaluationSettings
from heatmapbench.evaluation.shards import save_shard

if TYPE_CHECKING:
    from heatmapbench.explain import Explainer
    from heatmapbench.perturbation import Perturbation


class GridBatches(Dataset):
    """Batch ``k`` of a list of batches, collated: ``(x, y, images)`` with the images' global indices."""

    def __init__(self, dataset: Dataset, batches: Sequence[Sequence[int]]) -> None:
        self.dataset, self.batches = dataset, [list(b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y = default_collate([self.dataset[i] for i in self.batches[k]])[:2]
        return x, torch.as_tensor(y), torch.tensor(self.batches[k], dtype=torch.long)


def _only(items: list) -> Any:
    return items[0]


class EvaluationModule(pl.LightningModule):
    """Scores its rank's share of ``batches`` of ``dataset`` with :func:`evaluate_batch`; one
    ``(images, Evaluation)`` per batch goes to the prediction writer.

    ``gallery_size``: the gallery shows images ``0 … gallery_size−1`` (their heatmaps are kept by
    whichever rank scores them). ``progress``: a bar on rank 0 counting its engine forwards.
    """

    def __init__(self, net: nn.Module, dataset: Dataset, batches: Sequence[Sequence[int]],
                 explainers: Mapping[str, Explainer], settings: EvaluationSettings, perturbation: Perturbation,
                 normalization: Mapping[str, Any], *, gallery_size: int = 0, num_workers: int = 0,
                 progress: bool = False) -> None:
        super().__init__()
        self.net = net
        self.dataset, self.batches = dataset, [list(b) for b in batches]
        self.explainers, self.settings, self.perturbation = explainers, settings, perturbation
        self.normalization, self.gallery_size = dict(normalization), gallery_size
        self.num_workers, self.progress = num_workers, progress
        self._bar: tqdm | None = None
        self._forwards = ""  # what the engine ran the last batch's curves with (evaluation.incremental)
        self._mine: list[list[int]] = []

    def predict_dataloader(self) -> DataLoader:
        # the process group exists now: every rank takes rank 0's plan, then its own share
        batches = self.trainer.strategy.broadcast(self.batches, src=0)
        self._check_same_weights()
        self._mine = batches[self.trainer.global_rank::self.trainer.world_size]
        # one grid batch per loader batch (batch_size=1 of batches): Lightning wraps it to count what it saw
        return DataLoader(GridBatches(self.dataset, self._mine), batch_size=1, shuffle=False,
                          num_workers=self.num_workers, collate_fn=_only)

    def _check_same_weights(self) -> None:
        """Every rank must score with rank 0's weights (a rank with other weights would mix two models)."""
        state = [t.detach().double().flatten() for t in self.net.state_dict().values() if t.is_floating_point()]
        flat = torch.cat(state) if state else torch.zeros(1, dtype=torch.float64)
        mine = (flat * torch.arange(1, flat.numel() + 1, device=flat.device, dtype=flat.dtype).remainder(97)).sum()
        ours = self.trainer.strategy.broadcast(float(mine), src=0)
        if not self.trainer.strategy.reduce_boolean_decision(float(mine) == ours, all=True):
            raise RuntimeError("the processes of this evaluation hold different model weights; load the same "
                               "weights in every process (the same checkpoint or weights file, or the same seed)")

    def on_predict_start(self) -> None:
        total = sum(engine_forwards(self.settings, len(b), len(self.explainers), self.device.type) for b in self._mine)
        self._bar = tqdm(total=total, desc="evaluate", unit="img", unit_scale=True, dynamic_ncols=True,
                         disable=not (self.progress and self.trainer.is_global_zero))

    def on_predict_end(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> tuple[Tensor, Evaluation]:
        x, y, images = batch  # (B, C, H, W), (B,), (B,) global indices, ascending
        first = int(images[0])
        if self._bar is not None:
            self._bar.set_postfix_str(f"images {first}-{int(images[-1]) + 1}{self._forwards}", refresh=False)
        with torch.enable_grad():  # the Trainer's no_grad does not reach the explainers' backward passes
            part = evaluate_batch(self.net, x, self.explainers, self.settings, self.perturbation, label=y,
                                  gallery_size=int((images < self.gallery_size).sum()), seed_offset=first,
                                  progress=None if self._bar is None else self._bar.update, **self.normalization)
        if part.forwards:
            self._forwards = f", {part.forwards.split(' (')[0]} forwards"
        return images.cpu(), part


class ShardWriter(BasePredictionWriter):
    """Writes every scored batch to ``folder`` as a shard, the moment it is done; at the end of the
    loop every rank waits for all others (so rank 0 merges complete results)."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(folder)
        self.written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # rank 0's folder: ranks started apart (srun) may have resolved a run folder of their own
        self.folder = Path(trainer.strategy.broadcast(str(self.folder), src=0))

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        images, part = prediction
        save_shard(self.folder, images, part, rank=trainer.global_rank)
        self.written += len(images)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("shards written")
