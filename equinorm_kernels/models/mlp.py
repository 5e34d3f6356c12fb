"""Residual MLP: Linear stem, residual blocks of two Linears, Linear head."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import (
    BLOCKS,
    ResidualNetwork,
    check_positive_int,
    make_head_bias,
    make_stem,
)
from .init import initialise_


class ResidualMLP(ResidualNetwork):
    """flatten -> stem (Linear-norm-ReLU) -> ``blocks`` residual blocks -> Linear head.

    Every block is Linear-norm-ReLU-Linear-norm plus an identity skip (RISOTTO: a Linear skip),
    then a ReLU, all ``hidden`` wide.

    Args:
        in_features: features of one input sample once flattened (C * H * W for images).
        num_classes: outputs of the head.
        hidden: width of the stem and the blocks (even for scheme "risotto").
        blocks: number of residual blocks.
        norm: one of NORMS: "batch" (BatchNorm1d after every Linear but the head, no bias before
            it), "group" (GroupNorm), "equinorm" (EquiNormLinear for every Linear but the head, no
            norm layer), "none" (plain Linears with bias).
        scheme: one of SCHEMES; see :mod:`equinorm_kernels.models.init`. "fixup" needs norm "none".
        group_norm_groups: the largest group count for norm "group".
        equinorm_options: keyword options for every EquiNorm layer (norm "equinorm" only), e.g.
            ``{"stats_fraction": 0.25, "mode": "exact"}``.

    Input (N, *) with in_features elements per sample, e.g. (N, C, H, W) images (non-negative for
    norm "equinorm"); output (N, num_classes).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden: int = 64,
        blocks: int = 2,
        norm: str = "batch",
        scheme: str = "standard",
        group_norm_groups: int = 8,
        equinorm_options: dict | None = None,
    ) -> None:
        super().__init__()
        sizes = {"in_features": in_features, "num_classes": num_classes, "hidden": hidden, "blocks": blocks}
        for name, value in sizes.items():
            check_positive_int(value, name)
        layers = self._configure(
            conv=False,
            width=hidden,
            width_name="hidden",
            norm=norm,
            scheme=scheme,
            group_norm_groups=group_norm_groups,
            equinorm_options=equinorm_options,
        )
        self.in_features, self.num_classes, self.hidden, self.num_blocks = in_features, num_classes, hidden, blocks
        self.stem = make_stem(layers, in_features, hidden, scheme)
        block_class = BLOCKS[scheme]
        self.blocks = nn.Sequential(*(block_class(layers, hidden, hidden) for _ in range(blocks)))
        self.head_bias = make_head_bias(scheme)
        self.head = nn.Linear(hidden, num_classes)
        initialise_(self, scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *) -> (N, num_classes)."""
        features = self.blocks(self.stem(torch.flatten(x, 1)))
        return self.head(self.head_bias(features))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, blocks={self.num_blocks}, norm={self.norm!r}, scheme={self.scheme!r}"
