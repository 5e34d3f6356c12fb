"""Correctness of the EquiNorm weight transform (``equinorm_weight``) of the pure-PyTorch reference.

Expected values come from hand computations (written out in the comments) or from the float64
oracle in ``equinorm_oracle.py``, never from the code under test. Forward tests run through both
``equinorm_kernels.reference`` and the public functional API.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import equinorm_kernels
from equinorm_kernels import reference

import equinorm_oracle as oracle

MODES = ("single_pass", "exact")


@pytest.fixture(params=["reference", "functional"])
def api(request):
    """The module whose ``equinorm_weight``/``channel_mean`` is tested."""
    return reference if request.param == "reference" else equinorm_kernels


def _weight(shape, seed, dtype=torch.float64):
    """Random weights kept away from 0 (sign indicators must not flip under small perturbations)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (w + 0.05 * torch.sign(w)).to(dtype)


def _means(channels, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + seed)
    return (0.1 + torch.rand(channels, generator=gen, dtype=torch.float64)).to(dtype)


def _gain(out_channels, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(2000 + seed)
    return (0.5 + torch.rand(out_channels, generator=gen, dtype=torch.float64)).to(dtype)


def _close(got, expected, rtol=1e-10, atol=1e-12):
    got = oracle.to_numpy(got)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_hand_2x2_kernel_where_modes_differ(api, ratio):
    # One input and one output channel, mu = 2, K = 4.
    #   w = [[8, 0.5], [-2, -2.5]]     W = 4,  M = 2,  b = -(2 * 4) / (4 * 2) = -1
    #   u = w + b = [[7, -0.5], [-3, -3.5]]   (the 0.5 weight changes sign)
    # exact:       q = 7,   P = 2 * 7 = 14,                     s = rho / 14
    # single_pass: p = 8.5, n = 2, P = 2 * (8.5 + (-1) * 2) = 13,  s = rho / 13
    w = _t([[[[8.0, 0.5], [-2.0, -2.5]]]])
    mu = _t([2.0])
    u = np.array([[[[7.0, -0.5], [-3.0, -3.5]]]])
    exact = api.equinorm_weight(w, mu, ratio=ratio, mode="exact")
    single = api.equinorm_weight(w, mu, ratio=ratio, mode="single_pass")
    _close(exact, u * ratio / 14)  # [[0.5, -1/28], [-3/14, -0.25]] for rho = 1
    _close(single, u * ratio / 13)
    _close(api.equinorm_weight(w, mu, ratio=ratio), u * ratio / 13)  # single_pass is the default


def test_hand_2x2_kernel_where_modes_agree(api):
    # w = [[3, -1], [1, -3]]: W = 0, b = 0, u = w, no sign changes.
    # exact: q = 3 + 1 = 4, P = 2 * 4 = 8; single_pass: p = 4, n = 2, P = 2 * (4 + 0) = 8.  s = 1/8.
    w = _t([[[[3.0, -1.0], [1.0, -3.0]]]])
    mu = _t([2.0])
    expected = [[[[0.375, -0.125], [0.125, -0.375]]]]
    for mode in MODES:
        _close(api.equinorm_weight(w, mu, mode=mode), expected)


@pytest.mark.parametrize("mode", MODES)
def test_hand_two_input_channels_unequal_means(api, mode):
    # Conv1d weight (D=1, C=2, K=2), mu = [1, 3], rho = 2, gain = 1.5.
    #   w[0, 0] = [2, -1]  -> W_0 = 1;   w[0, 1] = [1, -2] -> W_1 = -1;   M = 4
    #   b = -(1 * 1 + 3 * (-1)) / (2 * 4) = 0.25
    #   u[0, 0] = [2.25, -0.75], u[0, 1] = [1.25, -1.75]
    # exact:       q = [2.25, 1.25], P = 1 * 2.25 + 3 * 1.25 = 6
    # single_pass: p = [2, 1], n = [1, 1], P = 1 * (2 + 0.25) + 3 * (1 + 0.25) = 6
    # s = 2 / 6, times gain 1.5 -> 0.5:  w'' = [[1.125, -0.375], [0.625, -0.875]]
    # (with equal weighting of the channels, b would be 0 and P = 3: the means matter)
    w = _t([[[2.0, -1.0], [1.0, -2.0]]])
    mu = _t([1.0, 3.0])
    out = api.equinorm_weight(w, mu, ratio=2.0, mode=mode, gain=_t([1.5]))
    _close(out, [[[1.125, -0.375], [0.625, -0.875]]])


@pytest.mark.parametrize("mode", MODES)
def test_hand_groups_one_channel_per_group(api, mode):
    # weight (2, 1, 2), groups = 2, mu = [2, 5]: output 0 reads input 0, output 1 reads input 1.
    # d=0: w = [3, -1],  W = 2,  M = 2, b = -(2 * 2) / (2 * 2) = -1,   u = [2, -2]
    #      exact q = 2, P = 4;  single p = 3, n = 1, P = 2 * (3 - 1) = 4   -> s = 1/4 -> [0.5, -0.5]
    # d=1: w = [-1, 4],  W = 3,  M = 5, b = -(5 * 3) / (2 * 5) = -1.5, u = [-2.5, 2.5]
    #      exact q = 2.5, P = 12.5; single p = 4, n = 1, P = 5 * (4 - 1.5) = 12.5 -> s = 0.08 -> [-0.2, 0.2]
    # (reading the other group's mean would give [0.2, -0.2] and [-0.5, 0.5])
    w = _t([[[3.0, -1.0]], [[-1.0, 4.0]]])
    out = api.equinorm_weight(w, _t([2.0, 5.0]), groups=2, mode=mode)
    _close(out, [[[0.5, -0.5]], [[-0.2, 0.2]]])


@pytest.mark.parametrize("mode", MODES)
def test_hand_groups_two_channels_per_group(api, mode):
    # weight (2, 2, 1) (1x1 Conv1d), groups = 2, C = 4, mu = [1, 3, 2, 4], K = 1.
    # d=0 reads inputs 0, 1 (mu 1, 3): w = [2, -1], M = 4, b = -(1*2 + 3*(-1)) / 4 = 0.25,
    #      u = [2.25, -0.75]; exact P = 1 * 2.25 = 2.25; single P = 1 * (2 + 0.25) = 2.25
    #      s = 4/9 -> [1, -1/3]
    # d=1 reads inputs 2, 3 (mu 2, 4): w = [-1, 0.5], M = 6, b = -(2*(-1) + 4*0.5) / 6 = 0,
    #      u = [-1, 0.5]; exact P = 4 * 0.5 = 2; single P = 4 * (0.5 + 0) = 2; s = 0.5 -> [-0.5, 0.25]
    w = _t([[[2.0], [-1.0]], [[-1.0], [0.5]]])
    out = api.equinorm_weight(w, _t([1.0, 3.0, 2.0, 4.0]), groups=2, mode=mode)
    _close(out, [[[1.0], [-1.0 / 3.0]], [[-0.5], [0.25]]])


@pytest.mark.parametrize("mode", MODES)
def test_hand_fallback_when_only_live_input_is_one_signed(api, mode):
    # weight (1, 2, 2), mu = [1, 0]: input 1 is dead, so the weights that matter ([1, 2]) are all
    # positive and single_pass must use the exact P_d (its one-pass estimate is 1 * (3 - 1.5 * 2) = 0).
    #   W = [3, -4], M = 1, b = -(1 * 3) / (2 * 1) = -1.5
    #   u = [[-0.5, 0.5], [-4.5, -2.5]], exact q = [0.5, 0], P = 1 * 0.5 = 0.5, s = 2
    w = _t([[[1.0, 2.0], [-3.0, -1.0]]])
    out = api.equinorm_weight(w, _t([1.0, 0.0]), mode=mode)
    _close(out, [[[-1.0, 1.0], [-9.0, -5.0]]])


# ---------------------------------------------------------------------------------------------
# 2. Against the float64 oracle
# ---------------------------------------------------------------------------------------------

# (weight shape, groups, ratio)
CASES = [
    ((4, 3, 3, 3), 1, 1.0),  # Conv2d 3x3, C = 3
    ((5, 1, 3, 3), 1, 0.25),  # C = 1, rho != 1
    ((3, 2, 1, 1), 1, 1.0),  # 1x1 conv
    ((2, 3, 5, 5), 1, 0.75),  # 5x5
    ((6, 4, 3), 1, 1.0),  # Conv1d
    ((3, 2, 2, 3, 2), 1, 0.5),  # Conv3d
    ((7, 5), 1, 1.0),  # Linear (D, C)
    ((1, 3), 1, 1.0),  # Linear with a single output
    ((6, 2, 3, 3), 2, 1.0),  # groups = 2
    ((8, 1, 1, 3), 2, 1.3),  # groups = 2, one input channel and 4 outputs per group
    ((6, 1, 3, 3), 6, 1.0),  # depthwise 3x3
    ((4, 1, 2), 4, 2.0),  # depthwise Conv1d with 2 taps
    ((6, 1, 2, 2, 1), 3, 1.0),  # Conv3d, groups = 3
]
CASE_IDS = [f"{'x'.join(map(str, s))}-g{g}-r{r}" for s, g, r in CASES]


@pytest.mark.parametrize("with_gain", [False, True], ids=["nogain", "gain"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,groups,ratio", CASES, ids=CASE_IDS)
def test_matches_oracle_float64(api, shape, groups, ratio, mode, with_gain):
    seed = 31 * sum(shape) + len(shape) + groups
    w = _weight(shape, seed)
    mu = _means(shape[1] * groups, seed)
    gain = _gain(shape[0], seed) if with_gain else None
    out = api.equinorm_weight(w, mu, ratio=ratio, groups=groups, mode=mode, gain=gain)
    assert out.dtype == torch.float64 and out.shape == w.shape
    expected = oracle.equinorm_weight(w, mu, ratio=ratio, groups=groups, mode=mode, gain=gain)
    _close(out, expected)


def test_modes_really_differ_on_random_kernels(api):
    # Guards against both modes silently running the same formula.
    w = _weight((8, 3, 3, 3), 5)
    mu = _means(3, 5)
    single = api.equinorm_weight(w, mu, mode="single_pass")
    exact = api.equinorm_weight(w, mu, mode="exact")
    exp_single = oracle.equinorm_weight(w, mu, mode="single_pass")
    exp_exact = oracle.equinorm_weight(w, mu, mode="exact")
    assert np.abs(exp_single - exp_exact).max() > 1e-3
    _close(single, exp_single)
    _close(exact, exp_exact)


def test_default_arguments(api):
    # Defaults: ratio 1, groups 1, single_pass, no gain, eps 1e-5.
    w = _weight((3, 2, 3, 3), 11)
    mu = _means(2, 11)
    _close(api.equinorm_weight(w, mu), oracle.equinorm_weight(w, mu, mode="single_pass"))


# ---------------------------------------------------------------------------------------------
# 3. Properties from the note
# ---------------------------------------------------------------------------------------------

PROPERTY_CASES = [((5, 3, 3, 3), 1), ((6, 2, 3, 3), 2), ((4, 6), 1), ((6, 1, 5), 6), ((4, 2, 2, 2, 2), 2)]


def _per_output_mean_rows(weight, mean, groups):
    """mu[d, c] for the C/groups input channels output channel d reads (float64)."""
    out_channels, group_channels = weight.shape[0], weight.shape[1]
    rows = []
    for d in range(out_channels):
        g = d // (out_channels // groups)
        rows.append(mean[g * group_channels : (g + 1) * group_channels])
    return torch.stack(rows).double()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,groups", PROPERTY_CASES)
def test_weighted_kernel_sums_vanish(api, shape, groups, mode):
    # sum_c mu_c W''_dc = 0 for every d (the output mean is zero); b_d does this in both modes.
    w = _weight(shape, 21)
    mu = _means(shape[1] * groups, 21)
    out = api.equinorm_weight(w, mu, ratio=0.7, groups=groups, mode=mode)
    mrows = _per_output_mean_rows(w, mu, groups)
    kernel_sums = out.reshape(shape[0], shape[1], -1).sum(-1)
    balance = (mrows * kernel_sums).sum(-1)
    scale = (mrows * out.reshape(shape[0], shape[1], -1).abs().sum(-1)).sum(-1)
    assert torch.all(balance.abs() <= 1e-12 * scale)


@pytest.mark.parametrize("shape,groups", PROPERTY_CASES)
def test_exact_positive_mass_equals_ratio(api, shape, groups):
    # exact mode: sum_c mu_c q''_dc = rho for every d, q''_dc = sum_t max(w''_dct, 0).
    rho = 0.7
    w = _weight(shape, 22)
    mu = _means(shape[1] * groups, 22)
    out = api.equinorm_weight(w, mu, ratio=rho, groups=groups, mode="exact")
    mrows = _per_output_mean_rows(w, mu, groups)
    positive = out.reshape(shape[0], shape[1], -1).clamp_min(0).sum(-1)
    torch.testing.assert_close((mrows * positive).sum(-1), torch.full((shape[0],), rho, dtype=torch.float64))


@pytest.mark.parametrize("shape,groups", PROPERTY_CASES)
def test_single_pass_estimated_positive_mass_equals_ratio(api, shape, groups):
    # single_pass: s_d * sum_c mu_c (p_dc + b_d n_dc) = rho, i.e. the mass of w'' over the taps where
    # the *original* weight is positive is rho (the sign pattern of w, not of w'').
    rho = 1.6
    w = _weight(shape, 23)
    mu = _means(shape[1] * groups, 23)
    out = api.equinorm_weight(w, mu, ratio=rho, groups=groups, mode="single_pass")
    mrows = _per_output_mean_rows(w, mu, groups)
    masked = (out * (w > 0)).reshape(shape[0], shape[1], -1).sum(-1)
    positive = out.reshape(shape[0], shape[1], -1).clamp_min(0).sum(-1)
    flat = w.reshape(shape[0], -1)
    mixed = (flat > 0).any(-1) & (flat <= 0).any(-1)
    assert mixed.sum() >= shape[0] - 1
    # one-signed channels (all means are positive here) use the exact P_d instead
    mass = torch.where(mixed, (mrows * masked).sum(-1), (mrows * positive).sum(-1))
    torch.testing.assert_close(mass, torch.full((shape[0],), rho, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,groups", PROPERTY_CASES)
def test_invariant_to_positive_scaling_of_each_output_channel(api, shape, groups, mode):
    w = _weight(shape, 24)
    mu = _means(shape[1] * groups, 24)
    factors = torch.logspace(-2, 2, shape[0], dtype=torch.float64)
    scaled = w * factors.reshape(-1, *([1] * (w.dim() - 1)))
    base = api.equinorm_weight(w, mu, groups=groups, mode=mode)
    torch.testing.assert_close(api.equinorm_weight(scaled, mu, groups=groups, mode=mode), base, rtol=1e-11, atol=1e-13)


def _layer(api, x, weight, mode, conv, **conv_kwargs):
    """Training-mode EquiNorm layer output: mu from x, w'' from mu, then the conv."""
    mu = api.channel_mean(x)
    if conv is None:  # Linear
        return x @ api.equinorm_weight(weight, mu, mode=mode).T
    out_shape = conv(x, weight, **conv_kwargs).shape
    stride = conv_kwargs.get("stride", 1)
    strides = [stride] * (x.dim() - 2)
    rho = oracle.conv_ratio(x.shape[2:], out_shape[2:], strides)
    groups = conv_kwargs.get("groups", 1)
    return conv(x, api.equinorm_weight(weight, mu, ratio=rho, groups=groups, mode=mode), **conv_kwargs)


LAYERS = [
    ("conv2d", (4, 3, 3, 3), (2, 3, 7, 6), F.conv2d, {"padding": 1, "stride": 2}),
    ("conv2d_groups", (4, 2, 3, 3), (2, 4, 5, 5), F.conv2d, {"padding": 1, "groups": 2}),
    ("conv1d", (3, 2, 5), (3, 2, 11), F.conv1d, {}),
    ("conv3d", (2, 2, 2, 2, 2), (2, 2, 3, 4, 3), F.conv3d, {}),
    ("linear", (5, 4), (6, 4), None, {}),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [0.01, 7.5])
@pytest.mark.parametrize("name,wshape,xshape,conv,kwargs", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layer_output_invariant_to_input_scale(api, name, wshape, xshape, conv, kwargs, factor, mode):
    # conv(a x, w''(mu(a x))) == conv(x, w''(mu(x))): mu scales with a, w'' inversely.
    w = _weight(wshape, 25)
    gen = torch.Generator().manual_seed(26)
    x = torch.rand(xshape, generator=gen, dtype=torch.float64)
    base = _layer(api, x, w, mode, conv, **kwargs)
    scaled = _layer(api, factor * x, w, mode, conv, **kwargs)
    torch.testing.assert_close(scaled, base, rtol=1e-10, atol=1e-12)
    # and the weight itself scales inversely
    mu = api.channel_mean(x)
    torch.testing.assert_close(
        api.equinorm_weight(w, factor * mu, mode=mode, groups=kwargs.get("groups", 1)) * factor,
        api.equinorm_weight(w, mu, mode=mode, groups=kwargs.get("groups", 1)),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("mode", MODES)
def test_cyclic_conv_output_balance(api, mode):
    # The paper's setting (stride 1, cyclic padding, rho = 1): every weight meets every input, so
    # the output of each channel has mean 0, and in exact mode the positive weights contribute on
    # average exactly rho = 1 per output element.
    gen = torch.Generator().manual_seed(27)
    x = torch.rand((3, 3, 6, 5), generator=gen, dtype=torch.float64)
    w = _weight((4, 3, 3, 3), 27)
    wn = api.equinorm_weight(w, api.channel_mean(x), ratio=1.0, mode=mode)
    xp = F.pad(x, (1, 1, 1, 1), mode="circular")
    y = F.conv2d(xp, wn)
    assert y.shape == (3, 4, 6, 5)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    if mode == "exact":
        y_pos = F.conv2d(xp, wn.clamp_min(0))
        torch.testing.assert_close(y_pos.mean(dim=(0, 2, 3)), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_linear_output_balance(api, mode):
    gen = torch.Generator().manual_seed(28)
    x = torch.rand((9, 6), generator=gen, dtype=torch.float64)
    w = _weight((5, 6), 28)
    wn = api.equinorm_weight(w, api.channel_mean(x), mode=mode)
    torch.testing.assert_close((x @ wn.T).mean(0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    if mode == "exact":
        torch.testing.assert_close((x @ wn.clamp_min(0).T).mean(0), torch.ones(5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# 4. Backward
# ---------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    ((4, 3, 3, 3), 1, 1.0),
    ((5, 1, 3, 3), 1, 0.25),
    ((6, 2, 3, 3), 2, 1.0),
    ((8, 1, 1, 3), 2, 1.3),
    ((6, 1, 3, 3), 6, 1.0),
    ((6, 4, 3), 1, 0.8),
    ((3, 2, 2, 3, 2), 1, 0.5),
    ((7, 5), 1, 1.0),
]


@pytest.mark.parametrize("with_gain", [False, True], ids=["nogain", "gain"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape,groups,ratio", BACKWARD_CASES, ids=[f"{'x'.join(map(str, s))}-g{g}" for s, g, _ in BACKWARD_CASES]
)
def test_autograd_matches_closed_form_backward(shape, groups, ratio, mode, with_gain):
    seed = 31 + len(shape) * 7 + groups
    w = _weight(shape, seed).requires_grad_()
    mu = _means(shape[1] * groups, seed).requires_grad_()
    gain = _gain(shape[0], seed).requires_grad_() if with_gain else None
    out = reference.equinorm_weight(w, mu, ratio=ratio, groups=groups, mode=mode, gain=gain)
    grad_out = _weight(shape, seed + 1)
    out.backward(grad_out)
    exp_w, exp_mu, exp_gain = oracle.equinorm_weight_backward(
        w, mu, grad_out, ratio=ratio, groups=groups, mode=mode, gain=gain
    )
    _close(w.grad, exp_w, rtol=1e-9, atol=1e-11)
    _close(mu.grad, exp_mu, rtol=1e-9, atol=1e-11)
    if with_gain:
        _close(gain.grad, exp_gain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", MODES)
def test_backward_with_fallback_channels_and_dead_inputs(mode):
    # One all-positive and one all-negative output channel (single_pass falls back to exact P_d
    # there), and a dead input channel.
    w = _weight((4, 3, 2, 2), 41)
    w[0] = w[0].abs()
    w[1] = -w[1].abs()
    w.requires_grad_()
    mu = _t([0.6, 0.0, 1.3]).requires_grad_()
    gain = _gain(4, 41).requires_grad_()
    out = reference.equinorm_weight(w, mu, mode=mode, gain=gain, ratio=0.9)
    grad_out = _weight((4, 3, 2, 2), 42)
    out.backward(grad_out)
    exp_w, exp_mu, exp_gain = oracle.equinorm_weight_backward(w, mu, grad_out, mode=mode, gain=gain, ratio=0.9)
    _close(w.grad, exp_w, rtol=1e-9, atol=1e-11)
    _close(mu.grad, exp_mu, rtol=1e-9, atol=1e-11)
    _close(gain.grad, exp_gain, rtol=1e-9, atol=1e-11)


def test_functional_backward_matches_closed_form():
    w = _weight((6, 2, 3, 3), 43).requires_grad_()
    mu = _means(4, 43).requires_grad_()
    gain = _gain(6, 43).requires_grad_()
    out = equinorm_kernels.equinorm_weight(w, mu, groups=2, gain=gain, ratio=1.2)
    grad_out = _weight((6, 2, 3, 3), 44)
    out.backward(grad_out)
    exp_w, exp_mu, exp_gain = oracle.equinorm_weight_backward(w, mu, grad_out, groups=2, gain=gain, ratio=1.2)
    _close(w.grad, exp_w, rtol=1e-9, atol=1e-11)
    _close(mu.grad, exp_mu, rtol=1e-9, atol=1e-11)
    _close(gain.grad, exp_gain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,groups", [((3, 2, 2, 2), 1), ((4, 2, 2, 1), 2), ((3, 4), 1)])
def test_gradcheck_equinorm_weight(shape, groups, mode):
    w = _weight(shape, 51).requires_grad_()
    mu = _means(shape[1] * groups, 51).requires_grad_()
    gain = _gain(shape[0], 51).requires_grad_()

    def fn(weight, mean, g):
        return reference.equinorm_weight(weight, mean, ratio=1.3, groups=groups, mode=mode, gain=g)

    assert torch.autograd.gradcheck(fn, (w, mu, gain), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_mean_through_weight_composition(mode):
    # x -> channel_mean -> equinorm_weight, gradients to x, weight and gain at once.
    gen = torch.Generator().manual_seed(52)
    x = (0.1 + torch.rand((3, 2, 3, 2), generator=gen, dtype=torch.float64)).requires_grad_()
    w = _weight((3, 2, 2, 2), 52).requires_grad_()
    gain = _gain(3, 52).requires_grad_()

    def fn(inp, weight, g):
        return reference.equinorm_weight(weight, reference.channel_mean(inp, stats_fraction=0.6), mode=mode, gain=g)

    assert torch.autograd.gradcheck(fn, (x, w, gain), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("stats_fraction,rows", [(1.0, 6), (0.5, 3), (0.25, 2)])
@pytest.mark.parametrize("mode", MODES)
def test_input_gradient_is_per_channel_constant(api, mode, stats_fraction, rows):
    # dL/dx[n, c, ...] = dL/dmu_c / (rows * H * W) for the samples that fed mu, 0 for the others.
    gen = torch.Generator().manual_seed(53)
    x = torch.rand((6, 3, 4, 5), generator=gen, dtype=torch.float64).requires_grad_()
    w = _weight((4, 3, 3, 3), 53)
    mu = api.channel_mean(x, stats_fraction=stats_fraction)
    out = api.equinorm_weight(w, mu, mode=mode, ratio=0.8)
    grad_out = _weight((4, 3, 3, 3), 54)
    out.backward(grad_out)
    _, exp_mu, _ = oracle.equinorm_weight_backward(w, mu, grad_out, mode=mode, ratio=0.8)
    expected = np.zeros(x.shape)
    expected[:rows] = exp_mu[None, :, None, None] / (rows * 4 * 5)
    _close(x.grad, expected, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 6. dtypes and memory formats
# ---------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((8, 4, 3, 3), 1), ((6, 2, 3, 3), 2), ((7, 5), 1)])
def test_low_precision_weight(api, dtype, mode, shape, groups):
    # The result is computed in fp32 and rounded once to the weight's dtype, so it must match the
    # float64 oracle (fed the exact same low-precision values) to within that rounding (unit
    # roundoff u of the dtype, relative) plus the fp32 computation error (sums of <= 36 terms:
    # well under 1e-5 of the largest weight).
    w = _weight(shape, 61, dtype)
    mu = _means(shape[1] * groups, 61, torch.float32)
    gain = _gain(shape[0], 61, dtype)
    out = api.equinorm_weight(w, mu, ratio=0.9, groups=groups, mode=mode, gain=gain)
    assert out.dtype == dtype and out.shape == w.shape
    expected = oracle.equinorm_weight(w, mu, ratio=0.9, groups=groups, mode=mode, gain=gain)
    atol = 1e-5 * np.abs(expected).max()
    _close(out, expected, rtol=UNIT_ROUNDOFF[dtype] * 1.001, atol=atol)


def test_mixed_precision_operands_accumulate_in_float64():
    # A float64 mean makes the computation float64; the output keeps the weight's dtype.
    w = _weight((4, 3, 3, 3), 62, torch.float32)
    mu = _means(3, 62, torch.float64)
    out = reference.equinorm_weight(w, mu, mode="exact")
    assert out.dtype == torch.float32
    _close(out, oracle.equinorm_weight(w, mu, mode="exact"), rtol=2.0**-24 * 1.001, atol=1e-30)
    out64 = reference.equinorm_weight(w.double(), mu.float(), mode="exact")
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_channels_last_weight(api, dtype):
    w = _weight((5, 3, 3, 3), 63, dtype).contiguous(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    mu = _means(3, 63)
    out = api.equinorm_weight(w, mu, mode="exact")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == dtype
    expected = oracle.equinorm_weight(w, mu, mode="exact")
    if dtype == torch.float64:
        _close(out, expected)
    else:
        _close(out, expected, rtol=UNIT_ROUNDOFF[dtype] * 1.001, atol=1e-5 * np.abs(expected).max())


def test_channels_last_3d_weight(api):
    w = _weight((4, 2, 2, 3, 2), 64).contiguous(memory_format=torch.channels_last_3d)
    mu = _means(2, 64)
    out = api.equinorm_weight(w, mu)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    _close(out, oracle.equinorm_weight(w, mu))


@pytest.mark.parametrize(
    "make",
    [
        lambda w: w.transpose(0, 1).contiguous().transpose(0, 1),  # permuted strides
        lambda w: torch.cat([w, w], dim=-1)[..., ::2],  # strided slice
        lambda w: w.transpose(2, 3),  # transposed kernel
    ],
    ids=["permuted", "strided", "transposed"],
)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_weight(api, make, mode):
    base = _weight((4, 3, 3, 2), 65)
    w = make(base)
    assert not w.is_contiguous()
    mu = _means(3, 65)
    gain = _gain(4, 65)
    out = api.equinorm_weight(w, mu, mode=mode, gain=gain)
    assert out.shape == w.shape
    _close(out, oracle.equinorm_weight(w, mu, mode=mode, gain=gain))


def test_mean_and_gain_non_contiguous(api):
    w = _weight((4, 3, 3, 3), 66)
    mu = _means(6, 66)[::2]
    gain = _gain(8, 66)[1::2]
    assert not mu.is_contiguous() and not gain.is_contiguous()
    _close(api.equinorm_weight(w, mu, gain=gain), oracle.equinorm_weight(w, mu, gain=gain))


# ---------------------------------------------------------------------------------------------
# 7. Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_pass_falls_back_to_exact_for_one_signed_channels(api, dtype):
    w = _weight((3, 2, 2, 2), 71)
    w[0] = w[0].abs()  # all positive
    w[1] = -w[1].abs()  # all negative
    # mixed; with mu = [0.5, 1.5]: b = -(0.5 * 4 + 1.5 * 1.2) / (4 * 2) = -0.475 turns the 0.2 negative
    w[2] = _t([[[8.0, 0.5], [-2.0, -2.5]], [[3.0, 0.2], [-1.0, -1.0]]])
    w = w.to(dtype)
    mu = _t([0.5, 1.5]).to(dtype)
    single = api.equinorm_weight(w, mu, mode="single_pass")
    exact = api.equinorm_weight(w, mu, mode="exact")
    assert torch.isfinite(single).all()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    exp_exact = oracle.equinorm_weight(w, mu, mode="exact")
    exp_single = oracle.equinorm_weight(w, mu, mode="single_pass")
    # one-signed channels: the exact-mode result
    _close(single[:2], exp_exact[:2], **tol)
    torch.testing.assert_close(single[:2], exact[:2], **tol)
    # the mixed channel keeps the one-pass estimate, which differs from exact here
    _close(single[2:], exp_single[2:], **tol)
    assert np.abs(exp_single[2] - exp_exact[2]).max() > 1e-2
    # and is what it would be on its own
    torch.testing.assert_close(single[2:], api.equinorm_weight(w[2:], mu, mode="single_pass"), **tol)


@pytest.mark.parametrize("mode", MODES)
def test_dead_input_channels(api, mode):
    w = _weight((5, 4, 3, 3), 72)
    mu = _t([0.0, 0.8, 0.0, 1.7])
    out = api.equinorm_weight(w, mu, mode=mode, ratio=0.6)
    assert torch.isfinite(out).all()
    _close(out, oracle.equinorm_weight(w, mu, mode=mode, ratio=0.6))


@pytest.mark.parametrize("mode", MODES)
def test_dead_input_channels_backward_finite(mode):
    w = _weight((5, 4, 3, 3), 73).requires_grad_()
    mu = _t([0.0, 0.8, 0.0, 1.7]).requires_grad_()
    out = reference.equinorm_weight(w, mu, mode=mode)
    grad_out = _weight((5, 4, 3, 3), 74)
    out.backward(grad_out)
    exp_w, exp_mu, _ = oracle.equinorm_weight_backward(w, mu, grad_out, mode=mode)
    _close(w.grad, exp_w, rtol=1e-9, atol=1e-11)
    _close(mu.grad, exp_mu, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_all_zero_means_give_zero_weights(api, mode, dtype):
    # No input carries any mass: P_d = 0 <= eps * 0, so every channel gets a zero weight, with
    # finite (zero) gradients.
    w = _weight((3, 2, 3, 3), 75, dtype).requires_grad_()
    mu = torch.zeros(2, dtype=dtype, requires_grad=True)
    gain = _gain(3, 75, dtype).requires_grad_()
    out = api.equinorm_weight(w, mu, mode=mode, ratio=0.5, gain=gain)
    assert torch.isfinite(out).all()
    _close(out, np.zeros(w.shape), rtol=0, atol=0)
    _close(out, oracle.equinorm_weight(w, mu, mode=mode, ratio=0.5, gain=gain), rtol=0, atol=0)
    out.backward(_weight((3, 2, 3, 3), 76, dtype))
    for grad in (w.grad, mu.grad, gain.grad):
        assert torch.isfinite(grad).all()
    _close(w.grad, np.zeros(w.shape), rtol=0, atol=0)
    _close(gain.grad, np.zeros(3), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_all_zero_means_with_large_weights_have_finite_gradients(mode, dtype):
    w = (1e4 * _weight((2, 4, 5, 5), 77, dtype)).requires_grad_()
    mu = torch.zeros(4, dtype=dtype, requires_grad=True)
    out = reference.equinorm_weight(w, mu, mode=mode)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(w.grad).all() and torch.isfinite(mu.grad).all()


@pytest.mark.parametrize("mode", MODES)
def test_zero_weight_threshold_is_relative(api, mode):
    # Channel 0: a constant 0.7 plus a 1e-3 ripple -> P_d / (sum mu |w|) ~ 1e-4 > eps = 1e-5, a
    #            genuine (if nearly flat) kernel: normalised like any other.
    # Channel 1: the same with a 1e-9 ripple -> ratio ~ 1e-10 <= eps: zero weight.
    # Channel 2: an ordinary random kernel.
    # The decision must not depend on the scale of the weight or of the means.
    ripple = _weight((2, 3, 3), 78)
    w = torch.empty((3, 2, 3, 3), dtype=torch.float64)
    w[0] = 0.7 + 1e-3 * ripple
    w[1] = 0.7 + 1e-9 * ripple
    w[2] = _weight((2, 3, 3), 79)
    mu = _t([0.4, 1.1])
    expected = oracle.equinorm_weight(w, mu, mode=mode)
    assert np.abs(expected[0]).max() > 0.05 and np.abs(expected[1]).max() == 0
    for w_scale, mu_scale in [(1.0, 1.0), (1e-8, 1.0), (1e6, 1.0), (1.0, 1e-9), (1.0, 1e7)]:
        out = api.equinorm_weight(w * w_scale, mu * mu_scale, mode=mode)
        _close(out * mu_scale, expected, rtol=1e-6, atol=1e-9)
        assert float(out[1].abs().max()) == 0.0
    # a larger eps also zeroes the nearly flat channel, and only it
    coarse = api.equinorm_weight(w, mu, mode=mode, eps=1e-2)
    _close(coarse, oracle.equinorm_weight(w, mu, mode=mode, eps=1e-2), rtol=1e-6, atol=1e-9)
    assert float(coarse[0].abs().max()) == 0.0 and float(coarse[2].abs().max()) > 0


@pytest.mark.parametrize("mode", MODES)
def test_zero_weight_channels_backward(mode):
    # A constant kernel (zero weight) next to ordinary ones: its gradients are zero, the others
    # match the closed form, and nothing is NaN.
    w = _weight((4, 3, 2, 2), 80)
    w[1] = -0.35
    w.requires_grad_()
    mu = _means(3, 80).requires_grad_()
    gain = _gain(4, 80).requires_grad_()
    out = reference.equinorm_weight(w, mu, mode=mode, gain=gain)
    grad_out = _weight((4, 3, 2, 2), 81)
    out.backward(grad_out)
    exp_w, exp_mu, exp_gain = oracle.equinorm_weight_backward(w, mu, grad_out, mode=mode, gain=gain)
    assert np.all(exp_w[1] == 0) and exp_gain[1] == 0
    _close(w.grad, exp_w, rtol=1e-9, atol=1e-11)
    _close(mu.grad, exp_mu, rtol=1e-9, atol=1e-11)
    _close(gain.grad, exp_gain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_all_equal_kernel_gives_zeros(api, mode, dtype):
    # u = w + b = 0 for a constant kernel: nothing to normalise, so w'' = 0 (a zero weight, never
    # NaN/Inf); the other output channel is unaffected. "Zero" allows the rounding error of an
    # ordinary weight of the same tensor (16 unit roundoffs of the computing dtype), not a
    # rounding residue of b scaled up to unit mass.
    roundoff = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    not_zero = []
    for value in (0.0, 0.5, -1.25, 0.3, -0.7):
        w = _weight((2, 3, 3, 3), 76, dtype)
        w[0] = value
        mu = _means(3, 76, dtype)
        out = api.equinorm_weight(w, mu, mode=mode)
        assert torch.isfinite(out).all()
        _close(out[1], oracle.equinorm_weight(w[1:], mu, mode=mode)[0], rtol=rtol, atol=1e-6 * rtol)
        largest = float(out[0].abs().max())
        if largest > 16 * roundoff * float(out[1].abs().max()):
            not_zero.append(f"w = {value}: max |w''| = {largest:.3g}")
    assert not not_zero, "constant kernels give non-zero weights: " + "; ".join(not_zero)


@pytest.mark.parametrize("shape,groups", [((3, 1, 1, 1), 1), ((3, 1), 1), ((2, 1, 1), 2), ((4, 1, 1, 1, 1), 4)])
def test_one_weight_per_output_channel_is_rejected(api, shape, groups):
    w = _weight(shape, 77)
    with pytest.raises(ValueError, match="weight"):
        api.equinorm_weight(w, _means(shape[1] * groups, 77), groups=groups)
