"""The model builders' errors name their own arguments; the commands read them naming the config keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from heatmapbench.errors import ArgumentError
from heatmapbench.models import SmallCNN, VGGSmall, zoo
from heatmapbench.models.checkpoints import training_checkpoint


def _checkpoint(path: Path, net: torch.nn.Module) -> str:
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return str(path)


def _model_errors(tmp_path: Path) -> dict[str, tuple[Callable[[], object], dict[str, str]]]:
    """A model built wrongly in one way each: what raises, and how the library and the commands spell
    each argument its message names (the commands: the ``model.net`` node, which the model configs build)."""
    ten = _checkpoint(tmp_path / "ten.ckpt", SmallCNN(num_classes=10))
    nowhere, weights = tmp_path / "none.ckpt", tmp_path / "w.pth"
    return {
        "no torchvision weights": (
            lambda: zoo.alexnet(), {"pass allow_download=True": "pass model.net.allow_download=true",
                                    "pass weights_path='/path/to/state_dict.pth'":
                                        "pass model.net.weights_path=/path/to/state_dict.pth",
                                    "or weights=None for": "or model.net.weights=null for"}),
        "no file at weights_path": (lambda: zoo.alexnet(weights_path=str(weights)),
                                    {"(weights_path)": "(model.net.weights_path)"}),
        "random init with a weights file": (
            lambda: zoo.alexnet(weights=None, weights_path=str(weights)),
            {f"weights=None (random init) contradicts weights_path='{weights}'":
             f"model.net.weights=null (random init) contradicts model.net.weights_path={weights}"}),
        "lite0 random init with a weights file": (
            lambda: zoo.efficientnet_lite0(pretrained=False, weights_path=str(weights)),
            {f"pretrained=False contradicts weights_path='{weights}'":
             f"model.net.pretrained=false contradicts model.net.weights_path={weights}"}),
        "no checkpoint file": (lambda: zoo.from_checkpoint(str(nowhere), SmallCNN()),
                               {"(ckpt_path)": "(model.net.ckpt_path)"}),
        "checkpoint head of another width": (
            lambda: zoo.from_checkpoint(ten, SmallCNN(num_classes=3)),
            {f"ckpt_path='{ten}' has a 10-way head": f"model.net.ckpt_path={ten} has a 10-way head",
             "built with num_classes=3": "built with model.num_classes=3",
             "(adapt_head=True)": "(heatmapbench-train head=adapt)"}),
        "checkpoint of another network": (
            lambda: zoo.from_checkpoint(ten, VGGSmall()),
            {f"checkpoint ckpt_path='{ten}'": f"checkpoint model.net.ckpt_path={ten}", "fit net (": "fit model.net.net ("}),
    }


CASES = ["no torchvision weights", "no file at weights_path", "random init with a weights file",
         "lite0 random init with a weights file", "no checkpoint file", "checkpoint head of another width",
         "checkpoint of another network"]


@pytest.mark.parametrize("case", CASES)
def test_model_errors_name_arguments_and_the_commands_name_model_keys(tmp_path, monkeypatch, case):
    """The library's message names the builder's arguments, never a config key; a command that built the
    ``model.net`` node reads the same message with its keys (and ``model.num_classes``, ``head=adapt``
    where the configs set the argument from those), nothing else changed."""
    from heatmapbench.app.plumbing import as_config_keys

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_hub"))  # no cached torchvision weights
    make, spelled = _model_errors(tmp_path)[case]
    with pytest.raises(ArgumentError) as lib:
        make()
    text = str(lib.value)
    assert all(python in text for python in spelled) and not re.search(r"\bmodel\.[a-z]|\bhead=", text), text
    expected = text
    for python, key in spelled.items():
        expected = expected.replace(python, key)
    cli = as_config_keys(lib.value, "model.net")
    assert type(cli) is type(lib.value) and str(cli) == expected != text


def test_a_checkpoint_given_to_the_commands_as_ckpt_path_names_that_key(tmp_path):
    """evaluate and roar load ``ckpt_path`` (a root key) into the model's net: their errors say ``ckpt_path``
    and ``model``, not the ``model.net`` keys of ``model=checkpoint`` (which the root key does not set)."""
    from heatmapbench.app.plumbing import CHECKPOINT_KEYS, config_keys

    ten = _checkpoint(tmp_path / "ten.ckpt", SmallCNN(num_classes=10))
    with pytest.raises(ArgumentError, match=r"^checkpoint: no file at \S+ \(ckpt_path\); point it at"), \
            config_keys("model.net", **CHECKPOINT_KEYS):
        zoo.from_checkpoint(str(tmp_path / "none.ckpt"), SmallCNN())
    with pytest.raises(ArgumentError, match=rf"^checkpoint ckpt_path={re.escape(ten)}: its weights do not fit model "
                                            r"\(VGGSmall\), which must be"), config_keys("model.net", **CHECKPOINT_KEYS):
        zoo.from_checkpoint(ten, VGGSmall())
    with pytest.raises(ArgumentError, match=r"^ckpt_path='\S+ten.ckpt' cannot resume training: it has no "):
        training_checkpoint(ten)  # the library's argument is the train command's root key: read as it is
