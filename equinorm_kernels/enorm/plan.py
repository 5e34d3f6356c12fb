"""What ENorm rescales: layers, the channel groups between them, and their readable summary."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(eq=False)
class Layer:
    """One weight ENorm may rescale.

    ``weight`` and ``bias`` are the parameters the model holds now: ENorm adopts replacements
    (see :mod:`equinorm_kernels.enorm.bindings`), so every group sharing this layer sees them.

    ``kind`` is "linear" (weight (out, in)), "conv" (weight (out, in/groups, *kernel)) or
    "batchnorm" (weight = gamma (C,), bias = beta (C,)). ``name`` is the module path, or for a
    functional call the weight's attribute path without its ".weight" suffix.
    """

    name: str
    kind: str
    weight: nn.Parameter
    bias: nn.Parameter | None = None
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        """Input channels as a consumer sees them (Linear: in_features)."""
        return self.weight.shape[1] * self.groups


@dataclass(frozen=True, eq=False)
class Columns:
    """A consumer's columns for one channel group; a flatten gives each channel S columns."""

    layer: Layer
    columns_per_channel: int = 1


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """One channel space: producers' rows are multiplied by d, consumers' columns divided by d."""

    channels: int
    producers: tuple[Layer, ...]
    consumers: tuple[Columns, ...]

    def describe(self) -> RescalingGroup:
        return RescalingGroup(
            channels=self.channels,
            producers=tuple(layer.name for layer in self.producers),
            consumers=tuple(columns.layer.name for columns in self.consumers),
        )


@dataclass(frozen=True)
class RescalingGroup:
    """Readable view of a channel group: the layer names whose rows/columns share one d per channel."""

    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.channels} channels: {', '.join(self.producers)} -> {', '.join(self.consumers)}"
