"""ENorm's fused rescaling in Triton: the ``triton_enorm_group_`` and ``triton_enorm_cycle_`` ops.

Same signatures as csrc/ops.cpp (prefixed ``triton_``) and semantics as csrc/cpu/enorm.cpp
(formulas in csrc/shared/enorm_math.h, program format in csrc/enorm_plan.h, specification in
:mod:`equinorm_kernels.reference.enorm`):

    triton_enorm_group_(tensors, entries, p, c) -> d (C,) float64
    triton_enorm_cycle_(tensors, entries, group_sizes, p, c) -> max |d - 1| per group, float64

``tensors`` are rescaled in place (contiguous or channels_last, any float dtype); ``entries`` holds
records of six ints (tensor index, axis 0 rows / 1 columns, power of d, counted, conv groups,
columns per channel). Not differentiable.

Launches per group: one or two per counted entry (its per-channel energies, summed in float64 for
every dtype, as csrc/shared/enorm_math.h says why, in chunks that :func:`.launch_plans.energy_plan`
sizes for two waves over the GPU, then the chunks added in order), one for the coefficients d
(energies added in entry order in float64, and the group's largest |d - 1|), one per entry with a
power other than 0 (the in-place rescale).
Groups run in order: a tensor rescaled by one group is read by the next with its new values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._row_sums import launch_row_sums
from ._runtime import (
    cast_rounded,
    check,
    check_device,
    define_op,
    float64_bits,
    float64_from_bits,
    on_device,
    wrap_triton,
)
from .launch_plans import EnergyPlan, energy_plan, row_sum_plan

ENTRY_FIELDS = 6  # csrc/enorm_plan.h

_RESCALE_BLOCK = 1024
_COEFFICIENT_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# The program: entries decoded and checked (csrc/enorm_plan.h)
# ---------------------------------------------------------------------------------------------

def _is_channels_last_weight(t: torch.Tensor) -> bool:
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return layout is not None and not t.is_contiguous() and t.is_contiguous(memory_format=layout)


@dataclass(frozen=True)
class _Entry:
    """One (tensor, role) record, viewed as (outer, channels_per_group, inner): element (o, i, t) at
    o * outer_stride + i * channel_stride + t * inner_stride; channel j = group * channels_per_group + i
    is read by the outer indices of its group. A rows entry is (outer, 1, numel / outer)."""

    tensor: int
    columns: bool
    power: int
    counted: bool
    groups: int
    outer: int
    channels_per_group: int
    inner: int
    outer_stride: int
    channel_stride: int
    inner_stride: int

    @property
    def channels(self) -> int:
        return self.channels_per_group * self.groups if self.columns else self.outer

    @property
    def outer_per_group(self) -> int:
        return self.outer // self.groups


def _decode_entry(tensors: list[torch.Tensor], record: list[int]) -> _Entry:
    index, axis, power, counted, groups, per_channel = record
    check(0 <= index < len(tensors), f"entry names tensor {index} but only {len(tensors)} tensors were given")
    check(axis in (0, 1), f"entry axis must be 0 (rows) or 1 (columns), got {axis}")
    check(-2 <= power <= 2, f"entry power must be in [-2, 2], got {power}")
    t = tensors[index]
    check(
        t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        f"tensors[i] must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )
    check(t.numel() > 0 and t.dim() >= 1, f"tensors[{index}] must be non-empty")
    check(
        t.is_contiguous() or _is_channels_last_weight(t),
        f"tensors[{index}] must be contiguous or channels_last to be rescaled in place",
    )
    if axis == 0:
        check(groups == 1 and per_channel == 1, "a rows entry takes groups = 1 and columns per channel = 1")
        inner = t.numel() // t.shape[0]
        return _Entry(index, False, power, counted != 0, 1, t.shape[0], 1, inner, inner, 0, 1)
    check(t.dim() >= 2, f"a columns entry needs a tensor of 2 or more dims, got {tuple(t.shape)}")
    check(groups >= 1 and t.shape[0] % groups == 0, f"entry groups must divide {t.shape[0]}")
    check(per_channel >= 1 and t.shape[1] % per_channel == 0, f"columns per channel must divide {t.shape[1]}")
    check(
        per_channel == 1 or (groups == 1 and t.dim() == 2),
        "columns per channel > 1 needs a 2-D tensor and groups = 1",
    )
    taps = t.numel() // (t.shape[0] * t.shape[1])
    inner = per_channel * taps
    outer_stride = t.shape[1] * taps
    if _is_channels_last_weight(t):  # (out, *kernel, in) in memory
        channel_stride, inner_stride = 1, t.shape[1]
    else:
        channel_stride, inner_stride = inner, 1
    return _Entry(index, True, power, counted != 0, groups, t.shape[0], t.shape[1] // per_channel, inner,
                  outer_stride, channel_stride, inner_stride)


def _decode_plan(tensors: list[torch.Tensor], entries: list[int], group_sizes: list[int]) -> list[list[_Entry]]:
    check(
        len(entries) % ENTRY_FIELDS == 0,
        f"entries must hold records of {ENTRY_FIELDS} ints, got {len(entries)} ints",
    )
    for t in tensors:
        check(t.device == tensors[0].device, f"tensors[i] is on {t.device} but tensors[0] is on {tensors[0].device}")
        check_device(t, "tensors[i]")
    records = len(entries) // ENTRY_FIELDS
    plan, record = [], 0
    for size in group_sizes:
        check(size >= 1 and record + size <= records, f"group_sizes do not match the {records} entries")
        group = []
        for _ in range(size):
            group.append(_decode_entry(tensors, list(entries[record * ENTRY_FIELDS:(record + 1) * ENTRY_FIELDS])))
            record += 1
            check(
                group[-1].channels == group[0].channels,
                f"group {len(plan)} mixes {group[0].channels} and {group[-1].channels} channels",
            )
        check(
            any(e.counted and not e.columns for e in group) and any(e.counted and e.columns for e in group),
            f"group {len(plan)} needs counted rows and counted columns",
        )
        plan.append(group)
    check(record == records, f"group_sizes cover {record} of the {records} entries")
    return plan


def _check_exponents(p: float, c: float) -> None:
    check(math.isfinite(p) and p >= 1, f"p must be a finite number >= 1, got {p}")
    check(math.isfinite(c) and c > 0, f"c must be a positive finite number, got {c}")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _energy_term(values, p, EXPONENT: tl.constexpr):
    """|v|^p: exact for EXPONENT 1 and 2, exp2(p log2 |v|) for any other p (EXPONENT 0)."""
    magnitude = tl.abs(values)
    if EXPONENT == 2:
        term = magnitude * magnitude
    elif EXPONENT == 1:
        term = magnitude
    else:
        safe = tl.where(magnitude == 0, 1, magnitude)
        term = tl.where(magnitude == 0, 0, tl.exp2(p * tl.log2(safe)))
    return term


@triton.jit
def _channel_energy_kernel(
    values_ptr, energy_ptr, channels, channels_per_group, outer_per_group, inner,
    outer_stride, channel_stride, inner_stride, chunk, p_bits,
    EXPONENT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """energy[k, j] = sum of |v|^p over chunk k of channel j's values, in float64: its values are
    indexed q = r * inner + t over the outer indices r of its group and the inner values t, and
    chunk k holds q in [k * chunk, (k + 1) * chunk)."""
    acc = tl.full([BLOCK_J, BLOCK_Q], 0, tl.float64)
    exponent = float64_from_bits(p_bits, acc.dtype)
    split = tl.program_id(1)
    js = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    channel_valid = js < channels
    group = js // channels_per_group
    first_outer = (group * outer_per_group).to(tl.int64)
    base = first_outer * outer_stride + (js % channels_per_group).to(tl.int64) * channel_stride
    reduction = tl.cast(outer_per_group, tl.int64) * inner
    first = tl.cast(split, tl.int64) * chunk
    last = tl.minimum(first + chunk, reduction)
    qs = tl.arange(0, BLOCK_Q).to(tl.int64)
    for q0 in range(first, last, BLOCK_Q):
        q = q0 + qs
        r = q // inner
        offsets = r * outer_stride + (q - r * inner) * inner_stride
        mask = channel_valid[:, None] & (q < last)[None, :]
        values = tl.load(values_ptr + base[:, None] + offsets[None, :], mask=mask, other=0)
        acc += _energy_term(values.to(acc.dtype), exponent, EXPONENT)
    tl.store(energy_ptr + tl.cast(split, tl.int64) * channels + js, tl.sum(acc, axis=1), mask=channel_valid)


@triton.jit
def _coefficients_kernel(
    energy_ptr, d_ptr, deviation_ptr, channels, row_slots, column_slots, p_bits, log_c_bits,
    BLOCK: tl.constexpr,
):
    """One program: d_j = (C_j / (c^p R_j))^(1/(2p)) from the energy slots (rows first, added in
    entry order), d_j = 1 where R_j or C_j is zero or not finite; deviation = max_j |d_j - 1|."""
    p64 = float64_from_bits(p_bits, tl.float64)
    log_c64 = float64_from_bits(log_c_bits, tl.float64)
    largest = tl.full([BLOCK], 0, tl.float64)
    for c0 in range(0, channels, BLOCK):
        js = c0 + tl.arange(0, BLOCK)
        mask = js < channels
        row_energy = tl.full([BLOCK], 0, tl.float64)
        for k in range(row_slots):
            row_energy += tl.load(energy_ptr + tl.cast(k, tl.int64) * channels + js, mask=mask, other=0)
        column_energy = tl.full([BLOCK], 0, tl.float64)
        for k in range(row_slots, row_slots + column_slots):
            column_energy += tl.load(energy_ptr + tl.cast(k, tl.int64) * channels + js, mask=mask, other=0)
        # x * 0 == 0 holds for finite x only (inf * 0 and NaN * 0 are NaN).
        attained = (row_energy > 0) & (row_energy * 0 == 0) & (column_energy > 0) & (column_energy * 0 == 0)
        log_ratio = tl.log(tl.where(attained, column_energy, 1)) - tl.log(tl.where(attained, row_energy, 1))
        d = tl.where(attained, tl.exp((log_ratio - p64 * log_c64) / (2 * p64)), 1)
        tl.store(d_ptr + js, d, mask=mask)
        largest = tl.maximum(largest, tl.where(mask, tl.abs(d - 1), 0))
    tl.store(deviation_ptr, tl.max(largest, axis=0))


@triton.jit
def _rescale_kernel(
    values_ptr, d_ptr, numel, outer_stride, channel_stride, channels_per_group, outer_per_group,
    POWER: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place, in memory order: v *= d_j^POWER, j the channel of v (its row, or its column's
    input channel), in float64 and rounded once to v's dtype."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < numel
    outer = q // outer_stride
    if COLUMNS:
        i = (q - outer * outer_stride) // channel_stride % channels_per_group
        channel = outer // outer_per_group * channels_per_group + i
    else:
        channel = outer
    d = tl.load(d_ptr + channel, mask=mask, other=1)
    if POWER == 1:
        factor = d
    elif POWER == -1:
        factor = 1 / d
    elif POWER == 2:
        factor = d * d
    else:
        factor = 1 / (d * d)
    values = tl.load(values_ptr + q, mask=mask, other=0)
    scaled = values.to(tl.float64) * factor
    tl.store(values_ptr + q, cast_rounded(scaled, values.dtype), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _exponent_kind(p: float) -> int:
    return 2 if p == 2.0 else 1 if p == 1.0 else 0


def _launch_energy(t: torch.Tensor, e: _Entry, p: float, energy: torch.Tensor,
                   per_program: int | None = None) -> EnergyPlan:
    """Writes energy (C,) float64 of entry ``e``: chunks of each channel's values summed in parallel,
    then added in chunk order; returns the plan (``per_program`` forces its chunking, for tests)."""
    if e.columns:
        channels_per_group, outer_per_group, channel_stride = e.channels_per_group, e.outer_per_group, e.channel_stride
    else:  # rows: outer index o is channel o
        channels_per_group, outer_per_group, channel_stride = e.outer, 1, e.outer_stride
    plan = energy_plan(e.channels, outer_per_group * e.inner, per_program)
    partial = energy if plan.chunks == 1 else torch.empty(
        (plan.chunks, e.channels), dtype=torch.float64, device=energy.device)
    wrap_triton(_channel_energy_kernel)[(plan.channel_blocks, plan.chunks)](
        t, partial, e.channels, channels_per_group, outer_per_group, e.inner,
        e.outer_stride, channel_stride, e.inner_stride, plan.chunk, float64_bits(p),
        EXPONENT=_exponent_kind(p), BLOCK_J=plan.block_channels, BLOCK_Q=plan.block_values,
    )
    if plan.chunks > 1:  # at most MAX_CHUNKS partial rows: one finishing launch adds them in order
        launch_row_sums(partial, energy, 1, plan.chunks, e.channels,
                        plan=row_sum_plan(1, plan.chunks, e.channels, chunk_rows=plan.chunks))
    return plan


def _launch_rescale(t: torch.Tensor, e: _Entry, d: torch.Tensor) -> None:
    if e.power == 0:  # multiplying by d^0 = 1 changes nothing
        return
    numel = t.numel()
    wrap_triton(_rescale_kernel)[(triton.cdiv(numel, _RESCALE_BLOCK),)](
        t, d, numel, e.outer_stride, max(e.channel_stride, 1), e.channels_per_group, e.outer_per_group,
        POWER=e.power, COLUMNS=e.columns, BLOCK=_RESCALE_BLOCK,
    )


def _balance_group(tensors: list[torch.Tensor], group: list[_Entry], p: float, c: float,
                   d: torch.Tensor, deviation: torch.Tensor) -> None:
    """Balances one group in place: writes its coefficients into d and max |d - 1| into deviation."""
    channels = group[0].channels
    rows = [e for e in group if e.counted and not e.columns]
    columns = [e for e in group if e.counted and e.columns]
    energy = torch.empty((len(rows) + len(columns), channels), dtype=torch.float64, device=d.device)
    for slot, e in enumerate(rows + columns):
        _launch_energy(tensors[e.tensor], e, p, energy[slot])
    wrap_triton(_coefficients_kernel)[(1,)](
        energy, d, deviation, channels, len(rows), len(columns), float64_bits(p), float64_bits(math.log(c)),
        BLOCK=min(triton.next_power_of_2(channels), _COEFFICIENT_BLOCK),
    )
    for e in group:
        _launch_rescale(tensors[e.tensor], e, d)


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

@define_op("triton_enorm_group_", mutates_args=("tensors",))
def triton_enorm_group_(tensors: list[torch.Tensor], entries: list[int], p: float, c: float) -> torch.Tensor:
    """Balances one group in place; returns its coefficients d (C,) float64."""
    _check_exponents(p, c)
    check(len(tensors) > 0, "tensors must not be empty")
    plan = _decode_plan(tensors, entries, [len(entries) // ENTRY_FIELDS])
    device = tensors[0].device
    d = torch.empty((plan[0][0].channels,), dtype=torch.float64, device=device)
    deviation = torch.empty((1,), dtype=torch.float64, device=device)
    with on_device(tensors[0]):
        _balance_group(tensors, plan[0], p, c, d, deviation)
    return d


@define_op("triton_enorm_cycle_", mutates_args=("tensors",))
def triton_enorm_cycle_(
    tensors: list[torch.Tensor], entries: list[int], group_sizes: list[int], p: float, c: float
) -> torch.Tensor:
    """Balances every group in order, in place; returns max |d - 1| of each group (G,) float64."""
    _check_exponents(p, c)
    check(len(tensors) > 0, "tensors must not be empty")
    plan = _decode_plan(tensors, entries, group_sizes)
    device = tensors[0].device
    deviations = torch.empty((len(plan),), dtype=torch.float64, device=device)
    offsets = [0]
    for group in plan:
        offsets.append(offsets[-1] + group[0].channels)
    coefficients = torch.empty((offsets[-1],), dtype=torch.float64, device=device)
    with on_device(tensors[0]):
        for index, group in enumerate(plan):
            d = coefficients[offsets[index]:offsets[index + 1]]
            _balance_group(tensors, group, p, c, d, deviations[index:index + 1])
    return deviations
