"""CIFAR-style ResNet with basic blocks, in every norm and initialisation scheme."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import (
    BLOCKS,
    LayerFactory,
    ResidualNetwork,
    check_positive_int,
    make_head_bias,
    make_stem,
)
from .init import initialise_

STAGE_STRIDES = (1, 2, 2)


def blocks_per_stage(depth: object) -> int:
    """n for depth = 6n + 2: the stem, 3 stages of n two-layer blocks, the head."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
    return (depth - 2) // 6


class CifarResNet(ResidualNetwork):
    """stem (3x3 conv) -> 3 stages of n basic blocks -> global average pool -> Linear head.

    depth = 6n + 2. The stages have widths ``width``, 2 ``width``, 4 ``width`` and strides 1, 2, 2;
    a stage's first block projects its shortcut when the shape changes (RISOTTO blocks always do).

    Args:
        depth: 6n + 2 (8, 14, 20, ...).
        width: channels of the stem and the first stage (even for scheme "risotto").
        num_classes: outputs of the head.
        in_channels: channels of the input.
        norm: one of NORMS: "batch" (BatchNorm2d after every conv, convs without bias), "group"
            (GroupNorm with the largest group count <= ``group_norm_groups`` dividing the channels),
            "equinorm" (EquiNormConv2d instead of every conv, no norm layer), "none" (plain convs
            with bias).
        scheme: one of SCHEMES ("standard", "skipinit", "fixup", "risotto"); see
            :mod:`equinorm_kernels.models.init`. "fixup" needs norm "none".
        group_norm_groups: the largest group count for norm "group".
        equinorm_options: keyword options for every EquiNorm layer (norm "equinorm" only), e.g.
            ``{"stats_fraction": 0.25, "mode": "exact"}``.

    Input (N, in_channels, H, W), H, W >= 4 (non-negative for norm "equinorm"); output
    (N, num_classes).
    """

    def __init__(
        self,
        depth: int = 8,
        width: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        norm: str = "batch",
        scheme: str = "standard",
        group_norm_groups: int = 8,
        equinorm_options: dict | None = None,
    ) -> None:
        super().__init__()
        per_stage = blocks_per_stage(depth)
        for name, value in {"width": width, "num_classes": num_classes, "in_channels": in_channels}.items():
            check_positive_int(value, name)
        layers = self._configure(
            conv=True,
            width=width,
            width_name="width",
            norm=norm,
            scheme=scheme,
            group_norm_groups=group_norm_groups,
            equinorm_options=equinorm_options,
        )
        self.depth, self.width, self.num_classes, self.in_channels = depth, width, num_classes, in_channels
        self.stem = make_stem(layers, in_channels, width, scheme)
        self.blocks = self._stages(layers, per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_bias = make_head_bias(scheme)
        self.head = nn.Linear(width * 2 ** (len(STAGE_STRIDES) - 1), num_classes)
        initialise_(self, scheme)

    def _stages(self, layers: LayerFactory, per_stage: int) -> nn.Sequential:
        block_class = BLOCKS[self.scheme]
        blocks, in_width = [], self.width
        for stage, stride in enumerate(STAGE_STRIDES):
            out_width = self.width * 2**stage
            for index in range(per_stage):
                blocks.append(block_class(layers, in_width, out_width, stride if index == 0 else 1))
                in_width = out_width
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, num_classes)."""
        features = torch.flatten(self.pool(self.blocks(self.stem(x))), 1)
        return self.head(self.head_bias(features))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, norm={self.norm!r}, scheme={self.scheme!r}"
