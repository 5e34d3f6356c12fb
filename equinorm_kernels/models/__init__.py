"""Residual models for comparing EquiNorm and ENorm with normalization and normalization-free schemes.

    CifarResNet    CIFAR-style ResNet with basic blocks (depth 6n + 2)
    ResidualMLP    Linear stem, residual blocks of two Linears, Linear head
    build_model    either one from an architecture name and the shape of one sample
    NORMS          "batch", "group", "equinorm", "none"
    SCHEMES        "standard", "skipinit", "fixup", "risotto"

Both models have ``stem``, ``blocks`` (nn.Sequential of every residual block in order), ``head``,
the options ``norm`` and ``scheme``, and ``fixup_scalars()``. The schemes' initialisations and the
RISOTTO derivation are in :mod:`equinorm_kernels.models.init`.
"""
from __future__ import annotations

import math

from torch import nn

from .blocks import NORMS, SCHEMES
from .mlp import ResidualMLP
from .resnet import CifarResNet

ARCHS = ("resnet", "mlp")
MIN_RESNET_SIZE = 4

__all__ = ["ARCHS", "CifarResNet", "NORMS", "ResidualMLP", "SCHEMES", "build_model"]


def build_model(arch: str, in_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> nn.Module:
    """A model for samples of shape ``in_shape``.

    Args:
        arch: "resnet" (:class:`CifarResNet`, ``in_shape`` = (C, H, W) with H, W >= 4) or "mlp"
            (:class:`ResidualMLP` on the flattened sample).
        in_shape: shape of one sample, without the batch dim.
        num_classes: outputs of the model.
        **kwargs: the model's other keyword arguments (depth, width, hidden, blocks, norm, scheme, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    in_shape = tuple(in_shape)
    if not in_shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in in_shape):
        raise ValueError(f"in_shape must be a non-empty tuple of positive ints, got {in_shape!r}")
    if arch == "mlp":
        return ResidualMLP(math.prod(in_shape), num_classes, **kwargs)
    if len(in_shape) != 3 or min(in_shape[1:]) < MIN_RESNET_SIZE:
        raise ValueError(f"arch 'resnet' needs in_shape (C, H, W) with H, W >= {MIN_RESNET_SIZE}, got {in_shape}")
    return CifarResNet(num_classes=num_classes, in_channels=in_shape[0], **kwargs)
