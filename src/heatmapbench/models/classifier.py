"""``ClassifierModule``: the one LightningModule, wrapping any ``nn.Module`` classifier.

It knows nothing about explanations: callbacks and the evaluation code reach the plain
network through ``module.net``.

Fine-tuning a zoo network (whose head is named, ``heatmapbench.models.zoo.head_of``): the
backbone (everything but the head) can be frozen for the first epochs and trained with a
smaller learning rate afterwards, the usual recipe for a pretrained net on new classes.
Its BatchNorm layers can keep the pretrained running statistics throughout (``backbone_bn``):
in train mode they normalise each batch with the batch's own statistics while evaluation
uses running statistics that move slowly (Lite0's momentum is 0.01), so training and
evaluation see different features right after unfreezing.
"""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from heatmapbench.models.zoo import head_of

#: What ``backbone_bn`` may be: how the backbone's BatchNorm layers train once it is unfrozen.
BACKBONE_BN = ("train", "eval", "frozen")
#: The fine-tuning arguments: they need a network whose head is named (a pretrained zoo, timm or Hugging Face net).
FINE_TUNING = ("freeze_backbone_epochs", "backbone_lr_factor", "backbone_bn")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification with accuracy, optimiser and scheduler from config.

    Parameters
    ----------
    net
        The classifier; maps ``(B, C, H, W)`` in model space to ``(B, num_classes)`` logits.
    num_classes
        Number of classes (for the accuracy metric); ``None``: the net's own ``num_classes``
        (timm and Hugging Face models, whose pretrained width the config leaves open).
    optimizer
        A partial (``_partial_: true``) taking the parameters, e.g. ``torch.optim.Adam``.
    scheduler
        Optional partial taking the optimiser; stepped per epoch and monitored on ``val/loss``.
    freeze_backbone_epochs
        Train only the head for this many epochs: the backbone's parameters get no gradient
        and its BatchNorm layers keep their running statistics (eval mode).
    backbone_lr_factor
        The backbone's learning rate is the optimiser's ``lr`` times this (the head gets ``lr``).
    backbone_bn
        The backbone's BatchNorm layers while it trains: ``train`` (batch statistics, running
        statistics re-estimated, affine parameters trained), ``eval`` (kept in eval mode: the
        pretrained running statistics normalise in training as in evaluation, affine parameters
        trained) or ``frozen`` (``eval`` and the affine parameters not trained either).

    Raises
    ------
    ValueError
        A backbone option is set but ``net`` does not name its head, or a value is out of range.
    """

    def __init__(self, net: nn.Module, num_classes: int | None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None,
                 freeze_backbone_epochs: int = 0, backbone_lr_factor: float = 1.0,
                 backbone_bn: str = "train") -> None:
        super().__init__()
        if not isinstance(freeze_backbone_epochs, int) or freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs={freeze_backbone_epochs!r} is invalid: must be an integer >= 0")
        if not backbone_lr_factor > 0:
            raise ValueError(f"backbone_lr_factor={backbone_lr_factor!r} is invalid: must be > 0 (freeze with "
                             "freeze_backbone_epochs instead)")
        if backbone_bn not in BACKBONE_BN:
            raise ValueError(f"backbone_bn={backbone_bn!r} is invalid: choose train (BatchNorm statistics "
                             "re-estimated), eval (pretrained statistics kept) or frozen (statistics and affine "
                             "parameters kept)")
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError(f"num_classes is null but {type(net).__name__} does not say its number of "
                                 "outputs (net.num_classes); set num_classes=<classes>")
        head = head_of(net)
        if head is None and (freeze_backbone_epochs or backbone_lr_factor != 1.0 or backbone_bn != "train"):
            raise ValueError(f"{' / '.join(FINE_TUNING)} need a "
                             f"network whose head is known (a zoo model); {type(net).__name__} names none")
        # plain data only, so checkpoints load with weights_only=True (the optimiser partials
        # are in the run's config, which RunRecord writes into the checkpoint)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.backbone_lr_factor = float(backbone_lr_factor)
        self.backbone_bn = backbone_bn
        self._head_prefix = None if head is None else head[0] + "."
        self._frozen = False
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- fine-tuning ------------------------------------------------------------------------
    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(head, backbone)`` parameters of the net; all are head when the net names no head."""
        if self._head_prefix is None:
            return list(self.net.parameters()), []
        head, backbone = [], []
        for name, param in self.net.named_parameters():
            (head if name.startswith(self._head_prefix) else backbone).append(param)
        return head, backbone

    def _backbone_modules(self) -> list[nn.Module]:
        assert self._head_prefix is not None
        head = self._head_prefix[:-1]
        return [m for name, m in self.net.named_modules()
                if name and name != head and not name.startswith(self._head_prefix)]

    def _backbone_norms(self) -> list[nn.Module]:
        return [m for m in self._backbone_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def freeze_backbone(self, frozen: bool) -> None:
        """Stop (or restart) training the backbone: no gradients, BatchNorm statistics fixed.

        Restarted, its BatchNorm affine parameters stay fixed under ``backbone_bn="frozen"``.
        """
        _, backbone = self.parameter_groups()
        for param in backbone:
            param.requires_grad_(not frozen)
        if not frozen and self.backbone_bn == "frozen":
            for module in self._backbone_norms():
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
        self._frozen = frozen
        if self._head_prefix is not None:
            self.train(self.training)  # re-applies the BatchNorm modes

    def train(self, mode: bool = True):  # noqa: D102
        super().train(mode)
        # Lightning switches to train() each epoch (and after validating): backbone BatchNorm
        # layers whose statistics are kept stay in eval mode
        if mode and (getattr(self, "_frozen", False) or getattr(self, "backbone_bn", "train") != "train"):
            for module in self._backbone_norms():
                module.eval()
        return self

    def on_fit_start(self) -> None:  # noqa: D102
        # zoo builders return their net in eval mode (for evaluation); Lightning keeps the
        # modes it finds, so without this a pretrained net would train with BatchNorm frozen
        # and dropout off
        if self._head_prefix is not None:
            self.freeze_backbone(self._frozen)  # backbone_bn="frozen": affine parameters fixed from the start
        self.train()

    def on_train_epoch_start(self) -> None:  # noqa: D102
        frozen = self.current_epoch < self.freeze_backbone_epochs
        if frozen != self._frozen:
            self.freeze_backbone(frozen)
        elif self.training:
            self.train()  # BatchNorm modes again, should a callback have called net.train() since

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
        head, backbone = self.parameter_groups()
        if not backbone:
            optimizer = factory(params=self.parameters())
        else:
            optimizer = factory(params=[{"params": head}, {"params": backbone}])
            optimizer.param_groups[1]["lr"] = optimizer.defaults["lr"] * self.backbone_lr_factor
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch"}}
