"""Fine-tuning a pretrained classifier: head replacement, the model's preprocessing in training,
backbone freezing / learning rate, the validation split, and AOPC tracked without a validation loader."""

from __future__ import annotations

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from mlflow import MlflowClient
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from heatmapbench.metrics import names as mn
from heatmapbench.app.schema import ConfigError
from heatmapbench.data import DataNotFoundError, ImageFolderDataModule
from heatmapbench.models import ClassifierModule, SmallCNN, preprocessing_of, zoo
from heatmapbench.app.train import build_model_and_data, run_train
from tests.helpers import needs_fmnist, store_uri

NO_VAL_WARNING = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")


# -- head replacement ----------------------------------------------------------------------------
def test_lite0_head_replacement_keeps_every_backbone_weight():
    torch.manual_seed(0)
    ref = zoo.efficientnet_lite0()
    net = zoo.efficientnet_lite0(num_classes=7)
    assert zoo.head_of(net)[0] == "_fc" and net._fc.out_features == 7
    a, b = ref.state_dict(), net.state_dict()
    assert a.keys() == b.keys()
    backbone = [k for k in a if not k.startswith("_fc.")]
    assert len(backbone) > 200
    for key in backbone:
        assert torch.equal(a[key], b[key]), key
    assert b["_fc.weight"].shape == (7, 1280) and b["_fc.bias"].shape == (7,)
    # freshly initialised: not a slice of the pretrained head
    assert not torch.equal(b["_fc.weight"], a["_fc.weight"][:7])
    x = torch.randn(2, 3, 64, 64)  # a small input suffices: both nets pad alike
    with torch.no_grad():
        assert ref(x).shape == (2, 1000) and net(x).shape == (2, 7)
        # same features into the head: the new logits are the new head on the pretrained features
        feats = F.adaptive_avg_pool2d(ref.extract_features(x), 1).flatten(1)
        torch.testing.assert_close(net(x), feats @ b["_fc.weight"].T + b["_fc.bias"], rtol=1e-5, atol=1e-5)


def test_torchvision_head_replacement_and_errors(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "googlenet.pth"
    torch.save(zoo.googlenet(weights=None).state_dict(), path)
    ref = zoo.googlenet(weights_path=str(path))
    net = zoo.googlenet(weights_path=str(path), num_classes=3)
    a, b = ref.state_dict(), net.state_dict()
    for key in a:
        if not key.startswith("fc."):
            assert torch.equal(a[key], b[key]), key
    assert net.fc.weight.shape == (3, 1024)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="does not name its classification head"):
        zoo.replace_head(SmallCNN(), 3)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        zoo.efficientnet_lite0(pretrained=False, num_classes=0)


def test_lite0_at_a_small_size_pads_like_tensorflow_same():
    """Static SAME paddings built for 112 (not a multiple of 32) equal the dynamic ones computed
    per input; the 224 net's paddings on a 112 input do not (the negative control)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = zoo.efficientnet_lite0(image_size=112)
    assert preprocessing_of(net) == zoo.Preprocessing((127.0,) * 3, (128.0,) * 3, (0.0, 255.0), 112, 128)
    dynamic = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    dynamic.load_state_dict(net.state_dict())
    dynamic.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(net(x), dynamic(x), rtol=0, atol=0)
        assert not torch.allclose(zoo.efficientnet_lite0()(x), dynamic(x), atol=1e-3)


# -- backbone freezing and learning rate -------------------------------------------------------------
def _tiny_zoo_like_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    net.head_name = "5"
    return net


@NO_VAL_WARNING
def test_frozen_backbone_trains_only_the_head_then_everything(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(_tiny_zoo_like_net(), num_classes=3, freeze_backbone_epochs=1,
                              backbone_lr_factor=0.1, optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))), batch_size=8)
    states = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            states.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot()],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    (group_head, group_backbone) = trainer.optimizers[0].param_groups
    assert group_head["lr"] == 0.5 and group_backbone["lr"] == pytest.approx(0.05)
    epoch1, epoch2 = states
    for key in before:  # epoch 1: the backbone, BatchNorm statistics included, is untouched
        if key.startswith("5."):
            assert not torch.equal(before[key], epoch1[key]), key
        else:
            assert torch.equal(before[key], epoch1[key]), key
    for key in ("0.weight", "1.weight", "1.running_mean", "1.num_batches_tracked"):  # epoch 2: trained
        assert not torch.equal(epoch1[key], epoch2[key]), key
    assert all(p.requires_grad for p in module.parameters())


def test_backbone_options_need_a_named_head():
    with pytest.raises(ValueError, match="names none"):
        ClassifierModule(SmallCNN(), num_classes=10, freeze_backbone_epochs=1)
    with pytest.raises(ValueError, match="names none"):
        ClassifierModule(SmallCNN(), num_classes=10, backbone_bn="eval")
    with pytest.raises(ValueError, match=r"backbone_lr_factor=0.0 is invalid: must be > 0"):
        ClassifierModule(_tiny_zoo_like_net(), num_classes=3, backbone_lr_factor=0.0)
    with pytest.raises(ValueError, match="^backbone_bn='off' is invalid: choose train"):
        ClassifierModule(_tiny_zoo_like_net(), num_classes=3, backbone_bn="off")
    # the library names its argument; the command names the config key that set it
    from omegaconf import OmegaConf

    from heatmapbench.app.plumbing import instantiate_model

    node = OmegaConf.create({"_target_": "heatmapbench.models.ClassifierModule", "num_classes": 3,
                             "net": {"_target_": "heatmapbench.models.SmallCNN"}, "backbone_lr_factor": -1.0})
    with pytest.raises(ConfigError, match=r"^model.backbone_lr_factor=-1.0 is invalid: must be > 0"):
        instantiate_model(node)


def _bn_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    net.head_name = "6"
    # pretrained-looking statistics and affine parameters, far from what the data give
    net[1].running_mean.fill_(-0.2)
    net[1].running_var.fill_(2.0)
    nn.init.uniform_(net[1].weight, 0.5, 1.5)
    nn.init.uniform_(net[1].bias, 0.1, 0.5)
    return net.eval()  # as the zoo builds it


@NO_VAL_WARNING
@pytest.mark.filterwarnings("ignore:Found 1 module\\(s\\) in eval mode")
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
def test_backbone_batchnorm_modes(tmp_path, mode):
    """eval/frozen: the running statistics stay bit-identical through training and validation, BatchNorm
    normalises with them in training (eval mode) while dropout trains; frozen also keeps γ/β. train: the
    statistics are re-estimated (the negative control). The module's own train()/eval() still switch modes."""
    pl.seed_everything(0, verbose=False)
    net = _bn_net()
    module = ClassifierModule(net, num_classes=3, freeze_backbone_epochs=1, backbone_bn=mode,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))), batch_size=8)
    seen = []

    class Modes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, net[1].training, net[3].training, net[1].weight.requires_grad))

        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.net.train()  # a careless callback: the next epoch must still keep the statistics

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Modes()],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, data, data)  # validation after each epoch: Lightning restores the modes it found
    after = net.state_dict()
    kept = ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    affine = ("1.weight", "1.bias")
    trained = ("0.weight", "6.weight")
    for key in trained:
        assert not torch.equal(before[key], after[key]), key
    for key in kept:
        assert torch.equal(before[key], after[key]) == (mode != "train"), key
    for key in affine:
        assert torch.equal(before[key], after[key]) == (mode == "frozen"), key
    # epoch 1 (backbone frozen): BatchNorm in eval mode, no γ/β gradients, in every mode
    assert {s[1:] for s in seen if s[0] == 0} == {(False, True, False)}
    # epochs 2 and 3, after a validation: BatchNorm trains only under "train"; dropout trains; γ/β per the option
    for epoch in (1, 2):
        assert {s[1:] for s in seen if s[0] == epoch} == {(mode == "train", True, mode != "frozen")}
    module.eval()
    assert not any(m.training for m in module.modules())
    module.train()
    assert net[3].training and net[1].training == (mode == "train")


def test_callback_accuracy_gives_every_module_its_own_mode_back():
    """The AOPC callback's held-out accuracy (epochs Lightning did not validate) runs in eval mode and
    restores each module's mode, not ``net.train()`` (which would wake a kept BatchNorm)."""
    from types import SimpleNamespace

    from heatmapbench.callbacks import AOPCCallback

    net = _bn_net().train()
    net[1].eval()  # as ClassifierModule keeps it under backbone_bn=eval
    xs, ys = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    with torch.no_grad():
        expected = (net.eval()(xs).argmax(1) == ys).float().mean().item()
    net.train()
    net[1].eval()
    dm = SimpleNamespace(has_validation=lambda: True, val_dataloader=lambda: DataLoader(TensorDataset(xs, ys),
                                                                                           batch_size=4))
    callback = AOPCCallback.__new__(AOPCCallback)
    callback._device = torch.device("cpu")
    accuracy = callback._held_out_accuracy(SimpleNamespace(datamodule=dm, limit_val_batches=1.0), net)
    assert accuracy == pytest.approx(expected)  # eval mode: dropout off, the kept statistics
    assert [m.training for m in net] == [True, False, True, True, True, True, True]


# -- training takes the model's preprocessing and sizes the head -------------------------------------
@needs_fmnist
def test_training_data_take_the_pretrained_models_preprocessing(train_cfg):
    cfg = train_cfg("experiment=finetune_lite0", "model.net.image_size=96", "data.eval_subset_size=4")
    model, dm, notes = build_model_and_data(cfg)
    pre = preprocessing_of(model)
    assert pre == zoo.Preprocessing((127.0,) * 3, (128.0,) * 3, (0.0, 255.0), 96, 110, 3)
    assert (dm.mean, dm.std, dm.value_range, dm.image_size, dm.in_channels) == (
        pre.mean, pre.std, pre.value_range, 96, 3)
    assert cfg.data.resize == 110 and list(cfg.data.mean) == [127.0] * 3  # the logged config says so
    assert "px in [0, 255]" in notes["preprocessing"]
    assert model.num_classes == 10 and model.net._fc.out_features == 10 and "1000 → 10" in notes["head"]
    # model-space inputs against an independent computation from the raw 8-bit images
    dm.setup("test")
    x = torch.stack([dm.test_set[i][0] for i in range(4)])
    assert x.shape == (4, 3, 96, 96)
    images = torchvision.datasets.FashionMNIST(cfg.paths.data_dir, train=False).data[:4]  # (4, 28, 28) uint8
    up = F.interpolate(images[:, None].double() / 255, size=(110, 110), mode="bilinear",
                       align_corners=False, antialias=True)[..., 7:103, 7:103]  # the centre 96 of 110
    expected = ((up * 255 - 127) / 128).expand(-1, 3, -1, -1)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-4)


@needs_fmnist
def test_keeping_a_mismatched_head_fails_before_any_work(train_cfg):
    cfg = train_cfg("model=efficientnet_lite0", "head=keep")
    with pytest.raises(ConfigError, match="head=keep: the model's head has 1000 outputs .* the data have 10"):
        build_model_and_data(cfg)
    with pytest.raises(ConfigError, match="head='nope' is invalid"):
        build_model_and_data(train_cfg("head=nope"))


# -- validation split --------------------------------------------------------------------------------
def _folder(root, classes, per_class):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_validation_is_carved_from_training_seeded_and_disjoint(tmp_path):
    train = _folder(tmp_path / "train", ["a", "b"], 10)
    test = _folder(tmp_path / "test", ["a", "b"], 3)
    dm = ImageFolderDataModule(str(test), train_path=str(train), image_size=8, resize=8, seed=1)
    assert dm.num_classes == 2  # known before setup (the head is sized from it)
    dm.setup("fit")
    assert dm.has_validation() and (len(dm.train_set), len(dm.val_set)) == (16, 4)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    again = ImageFolderDataModule(str(test), train_path=str(train), image_size=8, resize=8, seed=1)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices
    other = _folder(tmp_path / "val", ["a", "c"], 2)
    with pytest.raises(DataNotFoundError, match="different class folders \\(b, c in one only\\)"):
        ImageFolderDataModule(str(test), train_path=str(train), val_path=str(other))
    val = _folder(tmp_path / "val2", ["a", "b"], 2)
    separate = ImageFolderDataModule(str(test), train_path=str(train), val_path=str(val), image_size=8, resize=8)
    separate.setup("fit")
    assert (len(separate.train_set), len(separate.val_set)) == (20, 4)


# -- the AOPC callback without a validation loader ---------------------------------------------------
def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@needs_fmnist
@pytest.mark.slow
def test_callback_runs_every_epoch_without_validation_and_never_reports_accuracy_zero(train_cfg, capsys):
    cfg = train_cfg("trainer.max_epochs=2", "data.val_size=0", "callbacks.model_checkpoint=null",
                    "trainer.limit_train_batches=3", "data.eval_subset_size=6", "evaluation.steps=4",
                    "evaluation.random_repeats=1", "evaluation.explainers=[random,sensitivity_l2]",
                    "callbacks.aopc.artifacts=false", "logger.experiment_name=t-noval")
    result = run_train(cfg)
    client = MlflowClient(store_uri(cfg))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for key in (mn.explainer_metric(mn.AOPC, "sensitivity_l2"), mn.explainer_metric(mn.AOPC_REL, "sensitivity_l2"),
                mn.SECONDS):
        steps = _steps(client, run.info.run_id, key)  # one evaluation before training and one per epoch
        assert len(steps) == 3 and steps[0] == 0 and steps == sorted(set(steps)), (key, steps)
    assert mn.ACCURACY not in run.data.metrics and "val/acc" not in run.data.metrics
    out = capsys.readouterr().out
    table = out.split("per epoch; accuracy = validation accuracy")[1].split("== correlation")[0]
    assert table.count("not measured") == 3  # the accuracy of epochs 0, 1, 2
    assert "accuracy not measured" in out


@needs_fmnist
@pytest.mark.slow
def test_callback_measures_held_out_accuracy_on_epochs_without_validation(train_cfg):
    """Validation every 2nd epoch: the callback still scores every epoch, and measures the held-out
    accuracy itself where Lightning did not; where it did, the two agree."""
    cfg = train_cfg("trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2", "data.val_size=200",
                    "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "data.eval_subset_size=6",
                    "evaluation.steps=4", "evaluation.random_repeats=1", "evaluation.explainers=[random]",
                    "callbacks.aopc.artifacts=false", "logger.experiment_name=t-every-other")
    result = run_train(cfg)
    client = MlflowClient(store_uri(cfg))
    run_id = result["run_id"]
    acc = {m.step: m.value for m in client.get_metric_history(run_id, mn.ACCURACY)}
    assert len(acc) == 3 and all(0 < v <= 1 for v in acc.values())
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val/acc")}  # before training, then epoch 2
    assert sorted(val) == [0, max(acc)] and acc[max(acc)] == pytest.approx(val[max(acc)]) and acc[0] == val[0]
    assert not any(math.isnan(v) for v in acc.values())


# -- bad optimiser overrides and checkpoints of another width, before any run ------------------------
@needs_fmnist
@pytest.mark.parametrize("override, message", [
    ("model.optimizer.lr=-0.1", r"^model.optimizer / model.scheduler cannot be built: Invalid learning rate: -0.1;"),
    ("+model.optimizer.nesterov_typo=true",
     r"^model.optimizer / model.scheduler cannot be built: .*unexpected keyword argument 'nesterov_typo'"),
    ("model.optimizer._target_=torch.optim.Adamm",
     r"^model.optimizer._target_='torch.optim.Adamm' is invalid: no such class or function"),
])
def test_a_bad_optimizer_fails_in_one_line_before_any_run(train_cfg, override, message):
    from tests.helpers import no_runs

    cfg = train_cfg(override)
    with pytest.raises(ConfigError, match=message) as err:
        run_train(cfg)
    assert "\n" not in str(err.value)
    assert no_runs(cfg)


@needs_fmnist
def test_a_checkpoint_of_another_width_gets_a_fresh_head_or_a_clear_error(tmp_path, train_cfg):
    from heatmapbench.models.checkpoints import CheckpointError

    torch.manual_seed(0)
    trained = SmallCNN(num_classes=2).state_dict()  # a 2-class run's weights, as heatmapbench-train saves them
    path = tmp_path / "two.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.items()}}, path)
    torch.manual_seed(1)
    fresh = SmallCNN(num_classes=10)
    built = {k: v.clone() for k, v in fresh.state_dict().items()}
    net = zoo.from_checkpoint(str(path), fresh, adapt_head=True)
    assert net.adapted_head == (2, 10)
    for key, value in net.state_dict().items():  # the head as freshly built, everything else the checkpoint's
        assert torch.equal(value, built[key] if key.startswith("10.") else trained[key]), key
    assert sum(k.startswith("10.") for k in built) == 2 and len(built) == 8
    with pytest.raises(CheckpointError, match=r"has a 2-way head but the net is built with num_classes=10: fine-tune a "
                                              r"fresh 10-way head on the checkpoint's other weights \(adapt_head=True\)"):
        zoo.from_checkpoint(str(path), SmallCNN(num_classes=10))
    # through heatmapbench-train's config: head=adapt (default) replaces, head=keep refuses
    model, _, notes = build_model_and_data(train_cfg("model=checkpoint", f"model.net.ckpt_path={path}"))
    assert model.net[10].out_features == 10
    assert "the checkpoint's 2-way head replaced by a fresh 10-way one" in notes["head"]
    with pytest.raises(CheckpointError, match=r"^model.net.ckpt_path=\S+two.ckpt has a 2-way head but the net is built "
                                              r"with model.num_classes=10: .* \(heatmapbench-train head=adapt\)"):
        build_model_and_data(train_cfg("model=checkpoint", f"model.net.ckpt_path={path}", "head=keep"))
