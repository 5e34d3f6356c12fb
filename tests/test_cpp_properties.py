"""The C++ CPU kernels against the float64 reference on shapes, layouts and options drawn at random.

Where test_ops_equinorm.py and test_ops_enorm.py walk a fixed table of cases, hypothesis draws the
combinations here: batch, channels, 0 to 3 spatial dims, kernel sizes from 1x1 up, groups up to
depthwise, NCHW / channels_last / strided views of x and of the weight, the four float dtypes, both
modes, stats_fraction, ratio and gain, and small MLPs and CNNs for ENorm. Examples are derandomized,
so every run (and CI) checks the same cases. tools/sanitized_cpu_tests.py runs this module against
an ASan + UBSan build of the kernels, where an out-of-bounds index on an odd shape is reported.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import equinorm_kernels
from equinorm_kernels import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_ops_equinorm import _max_error  # noqa: E402

pytestmark = pytest.mark.skipif(
    "cpp" not in equinorm_kernels.available_backends("cpu"), reason="the C++ extension is not built"
)

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,  # derandomized: nothing to replay, and nothing written into the checkout
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout``: "contiguous", "channels_last" (4-D/5-D only), "strided" (a
    view with its first two dims' strides swapped) or "sliced" (every other element of dim 0 and
    of the last dim of a larger tensor, so no dim has unit stride)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":
        shape = list(t.shape)
        shape[0], shape[-1] = 2 * shape[0], 2 * shape[-1]
        padded = torch.full(shape, float("nan"), dtype=t.dtype)  # a kernel reading between the views sees NaN
        view = padded[::2, ..., ::2]
        view.copy_(t)
        return view
    return t


def _layouts(dims: int) -> list[str]:
    return ["contiguous", "strided", "sliced"] + (["channels_last"] if dims in (4, 5) else [])


@st.composite
def equinorm_cases(draw):
    """Shapes, values and options of one EquiNorm call (float64 tensors; each test casts them to
    the dtype it is parametrized with, so every dtype gets the same number of examples)."""
    spatial_dims = draw(st.integers(0, 3))  # 0: a Linear layer
    if spatial_dims == 0:
        groups, group_channels = 1, draw(st.integers(2, 9))
        kernel = ()
    else:
        kernel = tuple(draw(st.sampled_from([1, 1, 2, 3, 5])) for _ in range(spatial_dims))
        depthwise = draw(st.booleans())
        groups = draw(st.integers(1, 6)) if depthwise else draw(st.integers(1, 3))
        group_channels = 1 if depthwise else draw(st.integers(1, 5))
        if group_channels * math.prod(kernel) < 2:  # EquiNorm needs two weights per output channel
            kernel = (2,) + kernel[1:]
    out_channels = groups * draw(st.integers(1, 3))
    channels = groups * group_channels
    input_extent = tuple(draw(st.integers(1, 6)) for _ in range(spatial_dims))
    batch = draw(st.integers(1, 5))
    weight_shape = (out_channels, group_channels, *kernel)
    x_shape = (batch, channels, *input_extent)

    seed = draw(st.integers(0, 2**31 - 1))
    weight = torch.randn(weight_shape, generator=_generator(seed), dtype=torch.float64)
    x = torch.rand(x_shape, generator=_generator(seed + 1), dtype=torch.float64)
    if draw(st.booleans()):  # the single_pass fallback: an output channel whose weights share one sign
        weight[0] = weight[0].abs() + 0.1
    if channels > 1 and draw(st.booleans()):  # an input channel with mean 0, which the weight must ignore
        x[:, draw(st.integers(0, channels - 1))] = 0
    gain = None
    if draw(st.booleans()):
        gain = torch.empty(out_channels, dtype=torch.float64).uniform_(-2.0, 2.0, generator=_generator(seed + 2))
    return {
        "x": x,
        "weight": weight,
        "gain": gain,
        "groups": groups,
        "x_layout": draw(st.sampled_from(_layouts(x.dim()))),
        "weight_layout": draw(st.sampled_from(_layouts(weight.dim()))),
        "mode": draw(st.sampled_from(["single_pass", "exact"])),
        "stats_fraction": draw(st.sampled_from([1.0, 0.7, 0.5, 0.2])),
        "ratio": draw(st.sampled_from([1.0, 0.25, 1.7, 9.0])),
    }


def _operands(case, dtype: torch.dtype):
    """x, weight and gain of ``case`` in ``dtype`` (gain in the accumulation dtype) and their layouts."""
    x = _lay_out(case["x"].to(dtype), case["x_layout"])
    weight = _lay_out(case["weight"].to(dtype), case["weight_layout"])
    gain = None if case["gain"] is None else case["gain"].to(_accumulation_dtype(dtype))
    return x, weight, gain


def _forward(case, backend: str, x, weight, gain):
    options = dict(ratio=case["ratio"], groups=case["groups"], mode=case["mode"], gain=gain)
    if backend == "reference":
        mean = reference.channel_mean(x, stats_fraction=case["stats_fraction"])
        return reference.equinorm_weight(weight, mean, **options), mean
    return equinorm_kernels.equinorm_forward(x, weight, stats_fraction=case["stats_fraction"], backend=backend, **options)


def _forward_and_gradients(case, backend: str, dtype: torch.dtype):
    """(out, mean, d/dx, d/dweight, d/dgain) of ``backend`` on ``case``'s operands in ``dtype``."""
    x, weight, gain = _operands(case, dtype)
    leaves = [t.requires_grad_() for t in (x, weight, gain) if t is not None]
    out, mean = _forward(case, backend, x, weight, gain)
    grads = torch.autograd.grad(out, leaves, _upstream(out))
    return (out.detach(), mean.detach(), *grads)


def _upstream(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=_generator(7), dtype=torch.float64).to(out.dtype)


def _assert_close_to_reference(kernel, same_precision, truth, dtype: torch.dtype, what: str, *, gradient_scale: float = 0.0) -> None:
    """test_ops_equinorm.assert_matches_reference's rule: fp64 within 1e-12 of the largest value,
    fp32 within 2e-6, fp16/bf16 within twice the error of the reference run in that precision.

    Random cases include ill-conditioned ones (a positive mass P_d that is a small difference of
    large terms), where the reference run in fp32 is itself further than 2e-6 from the fp64
    truth: fp32 then also gets twice the reference's error. Gradients are judged against the larger
    of their own magnitude and ``gradient_scale`` (see _gradient_scale), fp64 within 1e-10 as
    test_ops_equinorm.py's gradient checks; in fp16/bf16 at least one unit in the last place of
    that scale is allowed, as a gradient that cancels to zero is rounding noise in both runs, and
    the reference's noise may happen to be smaller."""
    scale = max(truth.abs().max().item(), gradient_scale, 1e-30)
    same_precision_error = _max_error(same_precision, truth)
    if dtype == torch.float64:
        tolerance = (1e-10 if gradient_scale else 1e-12) * scale
    elif dtype == torch.float32:
        tolerance = max(2e-6 * scale, 2 * same_precision_error)
    else:
        floor = torch.finfo(dtype).eps if gradient_scale else 1e-6
        tolerance = 2 * same_precision_error + floor * scale
    error = _max_error(kernel, truth)
    assert error <= tolerance, f"{what}: max error {error:.3g} > tolerance {tolerance:.3g} (scale {scale:.3g})"


def _gradient_scale(case, upstream: torch.Tensor, out: torch.Tensor, leaf: torch.Tensor) -> float:
    """Magnitude of the terms that d<upstream, out>/d leaf sums, the scale of its rounding noise.

    out is homogeneous of degree 0 or 1 in each operand, so each of its out.numel() / leaf.numel()
    terms per leaf element is about |upstream| |out| / |leaf|, times the condition number of the
    positive mass, kappa_d = sum_c mu_c sum_t |u_dct| / P_d (the mu-weighted sum of |w''| at
    ratio 1 without gain), as the backward divides sums of size sum mu |u| by P_d. A gradient that
    cancels to zero (a weight with two entries per output channel leaves w'' unchanged under any
    change of w) is then judged on its rounding noise against this scale, not against its own
    vanishing size."""
    mean = reference.channel_mean(case["x"], stats_fraction=case["stats_fraction"])
    unit = reference.equinorm_weight(case["weight"], mean, groups=case["groups"], mode=case["mode"])
    unit = unit.reshape(unit.shape[0], unit.shape[1], -1).abs().sum(dim=-1)  # (D, C/groups)
    mu = mean.reshape(case["groups"], -1).repeat_interleave(unit.shape[0] // case["groups"], dim=0)
    kappa = (mu * unit).sum(dim=-1).max().clamp_min(1.0)
    terms_per_element = out.numel() / leaf.numel()
    magnitude = upstream.abs().max() * out.abs().max() / leaf.abs().max().clamp_min(1e-30)
    return (terms_per_element * magnitude * kappa).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=equinorm_cases())
@PROPERTY_SETTINGS
def test_forward_and_gradients_match_the_float64_reference(dtype, case):
    got = _forward_and_gradients(case, "cpp", dtype)
    same_precision = _forward_and_gradients(case, "reference", dtype)
    truth = _forward_and_gradients(case, "reference", torch.float64)

    x, weight, _ = _operands(case, dtype)
    out, mean = got[0], got[1]
    assert out.dtype == dtype and out.shape == weight.shape
    assert mean.dtype == _accumulation_dtype(dtype) and mean.shape == (x.shape[1],)
    if weight.dim() in (4, 5) and case["weight_layout"] == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last if weight.dim() == 4 else torch.channels_last_3d)
    _assert_close_to_reference(out, same_precision[0], truth[0], dtype, "out")
    _assert_close_to_reference(mean, same_precision[1], truth[1], dtype, "mean")
    leaves = [case["x"], case["weight"]] + ([] if case["gain"] is None else [case["gain"]])
    for name, leaf, g, s, t in zip(["d/dx", "d/dweight", "d/dgain"], leaves, got[2:], same_precision[2:], truth[2:]):
        scale = _gradient_scale(case, _upstream(truth[0]), truth[0], leaf)
        _assert_close_to_reference(g, s, t, dtype, name, gradient_scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=equinorm_cases())
@PROPERTY_SETTINGS
def test_channel_mean_and_its_gradient_match_the_float64_reference(dtype, case):
    fraction = case["stats_fraction"]

    def mean_and_gradient(backend, dtype):
        x = _lay_out(case["x"].to(dtype), case["x_layout"]).requires_grad_()
        if backend == "reference":
            mean = reference.channel_mean(x, stats_fraction=fraction)
        else:
            mean = equinorm_kernels.channel_mean(x, stats_fraction=fraction, backend=backend)
        upstream = torch.linspace(-1.0, 1.0, mean.numel(), dtype=mean.dtype)
        (grad,) = torch.autograd.grad(mean, [x], upstream)
        return mean.detach(), grad

    got = mean_and_gradient("cpp", dtype)
    same_precision = mean_and_gradient("reference", dtype)
    truth = mean_and_gradient("reference", torch.float64)
    assert got[0].dtype == _accumulation_dtype(dtype)
    for name, g, s, t in zip(["mean", "d/dx"], got, same_precision, truth):
        _assert_close_to_reference(g, s, t, dtype, name)


# ---------------------------------------------------------------------------------------------
# ENorm
# ---------------------------------------------------------------------------------------------


@st.composite
def enorm_networks(draw):
    """(model, ENorm options, dtype, cycles): a Linear chain, or dense and depthwise convs ending in
    a Linear over the flattened feature map."""
    bias = draw(st.booleans())
    if draw(st.booleans()):
        widths = [draw(st.integers(1, 6)) for _ in range(draw(st.integers(3, 5)))]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out, bias=bias), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
    else:
        extent = draw(st.integers(3, 6))
        channels = [draw(st.integers(1, 3))]
        layers = []
        for _ in range(draw(st.integers(2, 3))):
            groups = draw(st.sampled_from([1, channels[-1]]))  # dense or depthwise
            out_channels = groups * draw(st.integers(1, 3))
            kernel = draw(st.sampled_from([1, 3]))
            layers += [nn.Conv2d(channels[-1], out_channels, kernel, padding=kernel // 2, groups=groups, bias=bias), nn.ReLU()]
            channels.append(out_channels)
        layers += [nn.Flatten(), nn.Linear(channels[-1] * extent * extent, draw(st.integers(1, 4)), bias=bias)]
        model = nn.Sequential(*layers)
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight)
            with torch.no_grad():  # layers far from balanced, so every coefficient moves
                module.weight.mul_(draw(st.sampled_from([0.1, 1.0, 7.0])))
            if module.bias is not None:
                nn.init.normal_(module.bias)
    options = {
        "p": draw(st.sampled_from([1.0, 2.0, 3.0])),
        "c": draw(st.sampled_from([1.0, 1.2])),
        "include_bias": draw(st.booleans()),
    }
    return model, options, draw(st.sampled_from([torch.float64, torch.float32])), draw(st.integers(1, 3))


@given(network=enorm_networks())
@PROPERTY_SETTINGS
def test_enorm_cycles_match_the_reference_loop(network):
    model, options, dtype, cycles = network
    fused_model = model.to(dtype)
    reference_model = copy.deepcopy(fused_model)
    fused = equinorm_kernels.ENorm(fused_model, backend="cpp", **options)
    expected = equinorm_kernels.ENorm(reference_model, backend="reference", **options)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)
    for cycle in range(cycles):
        fused.step()
        expected.step()
        for (name, got), want in zip(fused_model.named_parameters(), reference_model.parameters()):
            torch.testing.assert_close(
                got.detach(), want.detach(), rtol=rtol, atol=atol, msg=lambda m: f"cycle {cycle}, {name}: {m}"
            )
