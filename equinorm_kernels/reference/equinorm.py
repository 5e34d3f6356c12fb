"""EquiNorm in plain PyTorch ops: the specification every fused kernel is tested against.

Everything here is differentiable by autograd: gradients reach the weight, the gain and, through
the channel means, the layer input. The equations (per-element means form of the paper's sums):

    mu_c = mean of x over every dim but 1 (statistic "abs_mean": mean of |x|, the input's L1 mass per
           element, for signed inputs); mu_ct = mu_c for every kernel tap t, or a per-tap mean
           (tap_mean: the mean of the input value tap t multiplies, exact under padding and stride)
    V_d  = sum_ct mu_ct                            (K M_d for channel means, M_d = sum_c mu_c)
    b_d  = -sum_ct mu_ct w_dct / V_d               u = w + b_d
    P_d  = sum_ct mu_ct max(u_dct, 0)                              ("exact")
    P_d  = sum_ct mu_ct [w_dct > 0] (w_dct + b_d)                  ("single_pass")
    w''  = gain_d * ratio / P_d * u

Edge cases (the paper leaves them open):
- single_pass: when every weight of an output channel that meets a positive channel mean has one
  sign, the one-pass estimate of P_d is zero (the sign assumption it rests on fails for every
  weight); that channel uses the exact P_d instead, which stays positive.
- An output channel with no positive mass to normalise, P_d <= eps * sum_c mu_c sum_t |w_dct|
  (its weights are all equal, up to rounding, on the inputs with a positive mean, or all those
  inputs are zero), gets a zero weight: its centred weight is zero or rounding noise, and scaling
  noise up to unit mass would invent a kernel. The test is relative, so it does not depend on the
  scale of the weight or of the input, and such a channel is never NaN/Inf.
"""
from __future__ import annotations

import torch

from .. import _checks


def _accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 operands, fp64 as soon as one is fp64."""
    # A loop rather than any() over a generator: every layer call asks, several times.
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


# The weight transform and its gradients are computed in float64 whatever the operands' dtype:
# products such as mu_c * w_dct and P_d**2 leave float32's exponent range for inputs and weights
# far from 1 (x ~ 1e-40, or x and w ~ 1e-20), although w'' itself does not depend on the scale
# of a weight row and only scales as 1 / |x|, so the answer is representable.
WEIGHT_MATH_DTYPE = torch.float64


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| with the derivative sign(x) taken as +1 at 0 (torch.abs takes 0 there), so that on
    non-negative inputs it is x itself, values and gradients alike."""
    return torch.where(x < 0, -x, x)


def channel_mean_unchecked(
    x: torch.Tensor, stats_fraction: float, statistic: str = "mean", dtype: torch.dtype | None = None
) -> torch.Tensor:
    rows = _checks.stats_rows(x.shape[0], stats_fraction)
    sample = x if rows == x.shape[0] else x[:rows]
    if statistic == "abs_mean":
        sample = magnitude(sample)
    reduce_dims = [0, *range(2, x.dim())]
    return sample.mean(dim=reduce_dims, dtype=dtype or _accumulation_dtype(x))


def _one_signed_channels(weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(D,) bool: output channels whose weights on inputs of positive mean are all > 0 or all <= 0."""
    positive = weight > 0
    seen = mean > 0
    return ~((positive & seen).any(dim=(1, 2)) & (~positive & seen).any(dim=(1, 2)))


def _means_per_value(mean: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """mu[d, c, t], the mean of the input value that value (d, c, t) of weight (D, C/groups, K)
    multiplies: channel means (C,) for every tap, or per-tap means (C, *kernel)."""
    out_channels, group_channels, taps = weight.shape
    per_group = mean.reshape(groups, group_channels, -1)  # (groups, C/groups, 1 or K)
    return per_group.expand(groups, group_channels, taps).repeat_interleave(out_channels // groups, dim=0)


def equinorm_weight_unchecked(
    weight: torch.Tensor,
    mean: torch.Tensor,
    ratio: float,
    groups: int,
    mode: str,
    gain: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    acc = WEIGHT_MATH_DTYPE
    out_channels = weight.shape[0]
    w = weight.to(acc).reshape(out_channels, weight.shape[1], -1)  # (D, C/groups, K)
    mu = _means_per_value(mean.to(acc), w, groups)  # (D, C/groups, K)

    value_mass = mu.sum(dim=(1, 2)).clamp_min(torch.finfo(acc).tiny)  # V_d; 0 only when all means are 0
    shift = -(mu * w).sum(dim=(1, 2)) / value_mass  # b_d
    shifted = w + shift[:, None, None]  # u

    exact_positive = (mu * shifted.clamp_min(0)).sum(dim=(1, 2))
    if mode == "exact":
        positive_mass = exact_positive
    else:
        positive = w > 0
        one_pass = (mu * positive * shifted).sum(dim=(1, 2))
        positive_mass = torch.where(_one_signed_channels(w, mu), exact_positive, one_pass)

    with torch.no_grad():
        total_mass = (mu * w.abs()).sum(dim=(1, 2))
        degenerate = positive_mass <= eps * total_mass
    # The inner where keeps the unused branch finite, so its gradient cannot turn into NaN.
    safe_mass = torch.where(degenerate, torch.ones_like(positive_mass), positive_mass)
    scale = torch.where(degenerate, torch.zeros_like(positive_mass), ratio / safe_mass)  # s_d
    if gain is not None:
        scale = scale * gain.to(acc)
    result = (shifted * scale[:, None, None]).reshape(weight.shape).to(weight.dtype)
    if weight.dim() in (4, 5) and not weight.is_contiguous():
        layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        if weight.is_contiguous(memory_format=layout):
            result = result.contiguous(memory_format=layout)
    return result


def channel_mean(x: torch.Tensor, *, stats_fraction: float = 1.0, statistic: str = "mean") -> torch.Tensor:
    """Per-channel mean of ``x`` (or of ``|x|``) over every dim but dim 1.

    Args:
        x: (N, C, *spatial) or (N, C), float16/bfloat16/float32/float64, any memory format.
        stats_fraction: only the first ceil(stats_fraction * N) samples are averaged (0 < f <= 1).
        statistic: "mean", or "abs_mean" for the mean of |x| (equal to "mean" on non-negative x;
            its gradient takes sign(0) = +1).

    Returns:
        (C,) float32 (float64 for float64 ``x``), accumulated in that dtype; differentiable in ``x``.
    """
    stats_fraction = _checks.check_channel_mean_args(x, stats_fraction)
    _checks.check_statistic(statistic)
    return channel_mean_unchecked(x, stats_fraction, statistic)


def equinorm_weight(
    weight: torch.Tensor,
    mean: torch.Tensor,
    *,
    ratio: float = 1.0,
    groups: int = 1,
    mode: str = "single_pass",
    gain: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The EquiNorm-rescaled weight w'' (times ``gain`` when given).

    Args:
        weight: (D, C/groups, *kernel) or (D, C) for Linear; any float dtype.
        mean: (C,) non-negative channel means of the layer input (see :func:`channel_mean`), or
            (C, *kernel) per-tap means (see ``tap_mean``; then ``ratio`` must be 1).
        ratio: rho = prod(spatial_out) * prod(stride) / prod(spatial_in); 1 for Linear; in
            [2**-63, 2**63].
        groups: convolution groups (C and D divisible by it).
        mode: "single_pass" (the paper's one-pass estimate of P_d) or "exact" (two passes).
        gain: optional (D,) per-output-channel gain folded into the result.
        eps: relative threshold below which an output channel counts as having no positive mass
            (P_d <= eps * sum_c mu_c sum_t |w_dct|); such a channel gets a zero weight.

    Returns:
        Tensor of ``weight``'s shape, dtype and memory format, computed in float64 whatever the
        operands' dtype (so any finite operands whose answer is representable get it); differentiable
        in ``weight``, ``mean`` and ``gain``.
    """
    _checks.check_equinorm_weight_args(weight, mean, ratio, groups, mode, gain, eps)
    return equinorm_weight_unchecked(weight, mean, float(ratio), groups, mode, gain, float(eps))
