"""Per-tap input means of a convolution in plain PyTorch ops: the specification of ``tap_mean``.

For input channel c and kernel tap t of a convolution (kernel_size, stride, padding, dilation,
padding_mode as nn.Conv1d/2d/3d), mu_ct is the mean, over the samples x[:rows] and the output
positions, of the input value that tap t multiplies: zero where it reads zero padding, the padded
value for "reflect", "replicate" and "circular". It is linear in x and the same index map for every
sample, so the samples' sum

    S_c = sum_n x[n, c]              (|x[n, c]| for statistic="abs_mean")    a (C, *spatial) plane

is all the taps need: pad S with the padding mode, then tap t's value is the sum of the padded
plane over the strided sub-grid that tap reads, divided by rows * prod(output spatial).

Differentiable by autograd; the gradient of |x| counts sign(0) as +1 (so on non-negative inputs
both statistics have identical gradients).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .. import _checks, _tap_geometry
from .._tap_geometry import TapGeometry


def _signs(x: torch.Tensor) -> torch.Tensor:
    """-1 where x < 0, +1 elsewhere (zero included): d|x|/dx as tap_mean defines it."""
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def padded_plane(plane: torch.Tensor, geometry: TapGeometry) -> torch.Tensor:
    """plane (C, *spatial) padded as nn.Conv pads its input for ``geometry.padding_mode``."""
    pads = [p for before_after in reversed(geometry.padding_pairs()) for p in before_after]  # last dim first
    mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
    return F.pad(plane.unsqueeze(0), pads, mode=mode).squeeze(0)


def tap_mean_unchecked(x: torch.Tensor, stats_fraction: float, geometry: TapGeometry) -> torch.Tensor:
    rows = _checks.stats_rows(x.shape[0], stats_fraction)
    sample = x if rows == x.shape[0] else x[:rows]
    if geometry.absolute:
        sample = sample * _signs(sample.detach())
    plane = sample.sum(dim=0, dtype=_tap_geometry.accumulation_dtype(x))  # S: (C, *spatial)
    padded = padded_plane(plane, geometry)
    outputs = _tap_geometry.tap_output_shape(x.shape[2:], geometry)
    spatial_dims = tuple(range(1, x.dim() - 1))
    sums = []
    for tap in itertools.product(*(range(k) for k in geometry.kernel_size)):
        grid = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, geometry.dilation, outputs, geometry.stride)
        )
        sums.append(padded[(slice(None), *grid)].sum(dim=spatial_dims))
    taps = torch.stack(sums, dim=-1).reshape(x.shape[1], *geometry.kernel_size)
    return taps / (rows * math.prod(outputs))


def tap_mean(
    x: torch.Tensor,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    padding_mode: str = "zeros",
    *,
    stats_fraction: float = 1.0,
    statistic: str = "mean",
) -> torch.Tensor:
    """Per-tap means of the values a convolution's taps multiply (see the module docstring).

    Args:
        x: (N, C, *spatial) with 1 to 3 spatial dims, float16/bfloat16/float32/float64, any layout.
        kernel_size, stride, padding, dilation, padding_mode: as nn.Conv1d/2d/3d takes them.
        stats_fraction: only the first ceil(stats_fraction * N) samples are averaged (0 < f <= 1).
        statistic: "mean" (the values) or "abs_mean" (their absolute values).

    Returns:
        (C, *kernel_size), float32 (float64 for float64 ``x``); differentiable in ``x``.
    """
    geometry, stats_fraction = _tap_geometry.check_tap_mean_args(
        x, kernel_size, stride, padding, dilation, padding_mode, stats_fraction, statistic
    )
    return tap_mean_unchecked(x, stats_fraction, geometry)
