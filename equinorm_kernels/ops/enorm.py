"""ENorm's fused rescaling: the program the ``enorm_group_``/``enorm_cycle_`` ops run, built from
the channel groups ENorm discovered, and their fake kernels.

A cycle is one op call: for each group the kernel sums the counted row and column energies,
computes d = (C / (c^p R))^(1/(2p)) (1 where an energy is zero) and rescales every tensor of the
group in place, each along its axis by d to a power:

    producer weight rows, biases        d          their .grad, first moments    1/d    second moments   1/d^2
    consumer weight columns             1/d        their .grad, first moments    d      second moments   d^2

The specification is :mod:`equinorm_kernels.reference.enorm` and the loop in
:mod:`equinorm_kernels.enorm.sequential`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..enorm.optimizer_state import StateRescaler, moment_tensors
from ..enorm.plan import ChannelGroup
from ..enorm.sequential import sequential_cycle as reference_sequential_cycle

ROWS, COLUMNS = 0, 1
ENTRY_FIELDS = 6  # tensor index, axis, power, counted, groups, columns per channel (csrc/enorm_plan.h)


def check_program_shape(op_name: str, tensors, entries, group_sizes=None) -> None:
    """Raise ValueError for a program without tensors or entries, or not in whole entry records."""
    if len(tensors) == 0:
        raise ValueError(f"{op_name}: tensors must not be empty (the weights of at least one channel group)")
    if len(entries) == 0 or len(entries) % ENTRY_FIELDS:
        raise ValueError(
            f"{op_name}: entries must hold whole records of {ENTRY_FIELDS} ints (tensor index, axis, power, "
            f"counted, groups, columns per channel), at least one; got {len(entries)} ints"
        )
    if group_sizes is not None and len(group_sizes) == 0:
        raise ValueError(f"{op_name}: group_sizes must not be empty (one record count per group)")


def fake_enorm_group_(tensors, entries, p, c):
    check_program_shape("enorm_group_", tensors, entries)
    first = entries[0]
    rows = tensors[first].shape[0] if entries[1] == ROWS else tensors[first].shape[1] * entries[4] // entries[5]
    return tensors[0].new_empty((rows,), dtype=torch.float64)


def fake_enorm_cycle_(tensors, entries, group_sizes, p, c):
    check_program_shape("enorm_cycle_", tensors, entries, group_sizes)
    return tensors[0].new_empty((len(group_sizes),), dtype=torch.float64)


def _kernel_for_no_tensors(op_name: str) -> Callable[..., torch.Tensor]:
    """Runs where the dispatcher finds no backend kernel, above all for an empty tensor list, which
    names no device at all."""

    def kernel(tensors, *args):
        check_program_shape(op_name, tensors, [0] * ENTRY_FIELDS)
        raise NotImplementedError(f"{op_name} has no kernel for {tensors[0].device.type} tensors")

    return kernel


def register_fake_kernels() -> None:
    torch.library.register_fake("equinorm_kernels::enorm_group_", fake_enorm_group_)
    torch.library.register_fake("equinorm_kernels::enorm_cycle_", fake_enorm_cycle_)
    for name in ("enorm_group_", "enorm_cycle_"):
        torch.library.impl(f"equinorm_kernels::{name}", "CompositeExplicitAutograd", _kernel_for_no_tensors(name))


class RescalingProgram:
    """Collects the tensors and entry records of one or more groups."""

    def __init__(self, state: StateRescaler) -> None:
        self.state = state
        self.tensors: list[torch.Tensor] = []
        self.entries: list[int] = []
        self.group_sizes: list[int] = []
        self._index: dict[int, int] = {}

    def add_group(self, group: ChannelGroup, include_bias: bool) -> None:
        before = len(self.entries)
        for layer in group.producers:
            self._add_with_followers(layer.weight, ROWS, 1, counted=True)
            if layer.bias is not None:
                self._add_with_followers(layer.bias, ROWS, 1, counted=include_bias)
        for columns in group.consumers:
            layout = (columns.layer.groups, columns.columns_per_channel)
            self._add_with_followers(columns.layer.weight, COLUMNS, -1, counted=True, layout=layout)
        self.group_sizes.append((len(self.entries) - before) // ENTRY_FIELDS)

    def _add_with_followers(self, param: torch.Tensor, axis: int, power: int, *, counted: bool, layout=(1, 1)) -> None:
        """``param`` scaled by d^power, and its gradient and optimizer moments to match."""
        self._add(param, axis, power, counted, layout)
        if self.state.rescale_grads and param.grad is not None:
            self._add(param.grad, axis, -power, False, layout)
        optimizer_state = self.state.optimizer.state.get(param) if self.state.optimizer is not None else None
        first, second = moment_tensors(optimizer_state, self.state.optimizer) if optimizer_state else ((), ())
        for moment in first:
            self._add(moment, axis, -power, False, layout)
        for moment in second:
            self._add(moment, axis, -2 * power, False, layout)

    def _add(self, tensor: torch.Tensor, axis: int, power: int, counted: bool, layout: tuple[int, int]) -> None:
        index = self._index.setdefault(id(tensor), len(self.tensors))
        if index == len(self.tensors):
            self.tensors.append(tensor)
        self.entries += [index, axis, power, int(counted), *layout]


def _kernel_can_rescale(tensor: torch.Tensor) -> bool:
    if tensor.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    return layout is not None and tensor.is_contiguous(memory_format=layout)


def fused_sequential_cycle(cycle_op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor | None]:
    """A drop-in for :func:`equinorm_kernels.enorm.sequential.sequential_cycle` running one op call.

    Tensors the kernels cannot rescale in place (strides other than contiguous or channels_last)
    send the cycle to the reference loop.
    """

    def sequential_cycle(
        groups: tuple[ChannelGroup, ...], p: float, c: float, include_bias: bool, state: StateRescaler
    ) -> torch.Tensor | None:
        if not groups:
            return None
        program = RescalingProgram(state)
        for group in groups:
            program.add_group(group, include_bias)
        if not all(_kernel_can_rescale(t) for t in program.tensors):
            return reference_sequential_cycle(groups, p, c, include_bias, state)
        deviations = cycle_op(program.tensors, program.entries, program.group_sizes, p, c)
        return deviations.max()

    return sequential_cycle
