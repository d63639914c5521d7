"""Reversible model rewrites (canonizers) that make LRP rules applicable to real architectures.

Zennit's canonizers are used where they are right; this module adds what Zennit 0.5.1 lacks:

* :class:`ExactMergeBatchNorm` folds every BatchNorm into the linear layer before it, also when
  that layer is not a leaf module (EfficientNet-Lite's ``Conv2dStaticSamePadding`` owns a padding
  child, so Zennit's leaf-based ``SequentialMergeBatchNorm`` finds none of its pairs), and it
  leaves the emptied BatchNorm an exact identity (Zennit 0.5.1 sets ``running_var = 1``, so the
  BatchNorm still divides by ``sqrt(1 + eps)`` and the model's output drifts by about
  ``eps / 2`` per layer — 5e-4 per layer at EfficientNet's ``eps = 1e-3``).
* :class:`MBConvSumCanonizer` routes the functional residual ``x + inputs`` of EfficientNet's
  ``MBConvBlock`` through a Zennit ``Sum`` module, so that a rule sees it (without it the full
  relevance is sent down both branches and conservation breaks silently).

Every canonizer restores the model exactly on ``remove()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from zennit.canonizers import AttributeCanonizer, Canonizer, MergeBatchNorm
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm, ConvolutionTranspose, Linear

try:  # optional: the pretrained EfficientNet-Lite0 of the ``zoo`` extra
    from efficientnet_lite_pytorch.model import MBConvBlock
except ImportError:  # pragma: no cover - the extra is not installed
    MBConvBlock = None


def layer_leaves(module: nn.Module) -> Iterator[nn.Module]:
    """Modules in registration (pre-)order, treating linear and BatchNorm modules as leaves.

    Registration order is the forward order in VGG, AlexNet, ResNet and EfficientNet; a
    BatchNorm registered right after a linear layer is taken to normalise that layer's output.
    """
    children = list(module.children())
    if not children or isinstance(module, (Linear, BatchNorm)):
        yield module
        return
    for child in children:
        yield from layer_leaves(child)


class ExactMergeBatchNorm(MergeBatchNorm):
    """Fold each BatchNorm into the linear layer registered right before it; exact and reversible."""

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        instances = []
        last = None
        for leaf in layer_leaves(root_module):
            if isinstance(last, Linear) and isinstance(leaf, BatchNorm) and not leaf.training:
                instance = self.copy()
                instance.register((last,), leaf)
                instances.append(instance)
            last = leaf
        return instances

    @staticmethod
    def merge_batch_norm(modules, batch_norm) -> None:  # noqa: D102 - same contract as Zennit's
        # y = (z - mean) / sqrt(var + eps) * gamma + beta, folded into z = W x + b
        denominator = (batch_norm.running_var + batch_norm.eps) ** 0.5
        scale = batch_norm.weight / denominator
        for module in modules:
            weight = module.weight.data
            if module.bias is None:
                module.bias = nn.Parameter(
                    torch.zeros(weight.shape[1 if isinstance(module, ConvolutionTranspose) else 0],
                                device=weight.device, dtype=weight.dtype),
                    requires_grad=False,
                )
            bias = module.bias.data
            if isinstance(module, ConvolutionTranspose):
                index = (None, slice(None), *((None,) * (weight.ndim - 2)))
            else:
                index = (slice(None), *((None,) * (weight.ndim - 1)))
            module.weight.data = weight * scale[index]
            module.bias.data = (bias - batch_norm.running_mean) * scale + batch_norm.bias
        # the emptied BatchNorm must compute the identity: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0
        batch_norm.running_mean.data = torch.zeros_like(batch_norm.running_mean.data)
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)
        batch_norm.bias.data = torch.zeros_like(batch_norm.bias.data)
        batch_norm.weight.data = torch.ones_like(batch_norm.weight.data)


def _mbconv_forward(self, inputs: torch.Tensor, drop_connect_rate=None) -> torch.Tensor:
    """EfficientNet(-Lite) ``MBConvBlock.forward`` (eval mode) with the skip add as a ``Sum`` module."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    if self.has_se:
        # the squeeze-excitation gate is a multiplicative weight: relevance flows through x only
        squeezed = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        squeezed = self._se_expand(self._swish(self._se_reduce(squeezed)))
        x = torch.sigmoid(squeezed).detach() * x
    x = self._bn2(self._project_conv(x))
    args = self._block_args
    if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))  # (B, C, H, W, 2) -> (B, C, H, W)
    return x


class MBConvSumCanonizer(AttributeCanonizer):
    """Make the residual add of EfficientNet's ``MBConvBlock`` visible to LRP as a ``Sum`` module."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name: str, module: nn.Module):
        if MBConvBlock is not None and isinstance(module, MBConvBlock):
            return {"forward": _mbconv_forward.__get__(module), "canonizer_sum": Sum()}
        return None

    def copy(self) -> MBConvSumCanonizer:
        return MBConvSumCanonizer()


def default_canonizers() -> list[Canonizer]:
    """Canonizers for every architecture heatmapbench supports (each applies only where it matches).

    BatchNorm folding (VGG-BN, ResNet, EfficientNet), Sum modules for torchvision ResNet's
    ``BasicBlock``/``Bottleneck`` (Zennit) and EfficientNet's ``MBConvBlock`` (ours).
    """
    return [
        ExactMergeBatchNorm(),
        ResNetBasicBlockCanonizer(),
        ResNetBottleneckCanonizer(),
        MBConvSumCanonizer(),
    ]
