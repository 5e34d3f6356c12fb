"""Independent float64 implementation of the EquiNorm equations: the oracle of the tests.

Deliberately written in a different style from ``equinorm_kernels.reference``: numpy float64, an
explicit loop over output channels, and the paper's sum form for the forward pass

    v_c = (elements per channel) * mu_c         r = (elements per channel) * rho

(the result does not depend on the element count, which is a free parameter here). The backward
pass is the closed form of the design note, written per output channel.

Documented edge-case decisions are reproduced so the oracle covers them too:
- single_pass uses the exact P_d for an output channel whose weights on inputs with a positive
  mean are all > 0 or all <= 0;
- an output channel whose positive mass is at most ``eps`` times its absolute mass,
  P_d <= eps * sum_c mu_c sum_t |w_dct|, gets a zero weight (and zero gradients);
- b_d = 0 when every input of the channel has mean 0.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any dtype, device cpu) or array-like as a float64 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.array(value, dtype=np.float64)


def stats_rows(batch: int, stats_fraction: float) -> int:
    """ceil(stats_fraction * batch) in exact decimal arithmetic (0.1 * 30 is 3, not 4)."""
    exact = Fraction(repr(float(stats_fraction))) * batch
    return max(1, math.ceil(exact))


def channel_mean(x, stats_fraction: float = 1.0) -> np.ndarray:
    """Correctly rounded per-channel mean over the first ceil(f*N) samples (math.fsum)."""
    x = to_numpy(x)
    rows = stats_rows(x.shape[0], stats_fraction)
    used = x[:rows]
    result = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        values = used[:, c].ravel()
        result[c] = math.fsum(values.tolist()) / values.size
    return result


def conv_ratio(spatial_in, spatial_out, stride) -> float:
    """rho = prod(spatial_out) * prod(stride) / prod(spatial_in)."""
    return float(np.prod(spatial_out) * np.prod(stride) / np.prod(spatial_in))


def _group_slice(d: int, out_channels: int, groups: int, group_channels: int) -> slice:
    g = d // (out_channels // groups)
    return slice(g * group_channels, (g + 1) * group_channels)


def _falls_back(w_d: np.ndarray, v_d: np.ndarray) -> bool:
    """Whether single_pass uses the exact P_d: one-signed weights on the live (v > 0) inputs."""
    live = w_d[v_d > 0]
    has_positive = bool((live > 0).any())
    has_non_positive = bool((live <= 0).any())
    return not (has_positive and has_non_positive)


def equinorm_weight(
    weight,
    mean,
    *,
    ratio: float = 1.0,
    groups: int = 1,
    mode: str = "single_pass",
    gain=None,
    eps: float = 1e-5,
    elements: float = 12.0,
) -> np.ndarray:
    """w'' (times gain) for weight (D, C/groups, *kernel) or (D, C), from channel means ``mean``."""
    w = to_numpy(weight)
    mu = to_numpy(mean)
    out_channels, group_channels = w.shape[0], w.shape[1]
    taps = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    v = elements * mu  # per-channel input sums
    r = elements * ratio
    result = np.zeros_like(w)
    for d in range(out_channels):
        v_d = v[_group_slice(d, out_channels, groups, group_channels)]
        w_d = w[d].reshape(group_channels, taps)
        total_v = float(v_d.sum())
        kernel_sums = np.array([w_d[c].sum() for c in range(group_channels)])
        b = -float((v_d * kernel_sums).sum()) / (taps * total_v) if total_v > 0 else 0.0
        u = w_d + b
        exact_positive = sum(v_d[c] * np.where(u[c] > 0, u[c], 0.0).sum() for c in range(group_channels))
        if mode == "exact" or _falls_back(w_d, v_d[:, None].repeat(taps, axis=1)):
            positive = exact_positive
        elif mode == "single_pass":
            positive = 0.0
            for c in range(group_channels):
                plus = w_d[c] > 0
                positive += v_d[c] * (w_d[c][plus].sum() + b * plus.sum())
        else:
            raise ValueError(mode)
        absolute = sum(v_d[c] * np.abs(w_d[c]).sum() for c in range(group_channels))
        s = 0.0 if positive <= eps * absolute else r / float(positive)
        if gain is not None:
            s *= float(to_numpy(gain)[d])
        result[d] = (s * u).reshape(w.shape[1:])
    return result


def equinorm_weight_backward(
    weight, mean, grad_output, *, ratio=1.0, groups=1, mode="single_pass", gain=None, eps=1e-5
):
    """The design note's closed-form backward of ``equinorm_weight``.

    Output channels with a zero weight (no positive mass, see the module docstring) get zero
    gradients; every other channel must have a positive mean mass sum_c mu_c.

    ``grad_output`` is dL/d(gain * w''), or dL/dw'' without a gain.
    Returns (dL/dweight, dL/dmean, dL/dgain or None) as float64 numpy arrays.
    """
    w = to_numpy(weight)
    mu = to_numpy(mean)
    grad_out = to_numpy(grad_output)
    gains = None if gain is None else to_numpy(gain)
    out_channels, group_channels = w.shape[0], w.shape[1]
    taps = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    grad_w = np.zeros_like(w)
    grad_mu = np.zeros_like(mu)
    grad_gain = None if gain is None else np.zeros(out_channels)
    for d in range(out_channels):
        cs = _group_slice(d, out_channels, groups, group_channels)
        m = mu[cs][:, None]  # (C/groups, 1)
        w_d = w[d].reshape(group_channels, taps)
        W = w_d.sum(axis=1)  # W_dc
        M = float(mu[cs].sum())
        b = -float((mu[cs] * W).sum()) / (taps * M)
        u = w_d + b
        q = np.where(u > 0, u, 0.0).sum(axis=1)
        plus = w_d > 0
        p = np.where(plus, w_d, 0.0).sum(axis=1)
        n = plus.sum(axis=1)
        use_exact = mode == "exact" or _falls_back(w_d, np.repeat(m, taps, axis=1))
        P = float((mu[cs] * q).sum()) if use_exact else float((mu[cs] * (p + b * n)).sum())
        if P <= eps * float((mu[cs] * np.abs(w_d).sum(axis=1)).sum()):
            continue  # zero weight: constant in every input
        assert M > 0
        s = ratio / P
        g_out = grad_out[d].reshape(group_channels, taps)
        if gains is None:
            G = g_out
        else:
            G = gains[d] * g_out
            grad_gain[d] = float((g_out * (s * u)).sum())
        g_s = float((G * u).sum())
        g_P = -g_s * s / P
        if use_exact:
            g_u = s * G + g_P * m * (u > 0)
            g_b = float(g_u.sum())
            grad_w[d] = (g_u - g_b * m / (taps * M)).reshape(w.shape[1:])
            grad_mu[cs] += g_P * q - g_b * (W + taps * b) / (taps * M)
        else:
            g_w0 = s * G + g_P * m * plus
            g_b = s * float(G.sum()) + g_P * float((mu[cs] * n).sum())
            grad_w[d] = (g_w0 - g_b * m / (taps * M)).reshape(w.shape[1:])
            grad_mu[cs] += g_P * (p + b * n) - g_b * (W + taps * b) / (taps * M)
    return grad_w, grad_mu, grad_gain
