"""``ClassifierModule``: the one LightningModule, wrapping any ``nn.Module`` classifier.

It knows nothing about explanations: callbacks and the evaluation code reach the plain
network through ``module.net``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification with accuracy, optimiser and scheduler from config.

    Parameters
    ----------
    net
        The classifier; maps ``(B, C, H, W)`` in model space to ``(B, num_classes)`` logits.
    num_classes
        Number of classes (for the accuracy metric).
    optimizer
        A partial (``_partial_: true``) taking the parameters, e.g. ``torch.optim.Adam``.
    scheduler
        Optional partial taking the optimiser; stepped per epoch and monitored on ``val/loss``.
    """

    def __init__(self, net: nn.Module, num_classes: int,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None) -> None:
        super().__init__()
        # plain data only, so checkpoints load with weights_only=True (the optimiser partials
        # are in the run's config, which RunRecord writes into the checkpoint)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str,
              metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = self.criterion(logits, y)
        metric(logits, y)
        if stage == "train":  # per-batch value for the progress bar only
            self.log("train/batch_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx):  # noqa: D102
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x).argmax(dim=1)

    def configure_optimizers(self):  # noqa: D102
        factory = self.optimizer_factory or torch.optim.Adam
        optimizer = factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch"}}
