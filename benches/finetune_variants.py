"""Validation accuracy per epoch of one ``experiment=finetune_lite0`` variant (no AOPC, no MLflow run).

    python benches/finetune_variants.py model.backbone_bn=train            # one variant per call
    python benches/finetune_variants.py --extra model.backbone_bn=train    # + BatchNorm diagnostics

Prints, before training and after every epoch, the validation accuracy as Lightning measures it
(eval mode: BatchNorm normalises with its running statistics). ``--extra`` adds two readings of
the same weights: BatchNorm statistics re-estimated on 640 training images (cumulative average)
and BatchNorm with batch statistics (train mode), plus the relative drift of the running means
from the pretrained ones. Where the re-estimated statistics recover accuracy that eval mode
lost, evaluation normalises with statistics that training did not use. The load average is
printed beside every time (the machine may be shared).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import heatmapbench.app.schema  # noqa: F401  (registers the schemas)
from heatmapbench.perturbation.engine import eval_mode
from heatmapbench.registry import conf_dir
from heatmapbench.app.train import build_model_and_data

BASE = ["experiment=finetune_lite0", "~callbacks.aopc", "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def accuracy(net: nn.Module, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def reestimated(net: nn.Module, images, batches: int = 10, batch_size: int = 64) -> nn.Module:
    """A copy of ``net`` whose BatchNorm statistics are the cumulative average over the first
    ``batches`` batches of ``images`` (unshuffled: training's random draws must not notice)."""
    net = copy.deepcopy(net).train()
    for m in norms(net):
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for i, (x, _) in enumerate(torch.utils.data.DataLoader(images, batch_size=batch_size)):
            if i == batches:
                break
            net(x)
    return net.eval()


def with_batch_statistics(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net).eval()
    for m in norms(net):
        m.train()
    return net


class Report(pl.Callback):
    def __init__(self, dm, extra: bool) -> None:
        self.dm, self.extra, self.t0, self.ref = dm, extra, time.perf_counter(), None

    def report(self, module: pl.LightningModule, label: str) -> None:
        net = module.net
        with eval_mode(net):  # each module's own mode back afterwards (not net.train())
            val = self.dm.val_dataloader()
            line = f"{label}: val acc {accuracy(net, val):.3f}"
            if self.extra:
                drift = sum(float((m.running_mean - r).norm()) for m, r in zip(norms(net), self.ref))
                line += (f" | BN statistics re-estimated {accuracy(reestimated(net, self.dm.train_set), val):.3f}"
                         f" | batch statistics {accuracy(with_batch_statistics(net), val):.3f}"
                         f" | running-mean drift {drift / sum(float(r.norm()) for r in self.ref):.3f}")
        print(f"{line} | {time.perf_counter() - self.t0:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.ref = [m.running_mean.clone() for m in norms(pl_module.net)]
        self.report(pl_module, "epoch 0")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.report(pl_module, f"epoch {trainer.current_epoch + 1}")


def main(argv: list[str]) -> None:
    extra = "--extra" in argv
    overrides = [a for a in argv if a != "--extra"]
    torch.set_num_threads(2)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=BASE + overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, dm, _ = build_model_and_data(cfg)
    dm.prepare_data()
    print(f"variant: {' '.join(overrides) or 'the recipe as shipped'}", flush=True)
    trainer = instantiate(cfg.trainer, callbacks=[Report(dm, extra)], logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)


if __name__ == "__main__":
    main(sys.argv[1:])
