"""Small classifiers built from modules only, so explanation methods can hook every layer.

The CNNs have no functional activations or reshapes: every ReLU, pooling and flatten is an
``nn.Module``. :class:`SmallViT` is the transformer counterpart.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


class SmallCNN(nn.Sequential):
    """A small CNN for 28×28 grey images (MNIST, Fashion-MNIST).

    conv(32)–ReLU–pool → conv(64)–ReLU–pool → FC(128)–ReLU–dropout → FC(classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 hidden: int = 128, dropout: float = 0.25, image_size: int = 28) -> None:
        if image_size % 4:
            raise ValueError(f"SmallCNN needs image_size divisible by 4, got {image_size}")
        feat = 2 * width * (image_size // 4) ** 2
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(feat, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


def _vgg_block(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return layers


class VGGSmall(nn.Sequential):
    """A VGG-style net for 32×32 RGB images (CIFAR-10).

    Three stages of two 3×3 conv–BN–ReLU layers and a max-pool (widths w, 2w, 4w), then
    FC(256)–ReLU–dropout–FC(classes).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32,
                 hidden: int = 256, dropout: float = 0.3, batch_norm: bool = True,
                 image_size: int = 32) -> None:
        if image_size % 8:
            raise ValueError(f"VGGSmall needs image_size divisible by 8, got {image_size}")
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, 2 * width, 4 * width):
            layers += _vgg_block(cin, cout, batch_norm) + _vgg_block(cout, cout, batch_norm)
            layers.append(nn.MaxPool2d(2))
            cin = cout
        layers += [
            nn.Flatten(),
            nn.Linear(4 * width * (image_size // 8) ** 2, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        ]
        super().__init__(*layers)


class SmallViT(VisionTransformer):
    """A small Vision Transformer for 28×28 grey images (Fashion-MNIST), trained from scratch.

    torchvision's ViT (class token, pre-norm encoder blocks with ``nn.MultiheadAttention``, GELU
    MLPs, LayerNorm) at 4 layers × 4 heads × 64 dims on 4×4 patches (49 tokens), with a patch
    embedding for ``in_channels``. Unlike the CNNs it is functional inside (attention, reshapes):
    LRP explains it through the canonized graph (``cp_lrp``, ``attnlrp``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch_size: int = 4,
                 num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 64, mlp_dim: int = 128,
                 dropout: float = 0.0) -> None:
        if image_size % patch_size:
            raise ValueError(f"SmallViT needs image_size divisible by patch_size, got {image_size}, {patch_size}")
        super().__init__(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                         hidden_dim=hidden_dim, mlp_dim=mlp_dim, dropout=dropout, num_classes=num_classes)
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
