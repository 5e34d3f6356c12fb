"""EquiNorm in Triton: channel statistics, the weight transform and its backward.

The ops have the signatures of csrc/ops.cpp under the prefix ``triton_`` and the semantics of the
CPU kernels (csrc/cpu/channel_mean.cpp, csrc/cpu/equinorm.cpp; formulas in
csrc/shared/equinorm_math.h, specification in :mod:`equinorm_kernels.reference.equinorm`):

    triton_channel_mean(x, rows, statistic) -> (mean, negative)
    triton_equinorm_weight(weight, mean, gain, ratio, groups, mode, eps) -> (out, stats)
    triton_equinorm_forward(x, rows, weight, gain, ratio, groups, mode, eps, statistic) -> (out, mean, stats, negative)
    triton_equinorm_backward(grad_out, weight, mean, gain, stats, groups) -> (grad_weight, grad_mean, grad_gain)

They are plain, non-differentiable ops; autograd comes from the wrappers in
:mod:`equinorm_kernels.ops.equinorm`. Shapes and dtypes: x (N, C, *spatial) any float dtype, NCHW or
channels_last (other strides are copied); weight (D, C/groups, *kernel) contiguous or channels_last
(stored (t, c) per output channel); mean (C,) and gain (D,) in the accumulation dtype (float64 for
float64 operands, else float32), which the channel sums use; the weight transform and its backward
compute in float64, the dtype of stats (D, 5) and grad_mean (csrc/shared/equinorm_math.h says why).

Launches per call (how each kernel is cut into programs: :mod:`.launch_plans`):
    channel_mean      1, or 3 to 4 when x is large enough to split each channel's sum over several
                      programs: the partial sums, their fixed-order total (:mod:`._row_sums`), the means
    equinorm_weight   1
    equinorm_forward  channel_mean's launches, then the weight transform
    equinorm_backward 2 to 3: one program per output channel, then the fixed-order sum over output
                      channels of each input channel's gradient terms, in chunks when they are many

No result depends on float atomics or on the launch order of programs: every cross-program sum
goes through a workspace and is added in a fixed order, so a launch configuration always gives
bit-identical results (see _runtime.AUTOTUNE_ENV for reproducibility across processes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference.equinorm import WEIGHT_MATH_DTYPE
from ._row_sums import launch_row_sums
from ._runtime import (
    accumulation_dtype,
    autotune,
    cast_rounded,
    check,
    check_device,
    define_op,
    float64_bits,
    float64_from_bits,
    on_device,
    size_hint,
    wrap_triton,
)
from .launch_plans import (
    CHANNEL_SUM_TILE,
    ChannelsLastChannelSumPlan,
    PlanarChannelSumPlan,
    channels_last_channel_sum_plan,
    planar_channel_sum_plan,
    weight_row_plan,
)

STATS_COLUMNS = 5  # shift, scale, positive mass, mean mass, used exact (csrc/shared/equinorm_math.h)
_FINISH_BLOCK = 1024

# Offsets within a weight row are int32 (offsets of rows and planes are int64).
_MAX_ROW_VALUES = 2**31 - 1
# M_d's lower clamp, so a group whose means are all 0 gets a finite shift (as mean_mass in csrc/shared).
_FLOAT64_TINY = tl.constexpr(torch.finfo(torch.float64).tiny)


# ---------------------------------------------------------------------------------------------
# Geometry and argument checks (csrc/op_checks.h)
# ---------------------------------------------------------------------------------------------

def _check_floating(t: torch.Tensor, name: str) -> None:
    check(
        t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )


def _is_channels_last(t: torch.Tensor) -> bool:
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout)


def _channel_input(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, bool]:
    """x in a layout the channel-sum kernels read, and whether that layout is channels_last."""
    _check_floating(x, "x")
    check_device(x, "x")
    check(x.dim() >= 2, f"x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    check(x.numel() > 0, f"x must not be empty, got shape {tuple(x.shape)}")
    check(1 <= rows <= x.shape[0], f"rows must be in [1, N = {x.shape[0]}], got {rows}")
    spatial = x.numel() // (x.shape[0] * x.shape[1])
    if x.is_contiguous() and spatial > 1:
        return x, False
    if _is_channels_last(x) or x.is_contiguous():  # a (N, C) input is channels_last with one position
        return x, True
    return x.contiguous(), spatial == 1


@dataclass(frozen=True)
class _WeightGeometry:
    """A weight (D, C/groups, *kernel) as D rows of C/groups x K values, stored (c, t) or (t, c)."""

    out_channels: int
    group_channels: int
    taps: int
    groups: int
    channels_last: bool
    kernel_dims: int  # weight.dim() - 2: picks channels_last or channels_last_3d

    @property
    def channel_stride(self) -> int:
        return 1 if self.channels_last else self.taps

    @property
    def tap_stride(self) -> int:
        return self.group_channels if self.channels_last else 1

    @property
    def outputs_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def memory_format(self) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.kernel_dims == 2 else torch.channels_last_3d


def _weight_input(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, _WeightGeometry]:
    _check_floating(weight, "weight")
    check_device(weight, "weight")
    check(weight.dim() >= 2, f"weight must have shape (D, C/groups, *kernel), got {tuple(weight.shape)}")
    check(weight.numel() > 0, "weight must not be empty")
    check(
        groups >= 1 and weight.shape[0] % groups == 0,
        f"groups must be a positive divisor of D = {weight.shape[0]}, got {groups}",
    )
    taps = weight.numel() // (weight.shape[0] * weight.shape[1])
    check(
        weight.shape[1] * taps >= 2,
        f"weight needs at least 2 values per output channel, got shape {tuple(weight.shape)}",
    )
    check(
        weight.shape[1] * taps <= _MAX_ROW_VALUES,
        f"weight has {weight.shape[1] * taps} values per output channel; the Triton kernels take at most "
        f"{_MAX_ROW_VALUES}",
    )
    channels_last = not weight.is_contiguous() and _is_channels_last(weight)
    readable = weight if weight.is_contiguous() or channels_last else weight.contiguous()
    geometry = _WeightGeometry(
        out_channels=weight.shape[0],
        group_channels=weight.shape[1],
        taps=taps,
        groups=groups,
        channels_last=channels_last,
        kernel_dims=weight.dim() - 2,
    )
    return readable, geometry


def _empty_like_weight(weight: torch.Tensor, geometry: _WeightGeometry, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=dtype, device=weight.device, memory_format=geometry.memory_format)


def _check_per_channel(t: torch.Tensor, name: str, size: int, dtype: torch.dtype, weight: torch.Tensor) -> None:
    check(t.dim() == 1 and t.shape[0] == size, f"{name} must have shape ({size},), got {tuple(t.shape)}")
    check(
        t.dtype == dtype,
        f"{name} must be {dtype} (the accumulation dtype of weight {weight.dtype}), got {t.dtype}",
    )
    check(t.device == weight.device, f"{name} is on {t.device} but weight is on {weight.device}")


def _check_mean_and_gain(weight: torch.Tensor, g: _WeightGeometry, mean: torch.Tensor, gain: torch.Tensor) -> bool:
    """Checks mean, (C,) or per tap (C, *kernel), and gain (D,); returns whether the means are per tap."""
    acc = accumulation_dtype(weight.dtype)
    channels = g.group_channels * g.groups
    per_tap = mean.dim() >= 2
    if per_tap:
        expected = (channels, *weight.shape[2:])
        check(tuple(mean.shape) == expected,
              f"mean must have shape ({channels},) or, per tap, (C, *kernel) = {expected}, got {tuple(mean.shape)}")
        check(mean.dtype == acc, f"mean must be {acc} (the accumulation dtype of weight {weight.dtype}), got {mean.dtype}")
        check(mean.device == weight.device, f"mean is on {mean.device} but weight is on {weight.device}")
    else:
        _check_per_channel(mean, "mean", channels, acc, weight)
    _check_per_channel(gain, "gain", g.out_channels, acc, weight)
    return per_tap


def _check_ratio_and_eps(ratio: float, eps: float) -> None:
    check(ratio > 0 and math.isfinite(ratio), f"ratio must be a positive finite number, got {ratio}")
    check(eps > 0 and math.isfinite(eps), f"eps must be a positive finite number, got {eps}")


def _parse_exact_mode(mode: str) -> bool:
    check(mode in ("single_pass", "exact"), f'mode must be "single_pass" or "exact", got "{mode}"')
    return mode == "exact"


def _row_tile(g: _WeightGeometry) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_T): the channels x taps tile a weight-row program loads at once."""
    plan = weight_row_plan(g.out_channels, g.group_channels, g.taps)
    return plan.block_channels, plan.block_taps


# Launch configurations, the default first: elements loaded per step (TILE, never below the plans'
# CHANNEL_SUM_TILE, which bounds a planar tile's width) and warps. With autotuning, a kernel is
# tuned once per tile shape (its power-of-2 blocks, from the plan) and variant, never per batch
# size: a smaller last batch or a new layer of the same tile shape reuses the choice.
_CHANNEL_SUM_CONFIGS = [
    triton.Config({"TILE": tile}, num_warps=warps)
    for tile, warps in ((CHANNEL_SUM_TILE, 4), (4096, 4), (4096, 8), (CHANNEL_SUM_TILE, 8))
]
# No 2-warp row configuration: a float64 row tile of 32 x 64 needs all 255 registers per thread
# there and the backward spills 740 B on sm_80 (180 B on sm_90); with 4 warps it spills nothing.
_ROW_CONFIGS = [triton.Config({}, num_warps=warps) for warps in (4, 8)]


# ---------------------------------------------------------------------------------------------
# Channel means: mu_c = mean of x[:rows] over every dim but 1, or with ABS ("abs_mean") of
# |x[:rows]|, in the same order (equal bits on non-negative inputs); with ABS each program also
# stores whether its values had one < 0, and the channel's flag is the OR over its programs.
# ---------------------------------------------------------------------------------------------

@autotune(_CHANNEL_SUM_CONFIGS, key=["BLOCK_S", "FINAL", "ABS"])
@triton.jit
def _planar_channel_sums_kernel(
    x_ptr, sums_ptr, negative_ptr, rows, channels, spatial, rows_per_split, segment, spatial_splits, count,
    FINAL: tl.constexpr, ABS: tl.constexpr, BLOCK_S: tl.constexpr, TILE: tl.constexpr,
):
    """NCHW x: program (c, k) sums channel c over samples [(k // spatial_splits) * rows_per_split, ...)
    and positions [(k % spatial_splits) * segment, ...) into sums[k, c]; with FINAL (one split) it
    writes the mean itself."""
    BLOCK_N: tl.constexpr = TILE // BLOCK_S
    channel = tl.program_id(0)
    split = tl.program_id(1)
    acc_t = sums_ptr.dtype.element_ty
    first = (split // spatial_splits) * rows_per_split
    last = tl.minimum(first + rows_per_split, rows)
    first_position = (split % spatial_splits) * segment
    last_position = tl.minimum(first_position + segment, spatial)
    plane = x_ptr + channel.to(tl.int64) * spatial
    sample_stride = tl.cast(channels, tl.int64) * spatial
    samples = tl.arange(0, BLOCK_N)
    positions = tl.arange(0, BLOCK_S)
    acc = tl.full([BLOCK_N, BLOCK_S], 0, acc_t)
    lowest = tl.full([BLOCK_N, BLOCK_S], 0, acc_t)
    for n0 in range(first, last, BLOCK_N):
        n = n0 + samples
        for s0 in range(first_position, last_position, BLOCK_S):
            s = s0 + positions
            mask = (n < last)[:, None] & (s < last_position)[None, :]
            values = tl.load(plane + n.to(tl.int64)[:, None] * sample_stride + s[None, :], mask=mask, other=0)
            values = values.to(acc_t)
            if ABS:
                lowest = tl.minimum(lowest, values)
                values = tl.where(values < 0, -values, values)
            acc += values
    total = tl.sum(acc)
    if FINAL:
        tl.store(sums_ptr + channel, total / tl.cast(count, acc_t))
        if ABS:
            tl.store(negative_ptr + channel, (tl.min(lowest) < 0).to(tl.uint8))
    else:
        # Row `split` of the (splits, C or 2C) scratch: the sums, then with ABS the flags as 0/1.
        row = sums_ptr + split.to(tl.int64) * tl.cast(channels, tl.int64) * (2 if ABS else 1)
        tl.store(row + channel, total)
        if ABS:
            tl.store(row + channels + channel, (tl.min(lowest) < 0).to(acc_t))


@autotune(_CHANNEL_SUM_CONFIGS, key=["BLOCK_C", "FINAL", "ABS"])
@triton.jit
def _channels_last_channel_sums_kernel(
    x_ptr, sums_ptr, negative_ptr, channels, positions, positions_per_split, count,
    FINAL: tl.constexpr, ABS: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr,
):
    """channels_last x, one C-vector per (sample, position): program (b, k) sums channel block b
    over positions [k * positions_per_split, ...) into sums[k, block]."""
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    split = tl.program_id(1)
    acc_t = sums_ptr.dtype.element_ty
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    first = split * positions_per_split
    last = tl.minimum(first + positions_per_split, positions)
    offsets = tl.arange(0, BLOCK_P)
    acc = tl.full([BLOCK_P, BLOCK_C], 0, acc_t)
    lowest = tl.full([BLOCK_P, BLOCK_C], 0, acc_t)
    for p0 in range(first, last, BLOCK_P):
        p = p0 + offsets
        mask = (p < last)[:, None] & channel_mask[None, :]
        values = tl.load(x_ptr + p.to(tl.int64)[:, None] * channels + cs[None, :], mask=mask, other=0)
        values = values.to(acc_t)
        if ABS:
            lowest = tl.minimum(lowest, values)
            values = tl.where(values < 0, -values, values)
        acc += values
    total = tl.sum(acc, axis=0)
    negative = tl.min(lowest, axis=0) < 0
    if FINAL:
        tl.store(sums_ptr + cs, total / tl.cast(count, acc_t), mask=channel_mask)
        if ABS:
            tl.store(negative_ptr + cs, negative.to(tl.uint8), mask=channel_mask)
    else:
        # Row `split` of the (splits, C or 2C) scratch: the sums, then with ABS the flags as 0/1.
        row = sums_ptr + split.to(tl.int64) * tl.cast(channels, tl.int64) * (2 if ABS else 1)
        tl.store(row + cs, total, mask=channel_mask)
        if ABS:
            tl.store(row + channels + cs, negative.to(acc_t), mask=channel_mask)


@triton.jit
def _finish_channel_means_kernel(totals_ptr, mean_ptr, negative_ptr, channels, count, ABS: tl.constexpr,
                                 BLOCK: tl.constexpr):
    """mean[c] = totals[c] / count; with ABS, negative[c] = whether any split flagged channel c
    (totals[C + c], the sum of the splits' 0/1 flags, is positive)."""
    acc_t = mean_ptr.dtype.element_ty
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cs < channels
    tl.store(mean_ptr + cs, tl.load(totals_ptr + cs, mask=mask, other=0) / tl.cast(count, acc_t), mask=mask)
    if ABS:
        flagged = tl.load(totals_ptr + channels + cs, mask=mask, other=0) > 0
        tl.store(negative_ptr + cs, flagged.to(tl.uint8), mask=mask)


def channel_sum_plan(x: torch.Tensor, channels_last: bool, rows: int, per_program: int | None = None,
                     flags: bool = False) -> PlanarChannelSumPlan | ChannelsLastChannelSumPlan:
    """The launch plan of the channel sums of x[:rows] (see :mod:`.launch_plans`); sizes are
    taken as their hints under torch.compile, so the plan guards nothing."""
    channels = x.shape[1]
    spatial = size_hint(x.numel()) // (size_hint(x.shape[0]) * channels)
    sums_size = 8 if x.dtype == torch.float64 else 4
    if channels_last:
        return channels_last_channel_sum_plan(size_hint(rows) * spatial, channels, per_program, flags=flags,
                                              element_size=sums_size)
    return planar_channel_sum_plan(size_hint(rows), channels, spatial, per_program, flags=flags,
                                   element_size=sums_size)


def _launch_channel_means(
    x: torch.Tensor, channels_last: bool, rows: int, mean: torch.Tensor, per_program: int | None = None,
    negative: torch.Tensor | None = None,
) -> PlanarChannelSumPlan | ChannelsLastChannelSumPlan:
    """Writes mean (C,) of x[:rows], or with ``negative`` (C,) uint8 the mean of |x[:rows]| and the
    flags of the channels that had a value < 0; returns the plan it launched. ``per_program``
    (elements per program) is for tests, to reach the split paths with small inputs."""
    channels = x.shape[1]
    spatial = x.numel() // (x.shape[0] * channels)
    count = rows * spatial
    plan = channel_sum_plan(x, channels_last, rows, per_program, flags=negative is not None)
    # The split count is recomputed from rows, so a symbolic batch size gives a symbolic grid; one
    # program per channel writes the mean itself only when that holds for every batch size.
    if channels_last:
        splits = triton.cdiv(count, plan.positions_per_split)
    else:
        splits = triton.cdiv(rows, plan.rows_per_split) * plan.spatial_splits
    final = isinstance(splits, int) and splits == 1
    abs_statistic = negative is not None
    flags = negative if abs_statistic else mean  # never read or written without ABS
    # Split sums go to a (splits, C) scratch, (splits, 2C) with the flags, added by a row sum.
    row_width = 2 * channels if abs_statistic else channels
    sums = mean if final else torch.empty((splits, row_width), dtype=mean.dtype, device=mean.device)
    if channels_last:
        wrap_triton(_channels_last_channel_sums_kernel)[(plan.channel_blocks, splits)](
            x, sums, flags, channels, count, plan.positions_per_split, count, FINAL=final,
            ABS=abs_statistic, BLOCK_C=plan.block_channels,
        )
    else:
        wrap_triton(_planar_channel_sums_kernel)[(channels, splits)](
            x, sums, flags, rows, channels, spatial, plan.rows_per_split, plan.segment,
            plan.spatial_splits, count, FINAL=final, ABS=abs_statistic, BLOCK_S=plan.block_positions,
        )
    if not final:
        totals = torch.empty((row_width,), dtype=mean.dtype, device=mean.device)
        launch_row_sums(sums, totals, 1, splits, row_width, plan=plan.finish)
        block = min(triton.next_power_of_2(channels), _FINISH_BLOCK)
        wrap_triton(_finish_channel_means_kernel)[(triton.cdiv(channels, block),)](
            totals, mean, flags, channels, count, ABS=abs_statistic, BLOCK=block,
        )
    return plan


def _parse_abs_statistic(statistic: str) -> bool:
    check(statistic in ("mean", "abs_mean"), f'statistic must be "mean" or "abs_mean", got "{statistic}"')
    return statistic == "abs_mean"


def _channel_mean(x: torch.Tensor, rows: int, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    abs_statistic = _parse_abs_statistic(statistic)
    readable, channels_last = _channel_input(x, rows)
    mean = torch.empty((x.shape[1],), dtype=accumulation_dtype(x.dtype), device=x.device)
    negative = torch.empty((x.shape[1] if abs_statistic else 0,), dtype=torch.bool, device=x.device)
    flags = negative.view(torch.uint8) if abs_statistic else None
    _launch_channel_means(readable, channels_last, rows, mean, negative=flags)
    return mean, negative


# ---------------------------------------------------------------------------------------------
# Weight transform (forward) and its backward: one program per output channel d
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_block(c0, t0, group_channels, taps, channel_stride, tap_stride, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Offsets, validity and channel indices of the (BLOCK_C, BLOCK_T) tile at (c0, t0) of a row."""
    cs = c0 + tl.arange(0, BLOCK_C)
    ts = t0 + tl.arange(0, BLOCK_T)
    channel_valid = cs < group_channels
    valid = channel_valid[:, None] & (ts < taps)[None, :]
    offsets = cs[:, None] * channel_stride + ts[None, :] * tap_stride
    return offsets, valid, cs, channel_valid


@triton.jit
def _tile_means(mean, c0, t0, group_channels, taps, PER_TAP: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """The means of the (BLOCK_C, BLOCK_T) tile at (c0, t0) in float64: (BLOCK_C, BLOCK_T) per tap
    (mean stored (c, t)), else (BLOCK_C, 1) channel means that broadcast over the taps."""
    cs = c0 + tl.arange(0, BLOCK_C)
    channel_valid = cs < group_channels
    if PER_TAP:
        ts = t0 + tl.arange(0, BLOCK_T)
        valid = channel_valid[:, None] & (ts < taps)[None, :]
        means = tl.load(mean + cs[:, None].to(tl.int64) * taps + ts[None, :], mask=valid, other=0)
    else:
        means = tl.load(mean + cs, mask=channel_valid, other=0)[:, None]
    return means.to(tl.float64)


@triton.jit
def _group_value_mass(mean, group_channels, taps, PER_TAP: tl.constexpr, BLOCK_C: tl.constexpr):
    """V_d: the sum of the means over a row's values (K times the channel means' sum), clamped
    away from zero, in the weight math's float64."""
    tiny = tl.full([], _FLOAT64_TINY, tl.float64)
    values = tl.cast(group_channels, tl.int64) * taps if PER_TAP else group_channels
    acc = tl.full([BLOCK_C], 0, tl.float64)
    for v0 in range(0, values, BLOCK_C):
        vs = v0 + tl.arange(0, BLOCK_C)
        acc += tl.load(mean + vs, mask=vs < values, other=0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    if not PER_TAP:
        total = total * taps
    return tl.where(total > tiny, total, tiny)


@triton.jit
def _exact_positive_mass(row, mean, shift, group_channels, taps, channel_stride, tap_stride,
                         PER_TAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """sum_ct mu_ct max(w_dct + shift, 0)."""
    acc_t = tl.float64
    acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)
    for c0 in range(0, group_channels, BLOCK_C):
        for t0 in range(0, taps, BLOCK_T):
            offsets, valid, cs, channel_valid = _row_block(
                c0, t0, group_channels, taps, channel_stride, tap_stride, BLOCK_C, BLOCK_T)
            mu = _tile_means(mean, c0, t0, group_channels, taps, PER_TAP, BLOCK_C, BLOCK_T)
            shifted = tl.load(row + offsets, mask=valid, other=0).to(acc_t) + shift
            acc += tl.where(valid & (shifted > 0), mu * shifted, 0)
    return tl.sum(acc)


@autotune(_ROW_CONFIGS, key=["BLOCK_C", "BLOCK_T", "PER_TAP"])
@triton.jit
def _equinorm_weight_kernel(
    weight_ptr, mean_ptr, gain_ptr, out_ptr, stats_ptr,
    group_channels, taps, outputs_per_group, channel_stride, tap_stride, exact, ratio_bits, eps_bits,
    PER_TAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[d] = gain_d * s_d * (w_d + b_d) and stats[d] = (b_d, s_d, P_d, V_d, used exact).

    Reads the row once for the sums of b_d and the one-pass P_d, once more for the exact P_d
    when the mode or a one-signed row asks for it, and once to write: all from L1/L2 after the
    first read. The math runs in float64 whatever the dtypes (csrc/shared/equinorm_math.h says why)."""
    d = tl.program_id(0).to(tl.int64)
    acc_t = stats_ptr.dtype.element_ty
    row_size = tl.cast(group_channels, tl.int64) * taps
    row = weight_ptr + d * row_size
    mean_values = tl.cast(group_channels, tl.int64) * taps if PER_TAP else group_channels
    mean = mean_ptr + (d // outputs_per_group) * mean_values
    value_mass = _group_value_mass(mean, group_channels, taps, PER_TAP, BLOCK_C)

    kernel_acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)      # mu w        -> sum_ct mu_ct w_dct
    positive_acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)    # mu w [w>0]  -> sum_ct mu_ct [w > 0] w
    count_acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)       # mu [w>0]    -> sum_ct mu_ct [w > 0]
    seen_positive = tl.full([BLOCK_C, BLOCK_T], 0, tl.int32)      # [mu > 0, w > 0]
    seen_non_positive = tl.full([BLOCK_C, BLOCK_T], 0, tl.int32)  # [mu > 0, w <= 0]
    for c0 in range(0, group_channels, BLOCK_C):
        for t0 in range(0, taps, BLOCK_T):
            offsets, valid, cs, channel_valid = _row_block(
                c0, t0, group_channels, taps, channel_stride, tap_stride, BLOCK_C, BLOCK_T)
            mu = _tile_means(mean, c0, t0, group_channels, taps, PER_TAP, BLOCK_C, BLOCK_T)
            w = tl.load(row + offsets, mask=valid, other=0).to(acc_t)
            positive = valid & (w > 0)
            kernel_acc += mu * w
            positive_acc += tl.where(positive, mu * w, 0)
            count_acc += tl.where(positive, mu, 0)
            seen = valid & (mu > 0)
            seen_positive += (seen & (w > 0)).to(tl.int32)
            seen_non_positive += (seen & (w <= 0)).to(tl.int32)
    kernel_sum = tl.sum(kernel_acc)
    positive_sum = tl.sum(positive_acc)
    positive_count = tl.sum(count_acc)
    shift = -kernel_sum / value_mass

    # The one-pass estimate needs weights of both signs on the inputs it sees; otherwise the exact P_d.
    one_signed = (tl.sum(seen_positive) == 0) | (tl.sum(seen_non_positive) == 0)
    use_exact = (exact != 0) | one_signed
    positive_mass = positive_sum + shift * positive_count
    if use_exact:
        positive_mass = _exact_positive_mass(
            row, mean, shift, group_channels, taps, channel_stride, tap_stride, PER_TAP, BLOCK_C, BLOCK_T)

    # A row with no positive mass (|w| = 2 max(w, 0) - w gives the absolute mass) gets scale 0.
    absolute_mass = 2 * positive_sum - kernel_sum
    degenerate = positive_mass <= float64_from_bits(eps_bits, acc_t) * absolute_mass
    safe_mass = tl.where(degenerate, 1, positive_mass)
    scale = tl.where(degenerate, 0, float64_from_bits(ratio_bits, acc_t) / safe_mass)

    factor = tl.load(gain_ptr + d).to(acc_t) * scale
    out = out_ptr + d * row_size
    out_t = out_ptr.dtype.element_ty
    for c0 in range(0, group_channels, BLOCK_C):
        for t0 in range(0, taps, BLOCK_T):
            offsets, valid, cs, channel_valid = _row_block(
                c0, t0, group_channels, taps, channel_stride, tap_stride, BLOCK_C, BLOCK_T)
            w = tl.load(row + offsets, mask=valid, other=0).to(acc_t)
            tl.store(out + offsets, cast_rounded(factor * (w + shift), out_t), mask=valid)

    stats = stats_ptr + d * 5
    tl.store(stats + 0, shift)
    tl.store(stats + 1, scale)
    tl.store(stats + 2, positive_mass)
    tl.store(stats + 3, value_mass)
    tl.store(stats + 4, tl.where(use_exact, 1, 0).to(acc_t))


@autotune(_ROW_CONFIGS, key=["BLOCK_C", "BLOCK_T", "PER_TAP"])
@triton.jit
def _equinorm_backward_kernel(
    grad_ptr, weight_ptr, mean_ptr, gain_ptr, stats_ptr, grad_weight_ptr, grad_gain_ptr, mean_terms_ptr,
    group_channels, taps, outputs_per_group, channel_stride, tap_stride,
    PER_TAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """For output channel d, with G = grad_out[d] and u = w + b_d: grad_weight[d], grad_gain[d] =
    s_d sum G u, and the row's terms of dL/dmu: mean_terms[d, (c, t)] = u h per tap (PER_TAP), or
    mean_terms[d, c] = g_P sum_t [active] u - g_b sum_t u / V_d, active = u > 0 (exact P_d) or
    w > 0 (one-pass). In float64, the dtype of stats and mean_terms."""
    d = tl.program_id(0).to(tl.int64)
    acc_t = stats_ptr.dtype.element_ty
    row_size = tl.cast(group_channels, tl.int64) * taps
    row = weight_ptr + d * row_size
    grad = grad_ptr + d * row_size
    mean_values = tl.cast(group_channels, tl.int64) * taps if PER_TAP else group_channels
    mean = mean_ptr + (d // outputs_per_group) * mean_values
    stats = stats_ptr + d * 5
    shift = tl.load(stats + 0)
    scale = tl.load(stats + 1)
    positive_mass = tl.load(stats + 2)
    value_mass = tl.load(stats + 3)
    exact = tl.load(stats + 4) != 0
    gain = tl.load(gain_ptr + d).to(acc_t)
    # Which values count as positive, as a threshold on w: u > 0 (exact) or w > 0 (one-pass).
    threshold = tl.where(exact, -shift, 0)

    shifted_acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)  # G u
    grad_acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)     # G
    active_acc = tl.full([BLOCK_C, BLOCK_T], 0, acc_t)   # mu [active]
    for c0 in range(0, group_channels, BLOCK_C):
        for t0 in range(0, taps, BLOCK_T):
            offsets, valid, cs, channel_valid = _row_block(
                c0, t0, group_channels, taps, channel_stride, tap_stride, BLOCK_C, BLOCK_T)
            mu = _tile_means(mean, c0, t0, group_channels, taps, PER_TAP, BLOCK_C, BLOCK_T)
            w = tl.load(row + offsets, mask=valid, other=0).to(acc_t)
            g = tl.load(grad + offsets, mask=valid, other=0).to(acc_t)
            shifted_acc += g * (w + shift)
            grad_acc += g
            active_acc += tl.where(valid & (w > threshold), mu, 0)
    grad_times_shifted = tl.sum(shifted_acc)
    grad_sum = tl.sum(grad_acc)
    active_count = tl.sum(active_acc)

    safe_mass = tl.where(scale == 0, 1, positive_mass)
    grad_mass = tl.where(scale == 0, 0, -gain * grad_times_shifted * scale / safe_mass)
    grad_shift = gain * scale * grad_sum + grad_mass * active_count
    tl.store(grad_gain_ptr + d, (scale * grad_times_shifted).to(grad_gain_ptr.dtype.element_ty))

    through_shift = grad_shift / value_mass  # dL/dw gets -through_shift * mu
    out_t = grad_weight_ptr.dtype.element_ty
    grad_weight = grad_weight_ptr + d * row_size
    terms = mean_terms_ptr + d * mean_values
    for c0 in range(0, group_channels, BLOCK_C):
        term = tl.full([BLOCK_C], 0, acc_t)
        for t0 in range(0, taps, BLOCK_T):
            offsets, valid, cs, channel_valid = _row_block(
                c0, t0, group_channels, taps, channel_stride, tap_stride, BLOCK_C, BLOCK_T)
            mu = _tile_means(mean, c0, t0, group_channels, taps, PER_TAP, BLOCK_C, BLOCK_T)
            w = tl.load(row + offsets, mask=valid, other=0).to(acc_t)
            g = tl.load(grad + offsets, mask=valid, other=0).to(acc_t)
            active = valid & (w > threshold)
            value = gain * scale * g + tl.where(active, grad_mass * mu, 0) - through_shift * mu
            tl.store(grad_weight + offsets, cast_rounded(value, out_t), mask=valid)
            u = w + shift
            contribution = tl.where(active, grad_mass * u, 0) - tl.where(valid, u, 0) * through_shift
            if PER_TAP:
                ts = t0 + tl.arange(0, BLOCK_T)
                tl.store(terms + cs[:, None].to(tl.int64) * taps + ts[None, :], contribution, mask=valid)
            else:
                term += tl.sum(contribution, axis=1)
        if not PER_TAP:
            cs = c0 + tl.arange(0, BLOCK_C)
            tl.store(terms + cs, term, mask=cs < group_channels)


def _launch_weight_transform(weight, g: _WeightGeometry, mean, gain, out, stats, ratio, exact, eps) -> None:
    block_c, block_t = _row_tile(g)
    wrap_triton(_equinorm_weight_kernel)[(g.out_channels,)](
        weight, mean, gain, out, stats,
        g.group_channels, g.taps, g.outputs_per_group, g.channel_stride, g.tap_stride, int(exact),
        float64_bits(ratio), float64_bits(eps),
        PER_TAP=mean.dim() >= 2, BLOCK_C=block_c, BLOCK_T=block_t,
    )


def _weight_transform(weight, mean, gain, ratio, groups, exact, eps):
    """Checks, allocates and launches the weight transform: (out, stats)."""
    readable, g = _weight_input(weight, groups)
    _check_mean_and_gain(weight, g, mean, gain)
    _check_ratio_and_eps(ratio, eps)
    out = _empty_like_weight(weight, g, weight.dtype)
    stats = torch.empty((g.out_channels, STATS_COLUMNS), dtype=WEIGHT_MATH_DTYPE, device=weight.device)
    _launch_weight_transform(readable, g, mean.contiguous(), gain.contiguous(), out, stats, ratio, exact, eps)
    return out, stats


def _weight_backward(grad_out, weight, mean, gain, stats, groups):
    """Checks, allocates and launches the backward: the row kernel, then the sum over output channels."""
    readable, g = _weight_input(weight, groups)
    per_tap = _check_mean_and_gain(weight, g, mean, gain)
    acc = accumulation_dtype(weight.dtype)
    check(
        stats.dim() == 2 and stats.shape[0] == g.out_channels and stats.shape[1] == STATS_COLUMNS,
        f"stats must have shape ({g.out_channels}, {STATS_COLUMNS}), got {tuple(stats.shape)}",
    )
    check(stats.dtype == WEIGHT_MATH_DTYPE, f"stats must be float64 (the precision of the weight math), got {stats.dtype}")
    check(stats.device == weight.device, f"stats is on {stats.device} but weight is on {weight.device}")
    check(
        grad_out.shape == weight.shape and grad_out.dtype == weight.dtype,
        f"grad_out must match weight ({tuple(weight.shape)}, {weight.dtype}), got "
        f"{tuple(grad_out.shape)}, {grad_out.dtype}",
    )
    check_device(grad_out, "grad_out")
    grad = grad_out.contiguous(memory_format=g.memory_format)
    grad_weight = _empty_like_weight(weight, g, weight.dtype)
    grad_gain = torch.empty((g.out_channels,), dtype=acc, device=weight.device)
    values_per_group = g.group_channels * g.taps if per_tap else g.group_channels
    grad_mean = torch.empty(mean.shape, dtype=WEIGHT_MATH_DTYPE, device=weight.device)
    mean_terms = torch.empty((g.out_channels, values_per_group), dtype=WEIGHT_MATH_DTYPE, device=weight.device)
    block_c, block_t = _row_tile(g)
    wrap_triton(_equinorm_backward_kernel)[(g.out_channels,)](
        grad, readable, mean.contiguous(), gain.contiguous(), stats.contiguous(), grad_weight, grad_gain, mean_terms,
        g.group_channels, g.taps, g.outputs_per_group, g.channel_stride, g.tap_stride,
        PER_TAP=per_tap, BLOCK_C=block_c, BLOCK_T=block_t,
    )
    # dL/dmu_j: the sum over the output channels of j's group, split over chunks of them.
    launch_row_sums(mean_terms, grad_mean.view(-1), g.groups, g.outputs_per_group, values_per_group)
    return grad_weight, grad_mean, grad_gain


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

@define_op("triton_channel_mean")
def triton_channel_mean(x: torch.Tensor, rows: int, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) means of x[:rows] (of |x[:rows]| for "abs_mean") over every dim but 1, in the
    accumulation dtype, and with "abs_mean" (C,) bool, the channels that had a value < 0 (with
    "mean" an empty tensor)."""
    with on_device(x):
        return _channel_mean(x, rows, statistic)


@define_op("triton_equinorm_weight")
def triton_equinorm_weight(
    weight: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor, ratio: float, groups: int, mode: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """w'' = gain_d * s_d * (w + b_d) in weight's dtype and layout, and stats (D, 5)."""
    with on_device(weight):
        return _weight_transform(weight, mean, gain, ratio, groups, _parse_exact_mode(mode), eps)


@define_op("triton_equinorm_forward")
def triton_equinorm_forward(
    x: torch.Tensor, rows: int, weight: torch.Tensor, gain: torch.Tensor, ratio: float, groups: int, mode: str,
    eps: float, statistic: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """channel_mean(x, rows, statistic) and the weight transform with it: (w'', mean, stats, negative)."""
    exact = _parse_exact_mode(mode)
    check(
        accumulation_dtype(x.dtype) == accumulation_dtype(weight.dtype),
        f"x ({x.dtype}) and weight ({weight.dtype}) must share an accumulation dtype: both float64 or neither",
    )
    with on_device(weight):
        mean, negative = _channel_mean(x, rows, statistic)
        out, stats = _weight_transform(weight, mean, gain, ratio, groups, exact, eps)
    return out, mean, stats, negative


@define_op("triton_equinorm_backward")
def triton_equinorm_backward(
    grad_out: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor, stats: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_weight in weight's dtype and layout, grad_mean (C,) float64, grad_gain (D,)) from dL/dw''."""
    with on_device(weight):
        return _weight_backward(grad_out, weight, mean, gain, stats, groups)
