"""tap_mean in Triton: per-tap input means of a convolution, and the backward's input plane.

The ops ``triton_tap_mean`` and ``triton_tap_mean_backward`` have the signatures and semantics
of the compiled ops (csrc/ops.cpp, csrc/cpu/tap_mean.cpp; the count formula of
csrc/shared/tap_mean_math.h is written once more here, in :func:`_tap_reads`).

    forward   x[:rows] read once as a (rows, width) matrix (width = C * plane, NCHW or
              channels_last order) and summed over its rows into S (|x| and per-column
              negative flags for abs_mean): one launch per column block and row split, plus one
              that adds the splits in order when there are several. Then one program per
              (channel, tap) adds S over the plane weighted by the tap's read counts.
    backward  one program per (channel, block of plane positions): the sum over the taps of
              grad[c, t] times the counts, divided by rows * outputs.

Launches: forward 2 (3 when the rows are split), backward 1. Every sum has a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._tap_geometry import parse_geometry_spec
from ._runtime import accumulation_dtype, check, check_device, define_op, on_device, wrap_triton
from .equinorm import _channel_input
from .launch_plans import tap_column_sum_plan

_PADDING_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
_DIMS = 3
_PLANE_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Arguments (csrc/tap_geometry.h)
# ---------------------------------------------------------------------------------------------

def _tap_dims(spatial, kernel_size, stride, padding, dilation, padding_mode) -> tuple[list[tuple[int, ...]], int]:
    """Per dim (length, kernel, stride, dilation, before, outputs), three dims (leading ones of
    length 1 for Conv1d/2d inputs), and the padding mode's number."""
    n = len(spatial)
    check(1 <= n <= _DIMS, f"x must have 1 to 3 spatial dims, got {n}")
    check(
        len(kernel_size) == n and len(stride) == n and len(dilation) == n and len(padding) == 2 * n,
        f"kernel_size, stride and dilation need {n} values and padding {2 * n} (before, after per dim)",
    )
    check(padding_mode in _PADDING_MODES,
          f'padding_mode must be "zeros", "reflect", "replicate" or "circular", got "{padding_mode}"')
    dims = [(1, 1, 1, 1, 0, 1)] * (_DIMS - n)
    for i in range(n):
        length, k, s, d = int(spatial[i]), kernel_size[i], stride[i], dilation[i]
        before, after = padding[2 * i], padding[2 * i + 1]
        check(length >= 1, f"x must have a non-empty spatial extent, got {list(spatial)}")
        check(k >= 1 and s >= 1 and d >= 1,
              f"kernel_size, stride and dilation must be >= 1, got {kernel_size}, {stride}, {dilation}")
        check(before >= 0 and after >= 0, f"padding must be >= 0, got {padding}")
        check(padding_mode != "reflect" or max(before, after) < length,
              f'padding must be smaller than the input size for padding_mode "reflect", got {padding}')
        check(padding_mode != "circular" or max(before, after) <= length,
              f'padding must be at most the input size for padding_mode "circular", got {padding}')
        check(length + before + after >= d * (k - 1) + 1,
              f"kernel_size {kernel_size} (dilation {dilation}) is larger than the padded input")
        outputs = (length + before + after - d * (k - 1) - 1) // s + 1
        dims.append((length, k, s, d, before, outputs))
    return dims, _PADDING_MODES[padding_mode]


def _dim_arguments(dims) -> list[int]:
    return [value for dim in dims for value in dim]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grid_points_in(low, high, first, stride, outputs):
    """How many of first, first + stride, ..., first + (outputs - 1) * stride lie in [low, high]."""
    low = tl.maximum(low, first)
    high = tl.minimum(high, first + (outputs - 1) * stride)
    inside = low <= high
    # Both quotients are of non-negative values where the result is used.
    count = tl.where(inside, high - first, 0) // stride - (tl.where(inside, low - first, 0) + stride - 1) // stride + 1
    return tl.where(inside, count, 0)


@triton.jit
def _tap_reads(j, t, length, stride, dilation, before, outputs, MODE: tl.constexpr):
    """Output positions at which tap t of one dim reads input position j (tap_reads in csrc/shared)."""
    first = t * dilation - before
    last_input = length - 1
    reads = _grid_points_in(j, j, first, stride, outputs)
    if MODE == 1:  # reflect
        reads += tl.where(j > 0, _grid_points_in(-j, -j, first, stride, outputs), 0)
        mirrored = 2 * last_input - j
        reads += tl.where(j < last_input, _grid_points_in(mirrored, mirrored, first, stride, outputs), 0)
    elif MODE == 2:  # replicate
        reads += tl.where(j == 0, _grid_points_in(first, -1, first, stride, outputs), 0)
        last = first + (outputs - 1) * stride
        reads += tl.where(j == last_input, _grid_points_in(length, last, first, stride, outputs), 0)
    elif MODE == 3:  # circular
        reads += _grid_points_in(j - length, j - length, first, stride, outputs)
        reads += _grid_points_in(j + length, j + length, first, stride, outputs)
    return reads


@triton.jit
def _column_sums_kernel(x_ptr, sums_ptr, negative_ptr, rows, width, rows_per_split,
                        ABSOLUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program (b, k): columns [b * BLOCK_W, ...) of x summed over rows [k * rows_per_split, ...)
    into sums[k, columns] (|x| and negative[k, columns] = any x < 0 when ABSOLUTE)."""
    split = tl.program_id(1)
    acc_t = sums_ptr.dtype.element_ty
    columns = tl.program_id(0).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    column_mask = columns < width
    row_stride = tl.cast(width, tl.int64)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, rows)
    offsets = tl.arange(0, BLOCK_R)
    acc = tl.full([BLOCK_R, BLOCK_W], 0, acc_t)
    negative = tl.full([BLOCK_R, BLOCK_W], 0, tl.int8)
    for r0 in range(first, last, BLOCK_R):
        r = r0 + offsets
        mask = (r < last)[:, None] & column_mask[None, :]
        values = tl.load(x_ptr + r.to(tl.int64)[:, None] * row_stride + columns[None, :], mask=mask, other=0)
        values = values.to(acc_t)
        if ABSOLUTE:
            negative = tl.maximum(negative, (values < 0).to(tl.int8))
            values = tl.abs(values)
        acc += values
    out = split.to(tl.int64) * row_stride + columns
    tl.store(sums_ptr + out, tl.sum(acc, axis=0), mask=column_mask)
    if ABSOLUTE:
        tl.store(negative_ptr + out, tl.max(negative, axis=0), mask=column_mask)


@triton.jit
def _finish_columns_kernel(sums_ptr, negative_ptr, plane_ptr, plane_negative_ptr, width, splits,
                           ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr):
    """S[j] = sums[0, j] + sums[1, j] + ..., in split order (and the negative flags or-ed)."""
    acc_t = plane_ptr.dtype.element_ty
    columns = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < width
    row_stride = tl.cast(width, tl.int64)
    total = tl.full([BLOCK], 0, acc_t)
    negative = tl.full([BLOCK], 0, tl.int8)
    for k in range(splits):
        total += tl.load(sums_ptr + k * row_stride + columns, mask=mask, other=0)
        if ABSOLUTE:
            negative = tl.maximum(negative, tl.load(negative_ptr + k * row_stride + columns, mask=mask, other=0))
    tl.store(plane_ptr + columns, total, mask=mask)
    if ABSOLUTE:
        tl.store(plane_negative_ptr + columns, negative, mask=mask)


@triton.jit
def _plane_index(c, p, channels, plane, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        index = p.to(tl.int64) * channels + c
    else:
        index = tl.cast(c, tl.int64) * plane + p
    return index


@triton.jit
def _tap_sums_kernel(
    plane_ptr, plane_negative_ptr, mean_ptr, flags_ptr, channels, plane, count,
    length0, kernel0, stride0, dilation0, before0, outputs0,
    length1, kernel1, stride1, dilation1, before1, outputs1,
    length2, kernel2, stride2, dilation2, before2, outputs2,
    MODE: tl.constexpr, ABSOLUTE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (c, t): mean[c, t] = sum over the plane of S[c, j] times tap t's read counts of j,
    divided by count; program (c, 0) also writes whether channel c had a negative value."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    acc_t = mean_ptr.dtype.element_ty
    t2 = t % kernel2
    t1 = (t // kernel2) % kernel1
    t0 = t // (kernel2 * kernel1)
    positions = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0, acc_t)
    negative = tl.full([BLOCK], 0, tl.int8)
    for p0 in range(0, plane, BLOCK):
        p = p0 + positions
        mask = p < plane
        j2 = p % length2
        j1 = (p // length2) % length1
        j0 = p // (length2 * length1)
        reads = _tap_reads(j0, t0, length0, stride0, dilation0, before0, outputs0, MODE)
        reads *= _tap_reads(j1, t1, length1, stride1, dilation1, before1, outputs1, MODE)
        reads *= _tap_reads(j2, t2, length2, stride2, dilation2, before2, outputs2, MODE)
        index = _plane_index(c, p, channels, plane, CHANNELS_LAST)
        values = tl.load(plane_ptr + index, mask=mask & (reads != 0), other=0)
        acc += reads.to(acc_t) * values
        if ABSOLUTE:
            negative = tl.maximum(negative, tl.load(plane_negative_ptr + index, mask=mask, other=0))
    taps = kernel0 * kernel1 * kernel2
    tl.store(mean_ptr + tl.cast(c, tl.int64) * taps + t, tl.sum(acc) / tl.cast(count, acc_t))
    if ABSOLUTE:
        if t == 0:
            tl.store(flags_ptr + c, tl.max(negative))


@triton.jit
def _tap_grad_kernel(
    grad_ptr, out_ptr, plane, count,
    length0, kernel0, stride0, dilation0, before0, outputs0,
    length1, kernel1, stride1, dilation1, before1, outputs1,
    length2, kernel2, stride2, dilation2, before2, outputs2,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (c, b): out[c, j] = sum over taps t (in order) of grad[c, t] times tap t's read
    counts of j, divided by count, for plane positions j in block b."""
    c = tl.program_id(0)
    acc_t = out_ptr.dtype.element_ty
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < plane
    j2 = p % length2
    j1 = (p // length2) % length1
    j0 = p // (length2 * length1)
    taps = kernel0 * kernel1 * kernel2
    acc = tl.full([BLOCK], 0, acc_t)
    for t in range(0, taps):
        t2 = t % kernel2
        t1 = (t // kernel2) % kernel1
        t0 = t // (kernel2 * kernel1)
        reads = _tap_reads(j0, t0, length0, stride0, dilation0, before0, outputs0, MODE)
        reads *= _tap_reads(j1, t1, length1, stride1, dilation1, before1, outputs1, MODE)
        reads *= _tap_reads(j2, t2, length2, stride2, dilation2, before2, outputs2, MODE)
        acc += reads.to(acc_t) * tl.load(grad_ptr + tl.cast(c, tl.int64) * taps + t)
    tl.store(out_ptr + tl.cast(c, tl.int64) * plane + p, acc / tl.cast(count, acc_t), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _column_sums(readable: torch.Tensor, rows: int, width: int, absolute: bool, splits: int | None = None):
    """S (width,) and its negative flags (int8, width) from x[:rows] seen as (rows, width);
    ``splits`` (row splits) is for tests only."""
    acc = accumulation_dtype(readable.dtype)
    plan = tap_column_sum_plan(rows, width, splits)
    splits, per_split = plan.splits, plan.rows_per_split
    plane = torch.empty((width,), dtype=acc, device=readable.device)
    plane_negative = torch.zeros((width,), dtype=torch.int8, device=readable.device)
    sums = plane if splits == 1 else torch.empty((splits, width), dtype=acc, device=readable.device)
    negative = plane_negative if splits == 1 else torch.zeros((splits, width), dtype=torch.int8, device=readable.device)
    wrap_triton(_column_sums_kernel)[(plan.column_blocks, splits)](
        readable, sums, negative, rows, width, per_split, ABSOLUTE=absolute, BLOCK_R=plan.block_rows,
        BLOCK_W=plan.block_columns,
    )
    if splits > 1:
        block = 1024
        wrap_triton(_finish_columns_kernel)[(triton.cdiv(width, block),)](
            sums, negative, plane, plane_negative, width, splits, ABSOLUTE=absolute, BLOCK=block,
        )
    return plane, plane_negative


def _tap_mean(x, rows, kernel_size, stride, padding, dilation, padding_mode, absolute, splits=None):
    readable, channels_last = _channel_input(x, rows)
    dims, mode = _tap_dims(x.shape[2:], kernel_size, stride, padding, dilation, padding_mode)
    channels = x.shape[1]
    plane_size = readable.numel() // (x.shape[0] * channels)
    sums, negative_columns = _column_sums(readable, rows, channels * plane_size, absolute, splits)
    taps = dims[0][1] * dims[1][1] * dims[2][1]
    outputs = dims[0][5] * dims[1][5] * dims[2][5]
    mean = torch.empty((channels, *kernel_size), dtype=sums.dtype, device=x.device)
    flags = torch.zeros((channels,), dtype=torch.int8, device=x.device)
    wrap_triton(_tap_sums_kernel)[(channels, taps)](
        sums, negative_columns, mean, flags, channels, plane_size, rows * outputs, *_dim_arguments(dims),
        MODE=mode, ABSOLUTE=absolute, CHANNELS_LAST=channels_last,
        BLOCK=min(_PLANE_BLOCK, triton.next_power_of_2(plane_size)),
    )
    return mean, flags != 0


@define_op("triton_tap_mean")
def triton_tap_mean(x: torch.Tensor, rows: int, geometry: str, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, *kernel_size) per-tap means of x[:rows] in the accumulation dtype, and (C,) bool:
    the channels with a negative value (set for abs_mean only). ``geometry``: see
    :func:`equinorm_kernels._tap_geometry.geometry_spec`."""
    with on_device(x):
        return _tap_mean(x, rows, *parse_geometry_spec(geometry), absolute)


@define_op("triton_tap_mean_backward")
def triton_tap_mean_backward(grad: torch.Tensor, spatial: list[int], rows: int, geometry: str) -> torch.Tensor:
    """The (C, *spatial) gradient of every sample that fed the means, from grad (C, *kernel_size)."""
    kernel_size, stride, padding, dilation, padding_mode = parse_geometry_spec(geometry)
    check_device(grad, "grad")
    check(grad.dtype in (torch.float32, torch.float64),
          f"grad must be float32 or float64 (the accumulation dtype), got {grad.dtype}")
    check(grad.dim() == len(kernel_size) + 1 and list(grad.shape[1:]) == list(kernel_size),
          f"grad must have shape (C, *kernel_size) with kernel_size {list(kernel_size)}, got {tuple(grad.shape)}")
    check(rows >= 1, f"rows must be >= 1, got {rows}")
    dims, mode = _tap_dims(spatial, kernel_size, stride, padding, dilation, padding_mode)
    grad = grad.contiguous()
    channels = grad.shape[0]
    plane_size = dims[0][0] * dims[1][0] * dims[2][0]
    outputs = dims[0][5] * dims[1][5] * dims[2][5]
    out = torch.empty((channels, *spatial), dtype=grad.dtype, device=grad.device)
    block = min(_PLANE_BLOCK, triton.next_power_of_2(plane_size))
    with on_device(grad):
        wrap_triton(_tap_grad_kernel)[(channels, triton.cdiv(plane_size, block))](
            grad, out, plane_size, rows * outputs, *_dim_arguments(dims), MODE=mode, BLOCK=block,
        )
    return out
