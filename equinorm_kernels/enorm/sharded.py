"""The sequential cycle on parameters sharded by FSDP2 (``fully_shard``): DTensors split along dim 0.

FSDP2 gives each process of its mesh a slice of every parameter's rows, as ``torch.chunk`` does:
process r of W holds rows [r k, min((r + 1) k, n)) of n, with k = ceil(n / W) (possibly none).
For one channel group that means:

    row energies R_i     complete on the process holding row i: placed at its offset, zeros elsewhere
    column energies C_i  a partial sum over the local rows on every process

so one all-reduce (sum) of the 2 x channels values [R, C] over the shard group gives the energies
of the unsharded weights on every process, every process computes the same d, and each rescales
what it holds: its rows (and their gradients and optimizer moments) by its slice of d, its part of
every column by all of 1/d. The cycle then equals the unsharded one (up to the order of the
floating-point sums), with one all-reduce per group. Tensors that are not sharded (plain tensors,
or DTensors replicated over their mesh) count once, after the reduction.

Supported layouts: a 1-D device mesh with ``Shard(0)`` (FSDP2's default) or ``Replicate()``.
Anything else (HSDP's 2-D meshes, sharding along another dim, a grouped convolution sharded along
its output channels as a consumer, tensors of one group on different meshes) is a ValueError
naming the parameter.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist

from ..reference.enorm import (
    enorm_coefficients,
    enorm_column_energy,
    enorm_row_energy,
    enorm_scale_columns_,
    enorm_scale_rows_,
)
from .optimizer_state import StateRescaler
from .plan import ChannelGroup, Layer
from .sequential import sequential_cycle

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch without torch.distributed: nothing is ever sharded
    DTensor = None


def is_distributed_tensor(tensor: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def holds_sharded_parameters(groups: tuple[ChannelGroup, ...]) -> bool:
    """Whether any weight of ``groups`` is a DTensor (then the cycle must run here)."""
    return any(
        is_distributed_tensor(layer.weight)
        for group in groups
        for layer in (*group.producers, *(columns.layer for columns in group.consumers))
    )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for a sharded DTensor); plain tensors as they are."""
    return tensor.full_tensor() if is_distributed_tensor(tensor) else tensor


class _Shard:
    """Where this process's part of one tensor lies: its local rows start at ``offset`` of the full tensor."""

    def __init__(self, tensor: torch.Tensor, name: str) -> None:
        self.local, self.offset, self.group = tensor, 0, None
        if not is_distributed_tensor(tensor):
            return
        mesh, placements = tensor.device_mesh, tuple(tensor.placements)
        if mesh.ndim != 1 or not (placements == (Shard(0),) or placements == (Replicate(),)):
            raise ValueError(
                f"ENorm: parameter '{name}' is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; "
                "sharded parameters are supported with Shard(0) or Replicate() on a 1-D mesh (FSDP2's "
                "fully_shard without HSDP)"
            )
        self.local = tensor.to_local()
        if placements == (Replicate(),):
            return
        self.group = mesh.get_group()
        rows, processes, rank = tensor.shape[0], mesh.size(), mesh.get_local_rank()
        chunk = math.ceil(rows / processes)
        self.offset = min(rank * chunk, rows)
        expected = max(0, min(rows, self.offset + chunk) - self.offset)
        if self.local.shape[0] != expected:
            raise ValueError(
                f"ENorm: parameter '{name}' has {self.local.shape[0]} local rows on process {rank}, but sharding "
                f"{rows} rows over {processes} processes as torch.chunk does gives {expected}; this layout is "
                "not supported"
            )

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.local.shape[0])


def _scale_local_rows_(tensor: torch.Tensor, factor: torch.Tensor, *, name: str) -> None:
    shard = _Shard(tensor, name)
    if shard.local.shape[0] > 0:
        enorm_scale_rows_(shard.local, factor[shard.rows])


def _scale_local_columns_(tensor: torch.Tensor, factor: torch.Tensor, *, name: str, groups: int, columns_per_channel: int) -> None:
    local = _Shard(tensor, name).local
    if local.shape[0] > 0:
        enorm_scale_columns_(local, factor, groups=groups, columns_per_channel=columns_per_channel)


def _check_consumer(layer: Layer, shard: _Shard) -> None:
    if shard.group is not None and layer.groups > 1:
        raise ValueError(
            f"ENorm: layer '{layer.name}' is a grouped convolution (groups={layer.groups}) whose weight is "
            "sharded along its output channels; its column energies cannot be taken per shard. Leave this "
            "layer unsharded (fully_shard the other modules) or use groups=1"
        )


def _same_group(current: dist.ProcessGroup | None, found: dist.ProcessGroup | None, group: ChannelGroup):
    if found is None or current is None or current is found:
        return current or found
    raise ValueError(f"ENorm: the parameters of the channel group {group.describe()} are sharded over different meshes")


def group_coefficients(group: ChannelGroup, p: float, c: float, include_bias: bool) -> torch.Tensor:
    """(channels,) coefficients d of one group, the same on every process of the shard group."""
    first = _Shard(group.producers[0].weight, f"{group.producers[0].name}.weight").local
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    # Row 0: R, row 1: C; sharded tensors' parts are summed over the shard group, the others are whole.
    sharded = torch.zeros((2, group.channels), dtype=dtype, device=first.device)
    unsharded = torch.zeros_like(sharded)
    process_group = None

    def add(kind: int, shard: _Shard, rows: slice, energy_of) -> None:
        nonlocal process_group
        process_group = _same_group(process_group, shard.group, group)
        if shard.local.shape[0] > 0:  # a process may hold no row of a small tensor
            (sharded if shard.group is not None else unsharded)[kind, rows] += energy_of(shard.local)

    for layer in group.producers:
        shard = _Shard(layer.weight, f"{layer.name}.weight")
        bias = None
        if include_bias and layer.bias is not None:
            bias_shard = _Shard(layer.bias, f"{layer.name}.bias")
            if bias_shard.rows != shard.rows:
                raise ValueError(f"ENorm: the bias of layer '{layer.name}' is sharded unlike its weight")
            bias = bias_shard.local
        add(0, shard, shard.rows, lambda local: enorm_row_energy(local, p, bias))
    for columns in group.consumers:
        layer = columns.layer
        shard = _Shard(layer.weight, f"{layer.name}.weight")
        _check_consumer(layer, shard)
        add(1, shard, slice(None), lambda local: enorm_column_energy(
            local, p, groups=layer.groups, columns_per_channel=columns.columns_per_channel))  # fmt: skip
    if process_group is not None:
        dist.all_reduce(sharded, group=process_group)
    total = sharded + unsharded
    return enorm_coefficients(total[0], total[1], p, c)


def apply_group(group: ChannelGroup, d: torch.Tensor, state: StateRescaler) -> None:
    """Each process rescales the rows it holds by its slice of d and its part of every column by 1/d."""
    for layer in group.producers:
        for field in ("weight", "bias"):
            tensor = getattr(layer, field)
            if tensor is not None:
                scale = partial(_scale_local_rows_, name=f"{layer.name}.{field}")
                scale(tensor, d)
                state.follow(tensor, scale, d)
    inverse = 1.0 / d
    for columns in group.consumers:
        layer = columns.layer
        scale = partial(
            _scale_local_columns_, name=f"{layer.name}.weight", groups=layer.groups,
            columns_per_channel=columns.columns_per_channel,
        )  # fmt: skip
        scale(layer.weight, inverse)
        state.follow(layer.weight, scale, inverse)


def sharded_sequential_cycle(
    groups: tuple[ChannelGroup, ...], p: float, c: float, include_bias: bool, state: StateRescaler
) -> torch.Tensor | None:
    """One sequential cycle over ``groups`` holding sharded parameters; max |d - 1| (None without groups)."""
    return sequential_cycle(groups, p, c, include_bias, state, coefficients_of=group_coefficients, apply=apply_group)
