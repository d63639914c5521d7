"""Adapter for any Captum attribution class: integrated gradients, smoothgrad and the rest."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import Explainer, check_output


class CaptumExplainer(Explainer):
    """Wrap a Captum attribution class, e.g. ``captum.attr.IntegratedGradients``.

    Parameters
    ----------
    method
        The Captum class (or its import path, ``"captum.attr.IntegratedGradients"``), or a callable
        ``forward_func -> attribution object`` (Hydra builds this from ``method: {_target_:
        captum.attr.IntegratedGradients, _partial_: true}``; with nothing else bound it is the class).
    attribute_kwargs
        Extra keyword arguments of ``.attribute`` (``n_steps``, ``baselines``, ...).
    noise_tunnel
        If given, keyword arguments of ``captum.attr.NoiseTunnel.attribute`` (``nt_type``,
        ``nt_samples``, ``stdevs``): the method is wrapped in a NoiseTunnel (smoothgrad).
    seed
        Seed of Captum's random draws (NoiseTunnel noise); the global RNG state is restored after.
    pooling
        Channel pooling of the (B, C, H, W) attribution.
    """

    name = "captum"
    fusable = True  # the Captum method gets a forward function, never the model's layers

    def __init__(
        self,
        method: Callable[..., Any] | str,
        attribute_kwargs: dict[str, Any] | None = None,
        noise_tunnel: dict[str, Any] | None = None,
        seed: int = 0,
        pooling: str = "sum",
    ) -> None:
        super().__init__(pooling=pooling)
        if isinstance(method, str):
            from hydra.utils import get_class

            method = get_class(method)
        if isinstance(method, functools.partial) and not method.args and not method.keywords:
            method = method.func  # Hydra's `_partial_: true` with nothing bound: the class itself
        if not callable(method):
            raise TypeError(f"method must be a Captum attribution class, got {method!r}.")
        self.method = method
        self.attribute_kwargs = dict(attribute_kwargs or {})
        self.noise_tunnel = dict(noise_tunnel) if noise_tunnel else None
        self.seed = int(seed)
        probe = getattr(method, "func", method)  # a functools.partial with arguments bound
        self.name = getattr(probe, "__name__", "captum")

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        checked = False

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            nonlocal checked
            output = model(inputs)  # (N, K)
            if not checked:  # the first forward sees the real batch (or a multiple of it)
                check_output(output[: target.shape[0]], target)
                checked = True
            return output

        from captum.attr import NoiseTunnel

        attributor = self.method(forward)
        kwargs = dict(self.attribute_kwargs)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            if self.noise_tunnel is not None:
                attributor = NoiseTunnel(attributor)
                kwargs.update(self.noise_tunnel)
            attribution = attributor.attribute(x, target=target, **kwargs)  # (B, C, H, W)
        return attribution.detach()
