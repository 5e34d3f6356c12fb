"""The public EquiNorm functions: validate, then run the selected backend.

Same semantics as :mod:`equinorm_kernels.reference`, plus a ``backend`` argument ("auto" picks the
fastest backend available for the tensor's device) and the data checks of
:func:`equinorm_kernels.set_value_checks` (on CUDA they run on the device and report later:
see :mod:`equinorm_kernels._value_checks`).
"""
from __future__ import annotations

import torch

from . import _checks, _tap_geometry, _value_checks
from .backends import resolve_backend


def channel_mean(
    x: torch.Tensor, *, stats_fraction: float = 1.0, statistic: str = "mean", backend: str = "auto"
) -> torch.Tensor:
    """Per-channel mean of ``x`` (or of ``|x|``) over every dim but dim 1.

    Args:
        x: (N, C, *spatial) or (N, C), float16/bfloat16/float32/float64, NCHW or channels_last.
        stats_fraction: only the first ceil(stats_fraction * N) samples are averaged (0 < f <= 1).
        statistic: "mean" (default) or "abs_mean", the mean of |x| (EquiNorm's statistic for signed
            inputs): on non-negative ``x`` the same bits as "mean", and the same gradient (sign(0)
            counts as +1).
        backend: "auto" or a name from :func:`equinorm_kernels.available_backends`.

    Returns:
        (C,) float32 (float64 for float64 ``x``) with float32 accumulation for float16/bfloat16;
        differentiable in ``x``.

    Raises:
        ValueError: bad shapes or arguments, or (value checks on) NaN/Inf in ``x`` or a channel
            whose mean overflows (for CUDA tensors reported by a later call or
            :func:`equinorm_kernels.check_values`).
    """
    stats_fraction = _checks.check_channel_mean_args(x, stats_fraction)
    _checks.check_statistic(statistic)
    mean = resolve_backend(backend, x.device).channel_mean(x, stats_fraction, statistic)
    if _checks.value_checks_active():
        _value_checks.check_channel_mean(mean, _statistics_rows(x, stats_fraction))
    return mean


def _statistics_rows(x: torch.Tensor, stats_fraction: float) -> torch.Tensor:
    """The samples of x that fed its channel means (x itself, or a view of its first rows)."""
    rows = _checks.stats_rows(x.shape[0], stats_fraction)
    return x if rows == x.shape[0] else x[:rows]


def equinorm_weight(
    weight: torch.Tensor,
    mean: torch.Tensor,
    *,
    ratio: float = 1.0,
    groups: int = 1,
    mode: str = "single_pass",
    gain: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """The EquiNorm-rescaled weight w'' = gain_d * ratio / P_d * (w + b_d).

    Args:
        weight: (D, C/groups, *kernel) or (D, C) for Linear; any float dtype and memory format.
        mean: (C,) non-negative per-input-channel means (batch statistics or a running mean), or
            (C, *kernel) per-tap means (then ``ratio`` must be 1).
        ratio: rho = prod(spatial_out) * prod(stride) / prod(spatial_in) (1 for Linear), in
            [2**-63, 2**63].
        groups: convolution groups.
        mode: "single_pass" (default, the paper's experiments) or "exact".
        gain: optional (D,) gain folded into the result.
        eps: relative threshold of the positive mass P_d below which an output channel gets a zero
            weight (see :mod:`equinorm_kernels.reference`).
        backend: "auto" or a name from :func:`equinorm_kernels.available_backends`.

    Returns:
        Tensor of ``weight``'s shape, dtype and memory format, computed in float32 (float64 if any
        operand is float64); differentiable in ``weight``, ``mean`` and ``gain``.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices or arguments; (value checks on) NaN/Inf
        in any operand or a negative channel mean (for CUDA tensors reported by a later call or
        :func:`equinorm_kernels.check_values`).
    """
    _checks.check_equinorm_weight_args(weight, mean, ratio, groups, mode, gain, eps)
    if _checks.value_checks_active():
        _value_checks.check_weight_operands(weight, mean, gain)
    impl = resolve_backend(backend, weight.device)
    return impl.equinorm_weight(weight, mean, float(ratio), groups, mode, gain, float(eps))


def equinorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stats_fraction: float = 1.0,
    ratio: float = 1.0,
    groups: int = 1,
    mode: str = "single_pass",
    gain: torch.Tensor | None = None,
    eps: float = 1e-5,
    statistic: str = "abs_mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel means of ``x`` and the EquiNorm-rescaled weight built from them, in one call.

    What the layers run in training: ``equinorm_weight(weight, channel_mean(x), ...)`` fused into
    one read of ``x`` and one pass over ``weight`` on the compiled and Triton backends.

    Args:
        x: the layer input (N, C, *spatial) or (N, C); any float dtype, NCHW or channels_last.
        weight, ratio, groups, mode, gain, eps, backend: as :func:`equinorm_weight`.
        stats_fraction: only the first ceil(stats_fraction * N) samples feed the means.
        statistic: "abs_mean" (default): the means of |x|, valid for inputs of any sign, and on
            non-negative inputs bit-identical to "mean" (values and gradients); "mean": the
            paper's statistic, an error when a channel mean is negative.

    Returns:
        ``(w'', mean)``: w'' as :func:`equinorm_weight` returns it, differentiable in ``x``,
        ``weight`` and ``gain``; mean (C,) float32 (float64 for float64 operands), not
        differentiable (it is for running statistics).

    Raises:
        ValueError / TypeError: as :func:`channel_mean` and :func:`equinorm_weight` (with
            statistic="mean", a negative channel mean of ``x``).
    """
    stats_fraction = _checks.check_equinorm_forward_args(x, stats_fraction, weight, ratio, groups, mode, gain, eps)
    _checks.check_statistic(statistic)
    return checked_equinorm_forward(x, weight, stats_fraction, float(ratio), groups, mode, gain, float(eps), statistic,
                                    backend)


def checked_equinorm_forward(
    x: torch.Tensor, weight: torch.Tensor, stats_fraction: float, ratio: float, groups: int, mode: str,
    gain: torch.Tensor | None, eps: float, statistic: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`equinorm_forward` once its arguments are known to be valid: the layers validate
    their options when built and their input at each call, so they skip the argument checks (a
    layer call's host time); the value checks still run."""
    impl = resolve_backend(backend, weight.device)
    checks = _checks.value_checks_active()
    passed = None
    if checks and impl.equinorm_forward_screened is not None and not _value_checks.deferred(weight.device):
        # The screen on the kernels' side of the call (no extra ATen calls); the checks below name
        # the culprit only when it fails.
        out, mean, passed = impl.equinorm_forward_screened(
            x, stats_fraction, weight, ratio, groups, mode, gain, eps, statistic
        )
    else:
        out, mean = impl.equinorm_forward(x, stats_fraction, weight, ratio, groups, mode, gain, eps, statistic)
    if checks and not passed:
        _value_checks.check_weight_operands(
            weight, mean, gain, sample=_statistics_rows(x, stats_fraction), out=out, statistic=statistic
        )
    return out, mean.detach()


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
    backend: str = "auto",
) -> torch.Tensor:
    """Per-tap input means of a convolution: for input channel c and kernel tap t, the mean over
    the samples x[:rows] and the output positions of the input value that tap t multiplies.

    The value is zero where the tap reads zero padding, and the padded value for "reflect",
    "replicate" and "circular", as nn.Conv1d/2d/3d pads. With stride 1, circular padding of
    (k - 1) / 2 and odd kernels every tap's mean is the channel mean. One read of ``x``: the
    samples' sum (C, *spatial) is all the taps need (see :mod:`equinorm_kernels.reference.tap_statistics`).

    Args:
        x: (N, C, *spatial) with 1 to 3 spatial dims (a Conv1d/2d/3d input), float16/bfloat16/
            float32/float64, NCHW or channels_last.
        kernel_size, stride, dilation: an int or one int per spatial dim, as nn.Conv takes them.
        padding: an int, one int per spatial dim, "same" (stride 1 only) or "valid".
        padding_mode: "zeros", "reflect", "replicate" or "circular".
        stats_fraction: only the first ceil(stats_fraction * N) samples are averaged (0 < f <= 1).
        statistic: "mean" (the values) or "abs_mean" (their absolute values; the gradient counts
            sign(0) as +1).
        backend: "auto" or a name from :func:`equinorm_kernels.available_backends`.

    Returns:
        (C, *kernel_size), float32 (float64 for float64 ``x``), accumulated in that dtype;
        differentiable in ``x``.

    Raises:
        ValueError / TypeError: bad shapes or arguments (a kernel larger than the padded input,
            padding beyond what the padding mode allows, unknown padding_mode or statistic), or
            (value checks on) NaN/Inf in ``x`` or an overflowing mean.
    """
    geometry, stats_fraction = _tap_geometry.check_tap_mean_args(
        x, kernel_size, stride, padding, dilation, padding_mode, stats_fraction, statistic
    )
    impl = resolve_backend(backend, x.device)
    run = impl.tap_mean if impl.tap_mean is not None else resolve_backend("reference", x.device).tap_mean
    taps = run(x, stats_fraction, geometry)
    if _checks.value_checks_active():
        _value_checks.check_channel_mean(taps, _statistics_rows(x, stats_fraction))
    return taps
