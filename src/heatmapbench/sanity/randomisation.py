"""Which layers the model-randomisation test re-initialises, and copies of the model with them re-initialised.

Adebayo et al. (NeurIPS 2018), Sec. 3.1: *cascading* randomisation re-initialises the weights
from the output layer down, one more layer at each step, until the whole network is random;
*independent* randomisation re-initialises one layer at a time, the others trained.

A *layer* is a module with ``reset_parameters`` and tensors of its own (Conv, Linear, BatchNorm,
LayerNorm, Embedding, ...), in ``model.named_modules()`` order (the order of definition, which
for ``nn.Sequential`` and the torchvision and timm networks is the forward order), as in Quantus
0.6 (``PyTorchModel.get_random_layer_generator``). Re-initialising is the module's own
``reset_parameters`` (PyTorch's default initialisation; BatchNorm: running statistics 0/1,
affine 1/0) with the global generator seeded to ``seed`` before every layer — Quantus' scheme,
so a layer gets the same weights in every step and both modes — inside ``torch.random.fork_rng``
so the caller's random state is untouched.

The user's model is never modified: every step works on a ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MODES", "RandomisationStep", "randomisable_layers", "schedule", "randomised_copy"]

#: The two randomisations of Adebayo et al.
MODES = ("cascading", "independent")


@dataclass(frozen=True)
class RandomisationStep:
    """One randomised model of the schedule.

    Attributes
    ----------
    label
        The layer this step adds (cascading: the lowest layer randomised so far) or randomises alone.
    layers
        Every layer whose parameters are re-initialised in this step's model.
    """

    label: str
    layers: tuple[str, ...]


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules the test can re-initialise, input side first."""
    names = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if callable(getattr(module, "reset_parameters", None)) and own:
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no module with reset_parameters and parameters: "
                         "nothing the randomisation test could re-initialise")
    return names


def _thin(indices: list[int], max_steps: int | None) -> list[int]:
    """At most ``max_steps`` evenly spaced entries of ``indices``, its first and last always among them."""
    if max_steps is None or len(indices) <= max_steps:
        return indices
    if max_steps < 2:
        raise ValueError(f"max_steps must be >= 2 (the first and the last layer) or null, got {max_steps}")
    picks = torch.linspace(0, len(indices) - 1, max_steps).round().long().unique().tolist()
    return [indices[i] for i in picks]


def schedule(model: nn.Module, mode: str = "cascading", max_steps: int | None = None,
             layers: list[str] | None = None) -> list[RandomisationStep]:
    """The randomisation steps of ``model``, output layer first.

    Parameters
    ----------
    mode
        ``cascading`` (step k re-initialises the top k layers) or ``independent`` (one layer each).
    max_steps
        Keep only this many evenly spaced steps (always the output layer's and the last one: the
        whole network for cascading); ``None``: one step per layer. A kept cascading step still
        re-initialises every layer above it.
    layers
        The layer names to use instead of :func:`randomisable_layers` (in model order).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: choose one of {', '.join(MODES)}")
    all_layers = randomisable_layers(model) if layers is None else list(layers)
    known = dict(model.named_modules())
    unknown = [n for n in all_layers if n not in known]
    if unknown:
        raise ValueError(f"layers {unknown} are not modules of {type(model).__name__}")
    top_down = all_layers[::-1]
    kept = _thin(list(range(len(top_down))), max_steps)
    if mode == "cascading":
        return [RandomisationStep(top_down[k], tuple(top_down[:k + 1])) for k in kept]
    return [RandomisationStep(top_down[k], (top_down[k],)) for k in kept]


def randomised_copy(model: nn.Module, layers: tuple[str, ...] | list[str], seed: int = 42) -> nn.Module:
    """A deep copy of ``model`` with ``layers`` re-initialised (each after seeding with ``seed``); ``model`` is untouched."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    devices = sorted({p.device.index for p in clone.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for name in layers:
            torch.manual_seed(seed)
            modules[name].reset_parameters()
    return clone
