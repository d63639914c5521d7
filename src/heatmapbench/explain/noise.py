"""The random baseline of the paper (Sec. 3): a heatmap of seeded uniform noise."""

from __future__ import annotations

import torch
from torch import nn

from .base import Explainer


class RandomExplainer(Explainer):
    """Uniform noise in [0, 1), independent of the model: a random ordering of locations.

    Draws come from one ``torch.Generator`` seeded at construction (on the CPU, so the heatmaps
    are the same on every device); successive calls continue the stream.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(pooling="sum")
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .base import validate_inputs

        validate_inputs(x, target)
        batch, _, height, width = x.shape
        noise = torch.rand((batch, height, width), generator=self._generator, dtype=torch.float32)
        return noise.to(x.device)  # (B, H, W)
