"""Tests of the EquiNorm layers (EquiNormConv1d/2d/3d, EquiNormLinear).

Expected values are composed here from ``torch.nn.functional.conv*d`` / ``linear`` and the
reference functions ``reference.channel_mean`` / ``reference.equinorm_weight`` (tested on their
own), never from the layer. The ratio rho = prod(spatial_out) * prod(stride) / prod(spatial_in) is
computed from the shapes the plain convolution returns.
"""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from equinorm_kernels import EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear, reference
from equinorm_kernels.layers import balance_signs_

CONV_LAYERS = {1: EquiNormConv1d, 2: EquiNormConv2d, 3: EquiNormConv3d}
PLAIN_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PLAIN_CONV_CLASS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ("single_pass", "exact")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------
# Helpers: configurations, inputs and the composed expected expressions
# --------------------------------------------------------------------------------------------------
def _tuple(value, n):
    return (value,) * n if isinstance(value, int) else tuple(value)


def stats_rows(batch: int, fraction: float) -> int:
    """ceil(fraction * batch), with the fraction read as the decimal number it was written as."""
    return max(1, math.ceil(Fraction(repr(fraction)) * batch))


# (id, dims, in, out, kernel, options, input spatial size)
CONV_CASES = [
    ("1d-s1-valid", 1, 3, 4, 3, dict(), (11,)),
    ("1d-s2-pad1", 1, 3, 4, 3, dict(stride=2, padding=1), (11,)),
    ("1d-same-dil2", 1, 3, 4, 3, dict(padding="same", dilation=2), (11,)),
    ("1d-circular-s2", 1, 3, 4, 3, dict(stride=2, padding=2, padding_mode="circular"), (9,)),
    ("2d-s1-same", 2, 3, 5, 3, dict(padding="same"), (7, 9)),
    ("2d-s1-pad1", 2, 3, 5, 3, dict(padding=1), (7, 9)),
    ("2d-s2-pad1", 2, 3, 5, 3, dict(stride=2, padding=1), (7, 9)),
    ("2d-s2-valid-nobias", 2, 3, 5, 3, dict(stride=2, padding="valid", bias=False), (9, 7)),
    ("2d-valid-dil2", 2, 3, 4, 3, dict(padding="valid", dilation=2), (9, 7)),
    ("2d-rect", 2, 3, 4, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (7, 9)),
    ("2d-groups2-s2", 2, 4, 6, 3, dict(stride=2, padding=1, groups=2), (7, 9)),
    ("2d-depthwise", 2, 4, 8, 3, dict(padding=1, groups=4), (7, 9)),
    ("2d-depthwise-s2", 2, 4, 4, 3, dict(stride=2, groups=4), (9, 7)),
    ("2d-reflect-pad1", 2, 3, 4, 3, dict(padding=1, padding_mode="reflect"), (7, 9)),
    ("2d-reflect-s2", 2, 3, 4, 3, dict(stride=2, padding=1, padding_mode="reflect"), (7, 9)),
    ("2d-circular-same-even", 2, 3, 4, (2, 3), dict(padding="same", padding_mode="circular"), (7, 9)),
    ("2d-replicate-groups", 2, 4, 6, 3, dict(stride=2, padding=1, groups=2, padding_mode="replicate"), (7, 9)),
    ("3d-s1-pad1", 3, 2, 3, 3, dict(padding=1), (5, 4, 3)),
    ("3d-s2-valid", 3, 2, 3, 2, dict(stride=2), (5, 5, 5)),
    ("3d-circular-groups", 3, 4, 4, 2, dict(stride=(1, 2, 1), padding=1, groups=2, padding_mode="circular"), (5, 5, 3)),
]
CONV_IDS = [case[0] for case in CONV_CASES]


def conv_options(case):
    _, dims, _, _, kernel, options, _ = case
    full = dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros")
    full.update({k: v for k, v in options.items() if k != "bias"})
    full["dims"] = dims
    full["kernel"] = _tuple(kernel, dims)
    return full


def plain_conv(x, weight, bias, opts):
    """Plain F.conv*d with the layer's padding semantics (padding_mode through F.pad)."""
    dims = opts["dims"]
    fn = PLAIN_CONV_FN[dims]
    stride, dilation, groups = _tuple(opts["stride"], dims), _tuple(opts["dilation"], dims), opts["groups"]
    padding, padding_mode = opts["padding"], opts["padding_mode"]
    if padding_mode == "zeros":
        return fn(x, weight, bias, stride, padding, dilation, groups)
    kernel = weight.shape[2:]
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pairs = [(t // 2, t - t // 2) for t in totals]
    elif padding == "valid":
        pairs = [(0, 0)] * dims
    else:
        pairs = [(p, p) for p in _tuple(padding, dims)]
    flat = [amount for pair in reversed(pairs) for amount in pair]
    return fn(F.pad(x, flat, mode=padding_mode), weight, bias, stride, 0, dilation, groups)


def conv_ratio(x_batched, weight, opts):
    """rho from the shapes the plain convolution actually returns."""
    out = plain_conv(x_batched.detach(), weight.detach(), None, opts)
    stride = _tuple(opts["stride"], opts["dims"])
    return math.prod(out.shape[2:]) * math.prod(stride) / math.prod(x_batched.shape[2:])


def expected_conv(x, weight, gain, bias, opts, mode, stats_fraction=1.0, mean=None):
    """gain * conv(x, w''(w, mu)) + bias, mu the means of the first ceil(f N) samples (or ``mean``)."""
    batched = x.dim() == opts["dims"] + 2
    xb = x if batched else x.unsqueeze(0)
    if mean is None:
        mean = reference.channel_mean(xb[: stats_rows(xb.shape[0], stats_fraction)])
    rho = conv_ratio(xb, weight, opts)
    w2 = reference.equinorm_weight(weight, mean, ratio=rho, groups=opts["groups"], mode=mode, gain=gain)
    y = plain_conv(xb, w2, bias, opts)
    return y if batched else y.squeeze(0)


def expected_linear(x, weight, gain, bias, mode, stats_fraction=1.0, mean=None):
    """F.linear with w''; mu averages the first ceil(f N) samples and every other leading dim."""
    if mean is None:
        xb = x if x.dim() > 1 else x.unsqueeze(0)
        rows = stats_rows(xb.shape[0], stats_fraction)
        mean = reference.channel_mean(xb[:rows].reshape(-1, xb.shape[-1]))
    w2 = reference.equinorm_weight(weight, mean, ratio=1.0, mode=mode, gain=gain)
    return F.linear(x, w2, bias)


def randomize_affine(layer):
    """Gain and bias away from their identity values, so that they matter."""
    with torch.no_grad():
        layer.gain.copy_(0.5 + torch.rand_like(layer.gain))
        if layer.bias is not None:
            layer.bias.uniform_(-1.0, 1.0)
    return layer


def make_conv(case, mode="single_pass", dtype=torch.float64, **extra):
    _, dims, cin, cout, kernel, options, _ = case
    layer = CONV_LAYERS[dims](cin, cout, kernel, **options, dtype=dtype, mode=mode, **extra)
    return randomize_affine(layer)


def nonneg_input(shape, channel_dim=1, dtype=torch.float64):
    """torch.rand scaled per channel, so that channel means differ clearly."""
    x = torch.rand(shape, dtype=dtype)
    channels = shape[channel_dim]
    scale_shape = [1] * len(shape)
    scale_shape[channel_dim] = channels
    return x * torch.linspace(0.5, 2.0, channels, dtype=dtype).reshape(scale_shape)


def conv_input(case, batch=3, dtype=torch.float64, batched=True):
    _, _, cin, _, _, _, spatial = case
    shape = (batch, cin, *spatial) if batched else (cin, *spatial)
    return nonneg_input(shape, channel_dim=1 if batched else 0, dtype=dtype)


def params_of(layer):
    """Detached leaf copies of weight, gain, bias for the composed expression."""
    weight = layer.weight.detach().clone().requires_grad_()
    gain = layer.gain.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    return weight, gain, bias


def one_signed_rows(weight):
    rows = weight.detach().reshape(weight.shape[0], -1)
    mixed = (rows > 0).any(dim=1) & (rows < 0).any(dim=1)
    return int((~mixed).sum())


# --------------------------------------------------------------------------------------------------
# Training forward against the composed expression
# --------------------------------------------------------------------------------------------------
def test_ratio_cases_cover_rho_not_one():
    """The strided / unpadded cases really exercise rho != 1 (and the same-padded ones rho == 1)."""
    ratios = {}
    for case in CONV_CASES:
        opts = conv_options(case)
        x = conv_input(case)
        weight = torch.zeros(case[3], case[2] // opts["groups"], *opts["kernel"], dtype=x.dtype)
        ratios[case[0]] = conv_ratio(x, weight, opts)
    assert ratios["2d-s2-pad1"] == pytest.approx(4 * 5 * 4 / 63)
    assert ratios["1d-s2-pad1"] == pytest.approx(6 * 2 / 11)
    assert ratios["2d-s1-same"] == 1.0 and ratios["2d-circular-same-even"] == 1.0
    assert sum(r != pytest.approx(1.0) for r in ratios.values()) >= 10


@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_training_forward_matches_composed(case, mode, stats_fraction):
    layer = make_conv(case, mode=mode, stats_fraction=stats_fraction)
    x = conv_input(case, batch=5)
    y = layer(x)
    weight, gain, bias = params_of(layer)
    expected = expected_conv(x, weight, gain, bias, conv_options(case), mode, stats_fraction)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 6, 10, 14, 19)], ids=[CONV_IDS[i] for i in (1, 6, 10, 14, 19)])
def test_conv_training_forward_float32(case, mode):
    layer = make_conv(case, mode=mode, dtype=torch.float32)
    x = conv_input(case, dtype=torch.float32)
    y = layer(x)
    assert y.dtype == torch.float32
    weight, gain, bias = params_of(layer)
    expected = expected_conv(x, weight, gain, bias, conv_options(case), mode)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])


@pytest.mark.parametrize("stats_fraction,batch,rows", [(0.25, 4, 1), (0.5, 5, 3), (0.4, 5, 2), (0.3, 10, 3), (0.1, 30, 3)])
def test_conv_stats_fraction_uses_first_rows(stats_fraction, batch, rows):
    case = CONV_CASES[6]
    layer = make_conv(case, stats_fraction=stats_fraction)
    x = conv_input(case, batch=batch)
    # Later samples much brighter: they would change the means if they were counted.
    x[rows:] *= 10.0
    assert stats_rows(batch, stats_fraction) == rows
    y = layer(x)
    weight, gain, bias = params_of(layer)
    mean = reference.channel_mean(x[:rows])
    expected = expected_conv(x, weight, gain, bias, conv_options(case), "single_pass", mean=mean)
    torch.testing.assert_close(y, expected, **TOL[torch.float64])
    torch.testing.assert_close(layer.running_mean, 0.9 + 0.1 * mean, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (2, 6, 11, 14, 17)], ids=[CONV_IDS[i] for i in (2, 6, 11, 14, 17)])
def test_conv_unbatched_input(case, mode):
    layer = make_conv(case, mode=mode)
    x = conv_input(case, batched=False)
    y = layer(x)
    weight, gain, bias = params_of(layer)
    expected = expected_conv(x, weight, gain, bias, conv_options(case), mode)
    assert y.dim() == x.dim()
    torch.testing.assert_close(y, expected, **TOL[torch.float64])
    torch.testing.assert_close(layer.running_mean, 0.9 + 0.1 * reference.channel_mean(x.unsqueeze(0)), **TOL[torch.float64])


@pytest.mark.parametrize("weight_channels_last", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_conv_channels_last_input(dims, weight_channels_last):
    case = CONV_CASES[10] if dims == 2 else CONV_CASES[19]
    layer = make_conv(case, dtype=torch.float32)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    if weight_channels_last:
        layer = layer.to(memory_format=layout)
    x = conv_input(case, dtype=torch.float32)
    x_cl = x.contiguous(memory_format=layout).requires_grad_()
    assert not x_cl.is_contiguous()
    y = layer(x_cl)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    x_ref = x.clone().requires_grad_()
    weight, gain, bias = params_of(layer)
    expected = expected_conv(x_ref, weight, gain, bias, conv_options(case), "single_pass")
    expected.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    # The weight gradient sums over N * spatial in a layout-dependent order: float32 rounding.
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)


def test_conv_ratio_follows_input_size():
    """One strided layer, inputs of different sizes: each gets its own rho."""
    case = CONV_CASES[6]
    layer = make_conv(case)
    weight, gain, bias = params_of(layer)
    for spatial in [(7, 9), (8, 8), (5, 11)]:
        x = nonneg_input((2, 3, *spatial))
        expected = expected_conv(x, weight, gain, bias, conv_options(case), "single_pass")
        torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])


LINEAR_SHAPES = [(5, 6), (4, 3, 6), (3, 2, 2, 6), (6,)]
LINEAR_IDS = ["NC", "NTC", "NABC", "unbatched"]


@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_training_forward_matches_composed(shape, mode, stats_fraction, dtype):
    layer = randomize_affine(EquiNormLinear(6, 4, dtype=dtype, mode=mode, stats_fraction=stats_fraction))
    x = nonneg_input(shape, channel_dim=len(shape) - 1, dtype=dtype)
    y = layer(x)
    weight, gain, bias = params_of(layer)
    expected = expected_linear(x, weight, gain, bias, mode, stats_fraction)
    assert y.shape == (*shape[:-1], 4)
    torch.testing.assert_close(y, expected, **TOL[dtype])


def test_linear_sequence_stats_cover_first_samples_and_all_steps():
    """(N, T, C): stats over the first ceil(f N) samples and every T, not over the first rows of N*T."""
    layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64, stats_fraction=0.5))
    x = nonneg_input((4, 3, 6), channel_dim=2)
    x[:, 1:] *= 5.0  # later steps brighter
    x[2:] *= 7.0  # later samples brighter
    layer(x)
    mean = reference.channel_mean(x[:2].reshape(-1, 6))
    torch.testing.assert_close(layer.running_mean, 0.9 + 0.1 * mean, **TOL[torch.float64])


def test_linear_without_bias():
    layer = randomize_affine(EquiNormLinear(6, 4, bias=False, dtype=torch.float64))
    x = nonneg_input((5, 6))
    weight, gain, _ = params_of(layer)
    torch.testing.assert_close(layer(x), expected_linear(x, weight, gain, None, "single_pass"), **TOL[torch.float64])


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------
def _check_grads(layer, x, expected_fn):
    x_layer = x.clone().requires_grad_()
    y = layer(x_layer)
    upstream = torch.randn(y.shape, dtype=y.dtype)
    (y * upstream).sum().backward()

    x_ref = x.clone().requires_grad_()
    weight, gain, bias = params_of(layer)
    (expected_fn(x_ref, weight, gain, bias, None) * upstream).sum().backward()

    tol = TOL[x.dtype]
    torch.testing.assert_close(x_layer.grad, x_ref.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, weight.grad, **tol)
    torch.testing.assert_close(layer.gain.grad, gain.grad, **tol)
    if bias is not None:
        torch.testing.assert_close(layer.bias.grad, bias.grad, **tol)

    # The input gradient must include the path through the batch means.
    x_detached = x.clone().requires_grad_()
    w2, g2, b2 = params_of(layer)
    (expected_fn(x_detached, w2, g2, b2, "detach") * upstream).sum().backward()
    assert (x_layer.grad - x_detached.grad).abs().max() > 1e-6


GRAD_CASES = [CONV_CASES[i] for i in (1, 3, 6, 7, 10, 12, 14, 15, 19)]
GRAD_IDS = [CONV_IDS[i] for i in (1, 3, 6, 7, 10, 12, 14, 15, 19)]


@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_conv_gradients_match_composed(case, mode, stats_fraction):
    layer = make_conv(case, mode=mode, stats_fraction=stats_fraction)
    x = conv_input(case, batch=4)
    opts = conv_options(case)

    def expected_fn(xr, weight, gain, bias, detach):
        mean = None
        if detach:
            mean = reference.channel_mean(xr[: stats_rows(xr.shape[0], stats_fraction)].detach())
        return expected_conv(xr, weight, gain, bias, opts, mode, stats_fraction, mean=mean)

    _check_grads(layer, x, expected_fn)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
def test_linear_gradients_match_composed(shape, mode):
    layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64, mode=mode, stats_fraction=0.5))
    x = nonneg_input(shape, channel_dim=len(shape) - 1)

    def expected_fn(xr, weight, gain, bias, detach):
        mean = None
        if detach:
            xb = xr if xr.dim() > 1 else xr.unsqueeze(0)
            mean = reference.channel_mean(xb[: stats_rows(xb.shape[0], 0.5)].reshape(-1, 6).detach())
        return expected_linear(xr, weight, gain, bias, mode, 0.5, mean=mean)

    _check_grads(layer, x, expected_fn)


def test_conv_unbatched_gradients():
    case = CONV_CASES[6]
    layer = make_conv(case)
    x = conv_input(case, batched=False)
    opts = conv_options(case)

    def expected_fn(xr, weight, gain, bias, detach):
        mean = reference.channel_mean(xr.unsqueeze(0).detach()) if detach else None
        return expected_conv(xr, weight, gain, bias, opts, "single_pass", mean=mean)

    _check_grads(layer, x, expected_fn)


def test_eval_gradients_do_not_reach_running_mean():
    case = CONV_CASES[6]
    layer = make_conv(case).eval()
    x = conv_input(case).requires_grad_()
    layer(x).sum().backward()
    assert not layer.running_mean.requires_grad
    weight, gain, bias = params_of(layer)
    x_ref = x.detach().clone().requires_grad_()
    expected_conv(x_ref, weight, gain, bias, conv_options(case), "single_pass", mean=layer.running_mean).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float64])
    torch.testing.assert_close(layer.weight.grad, weight.grad, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------------
# Running mean, train vs eval
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_mean_starts_at_ones(dtype):
    for layer in (EquiNormConv2d(3, 4, 3, dtype=dtype), EquiNormLinear(5, 2, dtype=dtype), EquiNormConv1d(4, 6, 2, groups=2, dtype=dtype)):
        in_channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
        assert layer.running_mean.dtype == dtype
        torch.testing.assert_close(layer.running_mean, torch.ones(in_channels, dtype=dtype), rtol=0, atol=0)
        assert layer.num_batches_tracked.dtype == torch.long and int(layer.num_batches_tracked) == 0


def _batches(k, shape, channel_dim):
    return [nonneg_input(shape, channel_dim) * (0.5 + i) for i in range(k)]


@pytest.mark.parametrize("momentum", [0.1, 0.35, 0.0, 1.0])
@pytest.mark.parametrize("kind", ["conv2d", "linear-NTC", "conv1d-fraction"])
def test_running_mean_recursion(kind, momentum):
    if kind == "conv2d":
        layer = EquiNormConv2d(3, 4, 3, stride=2, dtype=torch.float64, momentum=momentum)
        batches = _batches(4, (3, 3, 7, 9), 1)
        means = [reference.channel_mean(x) for x in batches]
    elif kind == "linear-NTC":
        layer = EquiNormLinear(5, 2, dtype=torch.float64, momentum=momentum)
        batches = _batches(4, (3, 4, 5), 2)
        means = [reference.channel_mean(x.reshape(-1, 5)) for x in batches]
    else:
        layer = EquiNormConv1d(3, 4, 3, dtype=torch.float64, momentum=momentum, stats_fraction=0.5)
        batches = _batches(4, (4, 3, 9), 1)
        means = [reference.channel_mean(x[:2]) for x in batches]
    running = torch.ones_like(means[0])
    for step, (x, mu) in enumerate(zip(batches, means), start=1):
        layer(x)
        running = (1 - momentum) * running + momentum * mu
        torch.testing.assert_close(layer.running_mean, running, **TOL[torch.float64])
        assert int(layer.num_batches_tracked) == step


def test_running_mean_momentum_none_is_cumulative_average():
    layer = EquiNormConv2d(3, 4, 3, dtype=torch.float64, momentum=None)
    batches = _batches(5, (2, 3, 6, 5), 1)
    for k, x in enumerate(batches, start=1):
        layer(x)
        expected = torch.stack([reference.channel_mean(b) for b in batches[:k]]).mean(dim=0)
        torch.testing.assert_close(layer.running_mean, expected, **TOL[torch.float64])
        assert int(layer.num_batches_tracked) == k


def test_running_mean_float32_layer_with_float32_stats():
    layer = EquiNormConv2d(3, 4, 3)
    x = nonneg_input((2, 3, 6, 6), dtype=torch.float32)
    layer(x)
    assert layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, 0.9 + 0.1 * reference.channel_mean(x))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_eval_uses_running_mean_and_does_not_update_it(kind):
    if kind == "conv":
        case = CONV_CASES[6]
        layer = make_conv(case)
        batches = [conv_input(case) * s for s in (0.5, 1.5, 3.0)]
    else:
        layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64))
        batches = [nonneg_input((3, 2, 6), 2) * s for s in (0.5, 1.5, 3.0)]
    for x in batches[:2]:
        layer(x)
    layer.eval()
    running, tracked = layer.running_mean.clone(), int(layer.num_batches_tracked)
    x = batches[2]
    y = layer(x)
    layer(x)
    assert torch.equal(layer.running_mean, running)
    assert int(layer.num_batches_tracked) == tracked
    weight, gain, bias = params_of(layer)
    if kind == "conv":
        expected = expected_conv(x, weight, gain, bias, conv_options(case), "single_pass", mean=running)
    else:
        expected = expected_linear(x, weight, gain, bias, "single_pass", mean=running)
    torch.testing.assert_close(y, expected, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_train_and_eval_outputs(kind, mode):
    if kind == "conv":
        case = CONV_CASES[6]
        layer = make_conv(case, mode=mode)
        x = conv_input(case)
        mean = reference.channel_mean(x)
    else:
        layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64, mode=mode))
        x = nonneg_input((5, 6))
        mean = reference.channel_mean(x)
    # running_mean (ones) differs from the batch means: outputs differ.
    assert (mean - 1.0).abs().max() > 0.1
    y_train = layer.train()(x)
    with torch.no_grad():
        layer.running_mean.fill_(1.0)
    y_eval = layer.eval()(x)
    assert (y_train - y_eval).abs().max() > 1e-3
    # running_mean equal to the batch means: outputs agree.
    with torch.no_grad():
        layer.running_mean.copy_(mean)
    y_eval = layer.eval()(x)
    y_train = layer.train()(x)
    torch.testing.assert_close(y_eval, y_train, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------
INVARIANCE_CASES = [CONV_CASES[i] for i in (1, 6, 11, 14)]
INVARIANCE_IDS = [CONV_IDS[i] for i in (1, 6, 11, 14)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", INVARIANCE_CASES + ["linear"], ids=INVARIANCE_IDS + ["linear"])
def test_training_output_invariant_to_input_scale(case, mode):
    if case == "linear":
        layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64, mode=mode))
        x = nonneg_input((4, 3, 6), 2)
    else:
        layer = make_conv(case, mode=mode)
        x = conv_input(case)
    y = layer(x)
    for factor in (0.01, 3.7, 250.0):
        torch.testing.assert_close(layer(x * factor), y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", INVARIANCE_CASES + ["linear"], ids=INVARIANCE_IDS + ["linear"])
def test_output_invariant_to_weight_row_scale(case, mode, training):
    if case == "linear":
        layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64, mode=mode))
        x = nonneg_input((4, 6), 1)
    else:
        layer = make_conv(case, mode=mode)
        x = conv_input(case)
    with torch.no_grad():
        layer.running_mean.mul_(torch.linspace(0.3, 2.0, layer.running_mean.numel(), dtype=torch.float64))
    layer.train(training)
    y = layer(x)
    with torch.no_grad():
        layer.weight[0].mul_(9.5)
        layer.weight[-1].mul_(0.02)
    torch.testing.assert_close(layer(x), y, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Balanced initialisation
# --------------------------------------------------------------------------------------------------
INIT_LAYERS = {
    "conv2d-2x1x1": lambda: EquiNormConv2d(2, 64, 1),
    "linear-2": lambda: EquiNormLinear(2, 64),
    "conv1d-1x2": lambda: EquiNormConv1d(1, 64, 2),
    "conv3d-2x1": lambda: EquiNormConv3d(2, 32, 1),
    "conv2d-grouped": lambda: EquiNormConv2d(4, 32, 1, groups=2),
    "conv2d-depthwise-1x2": lambda: EquiNormConv2d(8, 8, (1, 2), groups=8),
}


@pytest.mark.parametrize("name", list(INIT_LAYERS))
def test_balanced_init_has_no_one_signed_rows(name):
    for seed in range(40):
        torch.manual_seed(seed)
        layer = INIT_LAYERS[name]()
        assert one_signed_rows(layer.weight) == 0, f"seed {seed}"
        assert torch.equal(layer.gain, torch.ones_like(layer.gain))
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_plain_init_would_be_one_signed():
    """The layers above are small enough that the default init gives one-signed rows."""
    torch.manual_seed(0)
    assert one_signed_rows(nn.Conv2d(2, 64, 1).weight) > 5
    assert one_signed_rows(nn.Linear(2, 64).weight) > 5


@pytest.mark.parametrize("dims", [0, 1, 2])
def test_balanced_init_keeps_default_magnitudes(dims):
    """Same seed: |weight| equals the plain layer's; rows the default made mixed keep their signs."""
    make = {
        0: (lambda cls: cls(3, 64)),
        1: (lambda cls: cls(1, 64, 3)),
        2: (lambda cls: cls(2, 64, 1)),
    }[dims]
    plain_cls = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d}[dims]
    equi_cls = {0: EquiNormLinear, 1: EquiNormConv1d, 2: EquiNormConv2d}[dims]
    torch.manual_seed(3)
    plain = make(plain_cls).weight.detach()
    torch.manual_seed(3)
    balanced = make(equi_cls).weight.detach()
    assert torch.equal(balanced.abs(), plain.abs())
    rows = plain.reshape(64, -1)
    mixed = (rows > 0).any(dim=1) & (rows < 0).any(dim=1)
    assert not bool(mixed.all())
    assert torch.equal(balanced.reshape(64, -1)[mixed], rows[mixed])


def test_bias_false_and_reset_parameters():
    layer = EquiNormConv2d(2, 16, 1, bias=False)
    assert layer.bias is None
    layer = EquiNormConv2d(2, 16, 1)
    with torch.no_grad():
        layer.weight.abs_()
        layer.gain.fill_(3.0)
        layer.bias.fill_(2.0)
        layer.running_mean.fill_(5.0)
        layer.num_batches_tracked.fill_(7)
    layer.reset_parameters()
    assert one_signed_rows(layer.weight) == 0
    assert torch.equal(layer.gain, torch.ones(16)) and torch.equal(layer.bias, torch.zeros(16))
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.ones(2)) and int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("contiguous", [True, False])
def test_balance_signs_keeps_magnitudes(contiguous):
    base = torch.rand(40, 5, dtype=torch.float64) + 0.1
    base[20:] *= -1  # rows 0..19 all positive, 20..39 all negative
    base[5] = torch.tensor([0.0, 0.0, 0.7, 0.0, 0.0])  # one non-zero: cannot be balanced
    base[6] = 0.0
    base[7] = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.9])  # already mixed
    base[8] = torch.tensor([0.0, 2.0, 0.0, 3.0, 0.0])  # two non-zeros, one-signed
    weight = base.clone() if contiguous else base.t().contiguous().t()
    assert weight.is_contiguous() == contiguous
    result = balance_signs_(weight)
    assert result is weight
    assert torch.equal(weight.abs(), base.abs())
    fixable = [i for i in range(40) if i not in (5, 6)]
    assert one_signed_rows(weight[fixable]) == 0
    assert torch.equal(weight[5], base[5]) and torch.equal(weight[6], base[6])
    assert torch.equal(weight[7], base[7])


@pytest.mark.parametrize("channels_last", [False, True])
def test_balance_signs_conv_shaped(channels_last):
    weight = torch.rand(32, 3, 2, 2) + 0.05
    weight[16:] *= -1
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()
    magnitudes = weight.abs()
    assert balance_signs_(weight) is weight
    assert one_signed_rows(weight) == 0
    assert torch.equal(weight.abs(), magnitudes)


def test_reset_parameters_balances_channels_last_weight():
    layer = EquiNormConv2d(3, 32, 2).to(memory_format=torch.channels_last)
    assert not layer.weight.is_contiguous()
    with torch.no_grad():
        layer.weight.abs_()
    magnitudes = layer.weight.detach().clone()
    balance_signs_(layer.weight)
    assert one_signed_rows(layer.weight) == 0
    assert torch.equal(layer.weight.detach().abs(), magnitudes)


# --------------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_state_dict_round_trip(kind):
    if kind == "conv":
        case = CONV_CASES[14]
        layer = make_conv(case, mode="exact")
        fresh = CONV_LAYERS[2](3, 4, 3, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64, mode="exact")
        xs = [conv_input(case) * s for s in (0.5, 2.0, 1.0)]
    else:
        layer = randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64))
        fresh = EquiNormLinear(6, 4, dtype=torch.float64)
        xs = [nonneg_input((4, 3, 6), 2) * s for s in (0.5, 2.0, 1.0)]
    for x in xs[:2]:
        layer(x)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "gain", "running_mean", "num_batches_tracked"}
    assert int(state["num_batches_tracked"]) == 2
    fresh.load_state_dict(state)
    assert torch.equal(fresh.running_mean, layer.running_mean)
    assert int(fresh.num_batches_tracked) == 2
    x = xs[2]
    for training in (False, True):
        layer.train(training)
        fresh.train(training)
        assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.running_mean, layer.running_mean)


def test_state_dict_keys_without_bias():
    layer = EquiNormConv1d(3, 4, 3, bias=False)
    assert set(layer.state_dict()) == {"weight", "gain", "running_mean", "num_batches_tracked"}


# --------------------------------------------------------------------------------------------------
# fold()
# --------------------------------------------------------------------------------------------------
def _trained(layer, xs):
    for x in xs:
        layer(x)
    return layer.eval()


FOLD_CASES = [CONV_CASES[i] for i in (0, 4, 5, 6, 8, 10, 12, 14, 15, 17, 18, 19)]
FOLD_IDS = [CONV_IDS[i] for i in (0, 4, 5, 6, 8, 10, 12, 14, 15, 17, 18, 19)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FOLD_CASES, ids=FOLD_IDS)
def test_fold_conv_matches_eval(case, mode):
    dims, spatial = case[1], case[6]
    layer = _trained(make_conv(case, mode=mode), [conv_input(case) * s for s in (0.7, 1.9)])
    folded = layer.fold(input_size=spatial)
    assert type(folded) is PLAIN_CONV_CLASS[dims]
    assert folded.padding_mode == layer.padding_mode and folded.groups == layer.groups
    assert (folded.bias is None) == (layer.bias is None)
    x = conv_input(case, batch=2) * 1.3
    torch.testing.assert_close(folded(x), layer(x), **TOL[torch.float64])
    # And against the composed expression with the running mean.
    weight, gain, bias = params_of(layer)
    expected = expected_conv(x, weight, gain, bias, conv_options(case), mode, mean=layer.running_mean)
    torch.testing.assert_close(folded(x), expected, **TOL[torch.float64])


def test_fold_linear_matches_eval():
    layer = _trained(randomize_affine(EquiNormLinear(6, 4, dtype=torch.float64, mode="exact")), [nonneg_input((5, 6)) * 2])
    folded = layer.fold()
    assert type(folded) is nn.Linear
    x = nonneg_input((3, 2, 6), 2)
    torch.testing.assert_close(folded(x), layer(x), **TOL[torch.float64])


def test_fold_keeps_train_flag_and_independent_weights():
    case = CONV_CASES[4]
    layer = _trained(make_conv(case), [conv_input(case)])
    folded = layer.fold()
    assert not folded.training
    x = conv_input(case)
    before = folded(x)
    with torch.no_grad():
        layer.weight.mul_(-1.0)
    torch.testing.assert_close(folded(x), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EquiNormConv2d(3, 4, 3, stride=2, padding=1),
        lambda: EquiNormConv2d(3, 4, 3),
        lambda: EquiNormConv2d(3, 4, 3, padding="valid"),
        lambda: EquiNormConv1d(3, 4, 3, padding=1, stride=2, padding_mode="reflect"),
        lambda: EquiNormConv3d(2, 4, 3, padding=0),
    ],
    ids=["s2-pad1", "pad0", "valid", "1d-reflect-s2", "3d-pad0"],
)
def test_fold_needs_input_size_when_ratio_depends_on_it(make):
    layer = make().eval()
    with pytest.raises(ValueError, match="input_size"):
        layer.fold()


@pytest.mark.parametrize(
    "options",
    [dict(padding="same"), dict(padding=1), dict(padding="same", dilation=2), dict(padding=2, dilation=2, padding_mode="reflect")],
    ids=["same", "pad1", "same-dil2", "reflect-pad2-dil2"],
)
def test_fold_without_input_size_when_ratio_is_one(options):
    layer = randomize_affine(EquiNormConv2d(3, 4, 3, dtype=torch.float64, **options))
    _trained(layer, [nonneg_input((2, 3, 6, 7))])
    folded = layer.fold()
    assert type(folded) is nn.Conv2d
    for spatial in [(6, 7), (9, 5), (12, 12)]:
        x = nonneg_input((2, 3, *spatial))
        torch.testing.assert_close(folded(x), layer(x), **TOL[torch.float64])


# --------------------------------------------------------------------------------------------------
# dtypes: autocast, .to(float64) / .double()
# --------------------------------------------------------------------------------------------------
def _rel_err(got, expected):
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("kind", ["conv2d", "conv1d-s2", "linear"])
def test_autocast_bfloat16_cpu(kind):
    if kind == "conv2d":
        layer = randomize_affine(EquiNormConv2d(3, 8, 3, padding=1))
        x = nonneg_input((2, 3, 8, 8), dtype=torch.float32)
    elif kind == "conv1d-s2":
        layer = randomize_affine(EquiNormConv1d(3, 8, 3, stride=2))
        x = nonneg_input((2, 3, 11), dtype=torch.float32)
    else:
        layer = randomize_affine(EquiNormLinear(6, 8))
        x = nonneg_input((4, 3, 6), 2, dtype=torch.float32)
    reference_layer = copy.deepcopy(layer)
    expected = reference_layer(x)
    x_bf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x_bf)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert _rel_err(y, expected) < 2e-2
    y.float().sum().backward()
    assert torch.isfinite(x_bf.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.running_mean.dtype == torch.float32 and torch.isfinite(layer.running_mean).all()
    torch.testing.assert_close(layer.running_mean, reference_layer.running_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("convert", ["to", "double"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_to_float64_moves_params_and_buffers(kind, convert):
    if kind == "conv":
        case = CONV_CASES[10]
        layer = randomize_affine(EquiNormConv2d(4, 6, 3, stride=2, padding=1, groups=2))
        x = conv_input(case)
    else:
        layer = randomize_affine(EquiNormLinear(6, 4))
        x = nonneg_input((4, 6))
    layer = layer.to(torch.float64) if convert == "to" else layer.double()
    for name in ("weight", "bias", "gain", "running_mean"):
        assert getattr(layer, name).dtype == torch.float64, name
    assert layer.num_batches_tracked.dtype == torch.long
    weight, gain, bias = params_of(layer)
    y = layer(x)
    assert y.dtype == torch.float64 and layer.running_mean.dtype == torch.float64
    if kind == "conv":
        expected = expected_conv(x, weight, gain, bias, conv_options(case), "single_pass")
    else:
        expected = expected_linear(x, weight, gain, bias, "single_pass")
    torch.testing.assert_close(y, expected, **TOL[torch.float64])
    layer.eval()
    assert layer(x).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer,x",
    [
        (lambda: EquiNormConv2d(3, 4, 3), (2, 4, 6, 6)),
        (lambda: EquiNormConv2d(3, 4, 3), (4, 6, 6)),
        (lambda: EquiNormConv1d(3, 4, 3), (2, 5, 9)),
        (lambda: EquiNormConv3d(3, 4, 2), (1, 2, 4, 4, 4)),
        (lambda: EquiNormLinear(6, 4), (2, 5)),
        (lambda: EquiNormLinear(6, 4), (2, 6, 3)),
    ],
    ids=["conv2d", "conv2d-unbatched", "conv1d", "conv3d", "linear", "linear-NTC"],
)
def test_wrong_channel_count(layer, x):
    module = layer()
    expected_channels = module.weight.shape[1]
    with pytest.raises(ValueError) as info:
        module(torch.rand(x))
    message = str(info.value)
    assert str(expected_channels) in message and str(tuple(x)) in message


@pytest.mark.parametrize(
    "layer,x",
    [
        (lambda: EquiNormConv2d(3, 4, 3), (2, 3, 6, 6, 6)),
        (lambda: EquiNormConv2d(3, 4, 3), (3, 6)),
        (lambda: EquiNormConv1d(3, 4, 3), (2, 3, 6, 6)),
        (lambda: EquiNormConv3d(3, 4, 2), (2, 3, 4, 4)),
        (lambda: EquiNormLinear(6, 4), ()),
    ],
    ids=["conv2d-5d", "conv2d-2d", "conv1d-4d", "conv3d-4d", "linear-0d"],
)
def test_wrong_number_of_dims(layer, x):
    module = layer()
    with pytest.raises(ValueError, match="shape") as info:
        module(torch.rand(x))
    assert str(tuple(x)) in str(info.value)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="Tensor"):
        EquiNormLinear(6, 4)([[0.5] * 6])


@pytest.mark.parametrize(
    "layer,x",
    [
        (lambda: EquiNormConv2d(3, 4, 3), (0, 3, 6, 6)),
        (lambda: EquiNormConv1d(3, 4, 3, stats_fraction=0.5), (0, 3, 6)),
        (lambda: EquiNormLinear(6, 4), (0, 6)),
        (lambda: EquiNormLinear(6, 4), (0, 3, 6)),
    ],
    ids=["conv2d", "conv1d-fraction", "linear", "linear-NTC"],
)
def test_empty_batch(layer, x):
    with pytest.raises(ValueError, match=r"empty batch|N = 0"):
        layer()(torch.rand(x))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_negative_channel_mean(kind):
    """An error with the paper's statistic; the default (the mean of |x|) takes signed inputs."""
    layer = EquiNormConv2d(3, 4, 3, statistic="mean") if kind == "conv" else EquiNormLinear(3, 4, statistic="mean")
    x = torch.rand(2, 3, 6, 6) if kind == "conv" else torch.rand(5, 3)
    x[:, 1] -= 0.9  # channel 1 mean about -0.4
    with pytest.raises(ValueError, match=r'non-negative.*statistic="abs_mean"'):
        layer(x)
    default = EquiNormConv2d(3, 4, 3) if kind == "conv" else EquiNormLinear(3, 4)
    assert torch.isfinite(default(x)).all()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_nan_input(kind):
    layer = EquiNormConv2d(3, 4, 3) if kind == "conv" else EquiNormLinear(3, 4)
    x = torch.rand(2, 3, 6, 6) if kind == "conv" else torch.rand(5, 3)
    x.view(-1)[4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(x)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(mode="fast"), "mode"),
        (dict(mode="EXACT"), "mode"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(stats_fraction=0), "stats_fraction"),
        (dict(stats_fraction=1.5), "stats_fraction"),
        (dict(stats_fraction=-0.5), "stats_fraction"),
        (dict(eps=0), "eps"),
        (dict(eps=-1e-5), "eps"),
        (dict(backend="gpu-magic"), "backend"),
    ],
)
@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_bad_constructor_options(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        if cls == "conv":
            EquiNormConv2d(3, 4, 3, **bad)
        else:
            EquiNormLinear(3, 4, **bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EquiNormConv2d(4, 4, 1, groups=4),
        lambda: EquiNormConv1d(3, 6, 1, groups=3),
        lambda: EquiNormConv3d(2, 2, 1, groups=2),
        lambda: EquiNormLinear(1, 5),
    ],
    ids=["conv2d-depthwise-1x1", "conv1d-depthwise-1", "conv3d-depthwise-1", "linear-1-in"],
)
def test_one_weight_per_output_channel_rejected(make):
    with pytest.raises(ValueError, match="2 weights per output channel"):
        make()


def test_accepted_options():
    """The boundaries the checks must accept."""
    EquiNormConv2d(3, 4, 3, momentum=0.0)
    EquiNormConv2d(3, 4, 3, momentum=1.0)
    EquiNormConv2d(3, 4, 3, momentum=None, stats_fraction=1.0, mode="exact", backend="reference")
    EquiNormConv2d(2, 2, (1, 2), groups=2)
    EquiNormLinear(2, 1)


@pytest.mark.parametrize(
    "layer,x",
    [
        (lambda: EquiNormConv2d(2, 3, 5), (1, 2, 3, 3)),
        (lambda: EquiNormConv2d(2, 3, 3, dilation=3), (1, 2, 5, 8)),
        (lambda: EquiNormConv2d(2, 3, 3, stride=2), (2, 3, 2)),
        (lambda: EquiNormConv1d(2, 3, 4), (1, 2, 3)),
        (lambda: EquiNormConv3d(2, 3, 3), (1, 2, 4, 2, 4)),
    ],
    ids=["conv2d-k5", "conv2d-dil3", "conv2d-unbatched-s2", "conv1d", "conv3d"],
)
@pytest.mark.parametrize("training", [True, False])
def test_spatial_input_too_small(layer, x, training):
    module = layer().train(training)
    with pytest.raises(ValueError, match="too small"):
        module(torch.rand(x))


@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: EquiNormConv2d(2, 3, 5), lambda: torch.rand(1, 2, 3, 3)),
        (
            lambda: EquiNormConv2d(3, 4, 3, statistic="mean"),
            lambda: torch.rand(2, 3, 6, 6) - torch.tensor([0.0, 0.9, 0.0]).view(1, 3, 1, 1),
        ),
        (lambda: EquiNormLinear(3, 4, statistic="mean"), lambda: torch.rand(5, 3) - torch.tensor([0.0, 0.0, 0.9])),
    ],
    ids=["too-small", "negative-mean-conv", "negative-mean-linear"],
)
def test_rejected_input_leaves_running_stats_untouched(make, x):
    """A forward that raises must not have updated running_mean or num_batches_tracked."""
    layer = make()
    with pytest.raises(ValueError):
        layer(x())
    assert torch.equal(layer.running_mean, torch.ones_like(layer.running_mean))
    assert int(layer.num_batches_tracked) == 0


# --------------------------------------------------------------------------------------------------
# A tiny model trains
# --------------------------------------------------------------------------------------------------
def test_tiny_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        EquiNormConv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        EquiNormConv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        EquiNormLinear(8, 2),
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=generator)
    labels = torch.arange(16) % 2
    x[:, 0] *= (1.0 + 1.5 * labels).view(16, 1, 1)  # class 1: brighter channel 0

    def full_loss(net):
        probe = copy.deepcopy(net)  # training-mode statistics, without touching net's buffers
        with torch.no_grad():
            return float(F.cross_entropy(probe(x), labels))

    start = full_loss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.randperm(16, generator=generator)
    for step in range(30):
        idx = order[(2 * step) % 16 : (2 * step) % 16 + 2]
        loss = F.cross_entropy(model(x[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
    end = full_loss(model)
    assert end < 0.7 * start, (start, end)
    assert int(model[0].num_batches_tracked) == 30
