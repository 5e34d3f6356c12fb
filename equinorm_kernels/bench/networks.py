"""Modules the benchmarks run besides the package's own: the ResNet-18 that ENorm rescales, the
ImageNet ResNet-18/50 in every norm that the GPU model benchmarks train, and the
weight-standardised convolution that the layer benchmarks compare EquiNorm with.

:class:`ImageNetResNet18` has the ImageNet ResNet-18 layout (7x7 stride-2 stem, max pool, four
stages of two basic blocks at widths 64-128-256-512, 1x1 stride-2 projection shortcuts, global
average pool, 1000-way Linear head): 11.7M parameters at ``width=64``. It is built from plain
nn.Conv2d (with bias, no norm layers), ReLU, pooling and residual additions only, which is what
ENorm's graph tracing rescales end to end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import EquiNormConv2d
from ..models import build_model
from ..models.blocks import group_count

RESNET18_STAGE_BLOCKS = (2, 2, 2, 2)
STD_CONV_EPS = 1e-6


class BasicBlock(nn.Module):
    """relu(conv3x3(relu(conv3x3(x))) + shortcut(x)); the shortcut projects when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ImageNetResNet18(nn.Module):
    """ResNet-18 in the ImageNet layout, without norm layers; ``width`` scales every stage."""

    def __init__(self, width: int = 64, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 7, stride=2, padding=3)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks, channels = [], width
        for stage, count in enumerate(RESNET18_STAGE_BLOCKS):
            stage_width = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.pool(F.relu(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def residual_mlp(in_features: int, hidden: int, blocks: int, num_classes: int = 10) -> nn.Module:
    """The package's residual MLP without norm layers (plain Linears with bias)."""
    return build_model("mlp", (in_features,), num_classes, hidden=hidden, blocks=blocks, norm="none")


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


class StdConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is standardised per output channel on every forward.

    Each output channel's weights get zero mean and unit variance over their fan-in (biased
    variance, ``eps`` inside the square root), computed as a batch norm over the weight viewed as
    (1, out_channels, fan_in): the weight standardisation of BiT / NF-ResNets, with their eps 1e-6.
    No bias by default, as it is usually followed by a norm or a gain.
    """

    def __init__(self, *args: object, eps: float = STD_CONV_EPS, bias: bool = False, **kwargs: object) -> None:
        super().__init__(*args, bias=bias, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        rows = self.weight.reshape(1, self.out_channels, -1)
        standardized = F.batch_norm(rows, None, None, training=True, momentum=0.0, eps=self.eps)
        return standardized.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


# ---- ImageNet ResNets in every norm (the GPU model benchmarks) ----

IMAGENET_STAGE_BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}
BOTTLENECK_EXPANSION = 4
NETWORK_NORMS = ("batch", "group", "equinorm", "none")
GROUP_NORM_GROUPS = 32


def conv_norm(in_channels: int, out_channels: int, kernel: int, stride: int, norm: str) -> nn.Module:
    """A convolution and its norm: Conv2d (no bias) + BatchNorm2d or GroupNorm, an EquiNormConv2d,
    or a Conv2d with bias ("none")."""
    options = dict(kernel_size=kernel, stride=stride, padding=kernel // 2)
    if norm == "equinorm":
        return EquiNormConv2d(in_channels, out_channels, **options)
    if norm == "none":
        return nn.Conv2d(in_channels, out_channels, **options)
    conv = nn.Conv2d(in_channels, out_channels, bias=False, **options)
    if norm == "batch":
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels))
    if norm == "group":
        return nn.Sequential(conv, nn.GroupNorm(group_count(out_channels, GROUP_NORM_GROUPS), out_channels))
    raise ValueError(f"norm must be one of {NETWORK_NORMS}, got {norm!r}")


class NormBasicBlock(nn.Module):
    """relu(conv3x3(relu(conv3x3(x))) + shortcut(x)), every conv with its norm."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = conv_norm(in_channels, width, 3, stride, norm)
        self.conv2 = conv_norm(width, width, 3, 1, norm)
        needs_projection = stride != 1 or in_channels != width
        self.shortcut = conv_norm(in_channels, width, 1, stride, norm) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class NormBottleneck(nn.Module):
    """relu(conv1x1(relu(conv3x3(relu(conv1x1(x))))) + shortcut(x)): ResNet-50's block (stride on the 3x3)."""

    expansion = BOTTLENECK_EXPANSION

    def __init__(self, in_channels: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv_norm(in_channels, width, 1, 1, norm)
        self.conv2 = conv_norm(width, width, 3, stride, norm)
        self.conv3 = conv_norm(width, out_channels, 1, 1, norm)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv_norm(in_channels, out_channels, 1, stride, norm) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(hidden) + self.shortcut(x))


class ImageNetResNet(nn.Module):
    """ResNet-18 or -50 in the ImageNet layout (7x7 stride-2 stem, max pool, four stages at widths
    ``width`` * 1, 2, 4, 8, global average pool, Linear head), every conv followed by ``norm``.

    Input (N, in_channels, H, W) with H, W >= 32, non-negative for norm "equinorm" (raw pixels);
    output (N, num_classes).
    """

    def __init__(self, depth: int = 18, norm: str = "batch", width: int = 64, num_classes: int = 1000,
                 in_channels: int = 3) -> None:  # fmt: skip
        super().__init__()
        if depth not in IMAGENET_STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(IMAGENET_STAGE_BLOCKS)}, got {depth!r}")
        block = NormBasicBlock if depth == 18 else NormBottleneck
        self.stem = conv_norm(in_channels, width, 7, 2, norm)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks, channels = [], width
        for stage, count in enumerate(IMAGENET_STAGE_BLOCKS[depth]):
            stage_width = width * 2**stage
            for index in range(count):
                blocks.append(block(channels, stage_width, 2 if stage > 0 and index == 0 else 1, norm))
                channels = stage_width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.pool(F.relu(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
