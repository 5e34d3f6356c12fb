"""``schedule="sequential"``: block coordinate descent over the channel groups.

Groups are visited in topological order and each update uses the weights as the previous update
left them. For c = 1 every update minimises the total energy over that group's coefficients, so
the energy never increases and the cycles converge to the balanced fixed point.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..reference.enorm import (
    enorm_coefficients,
    enorm_column_energy,
    enorm_row_energy,
    enorm_scale_columns_,
    enorm_scale_rows_,
)
from .optimizer_state import StateRescaler
from .plan import ChannelGroup, Columns, Layer


def group_coefficients(group: ChannelGroup, p: float, c: float, include_bias: bool) -> torch.Tensor:
    """(channels,) coefficients d of one group from its current weights."""
    device = group.producers[0].weight.device
    rows = sum(_row_energy(layer, p, include_bias).to(device) for layer in group.producers)
    columns = sum(_column_energy(cols, p).to(device) for cols in group.consumers)
    return enorm_coefficients(rows, columns, p, c)


def _row_energy(layer: Layer, p: float, include_bias: bool) -> torch.Tensor:
    return enorm_row_energy(layer.weight, p, layer.bias if include_bias else None)


def _column_energy(cols: Columns, p: float) -> torch.Tensor:
    layer = cols.layer
    return enorm_column_energy(layer.weight, p, groups=layer.groups, columns_per_channel=cols.columns_per_channel)


def apply_group(group: ChannelGroup, d: torch.Tensor, state: StateRescaler) -> None:
    """Producer rows and biases times d, consumer columns divided by d, optimizer state to match."""
    for layer in group.producers:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                enorm_scale_rows_(tensor, d)
                state.follow(tensor, enorm_scale_rows_, d)
    inverse = 1.0 / d
    for cols in group.consumers:
        scale = partial(enorm_scale_columns_, groups=cols.layer.groups, columns_per_channel=cols.columns_per_channel)
        scale(cols.layer.weight, inverse)
        state.follow(cols.layer.weight, scale, inverse)


@torch.no_grad()
def sequential_cycle(
    groups: tuple[ChannelGroup, ...], p: float, c: float, include_bias: bool, state: StateRescaler,
    *, coefficients_of: Callable[..., torch.Tensor] = group_coefficients,
    apply: Callable[[ChannelGroup, torch.Tensor, StateRescaler], None] = apply_group,
) -> torch.Tensor | None:
    """One cycle over ``groups``; returns max |d - 1| over the cycle (None when there is no group).

    ``coefficients_of`` and ``apply`` find and apply one group's d (those of sharded parameters
    reduce over their shards)."""
    deviation = None
    for group in groups:
        d = coefficients_of(group, p, c, include_bias)
        apply(group, d, state)
        step = (d - 1).abs().max()
        deviation = step if deviation is None else torch.maximum(deviation, step.to(deviation.device))
    return deviation
