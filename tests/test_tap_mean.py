"""ek.tap_mean, on every backend, against an independent implementation of what a convolution's
taps read: the input padded with the mode and cut into patches by F.unfold (2-D), or, for Conv1d and
Conv3d (and "same" padding), an nn.Conv with one-hot kernels whose output channel (c, t) is the
value tap t of channel c multiplies. Values, gradients (gradcheck in float64), layouts, dtypes,
stats_fraction, both statistics, op registration (opcheck, torch.compile) and bad input.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import equinorm_kernels as ek
from equinorm_kernels._tap_geometry import check_tap_mean_args, parse_geometry_spec

from kernel_backends import fused_backend_params, op

MODES = ("zeros", "reflect", "replicate", "circular")
STATISTICS = ("mean", "abs_mean")
# Triton runs under its interpreter here (a second or more per call): it gets the shorter lists.
INTERPRETED_TRITON = ("triton", "cpu")


def _backends(*, every: bool = True) -> list:
    params = [pytest.param("reference", "cpu", id="reference-cpu")] + fused_backend_params()
    if every:
        return params
    return [p for p in params if tuple(p.values[:2]) != INTERPRETED_TRITON]


def _is_interpreted_triton(backend, device) -> bool:
    return (backend, device) == INTERPRETED_TRITON


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signed_input(shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed), dtype=torch.float64).to(dtype)


# ---- the independent implementations ----

def _sample(x: torch.Tensor, rows: int, statistic: str) -> torch.Tensor:
    sample = x[:rows].double()
    return sample.abs() if statistic == "abs_mean" else sample


def _unfold_tap_mean(x, kernel, stride, padding, dilation, mode, *, rows=None, statistic="mean"):
    """2-D: pad with the mode (int padding per dim), F.unfold, mean over samples and positions."""
    sample = _sample(x, rows or x.shape[0], statistic)
    pads = [padding[1], padding[1], padding[0], padding[0]]
    padded = F.pad(sample, pads, mode="constant" if mode == "zeros" else mode)
    patches = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # (n, C * K, positions)
    return patches.mean(dim=(0, 2)).reshape(x.shape[1], *kernel)


def _one_hot_conv_tap_mean(x, kernel, stride, padding, dilation, mode, *, rows=None, statistic="mean"):
    """Any dims: nn.ConvNd (its own padding and padding_mode) with a one-hot kernel per (channel, tap)."""
    sample = _sample(x, rows or x.shape[0], statistic)
    channels, dims = x.shape[1], x.dim() - 2
    taps = math.prod(kernel)
    conv_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = conv_class(channels, channels * taps, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=channels, bias=False, padding_mode=mode).double()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(taps, dtype=torch.float64).repeat(channels, 1).reshape(conv.weight.shape))
    conv.weight.requires_grad_(False)
    out = conv(sample)  # (n, C * K, *outputs): channel c * K + t is what tap t of channel c multiplies
    return out.mean(dim=(0, *range(2, out.dim()))).reshape(channels, *kernel)


def _run(backend, device, x, *args, **kwargs):
    return ek.tap_mean(x.to(device), *args, backend=backend, **kwargs).cpu()


# ---- values ----

# (kernel, stride, padding, dilation) of 2-D convolutions: odd input sizes throughout
GEOMETRIES_2D = {
    "3x3-pad1": ((3, 3), (1, 1), (1, 1), (1, 1)),
    "stride2": ((3, 3), (2, 2), (1, 1), (1, 1)),
    "stride3-5x3": ((5, 3), (3, 3), (2, 1), (1, 1)),
    "dilation2": ((3, 3), (1, 2), (2, 2), (2, 2)),
    "7x7-stride2-pad3": ((7, 7), (2, 2), (3, 3), (1, 1)),
    "valid-2x4": ((2, 4), (1, 2), (0, 0), (1, 1)),
}


@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES_2D))
def test_conv2d_taps_match_unfold(backend, device, geometry, mode, statistic):
    kernel, stride, padding, dilation = GEOMETRIES_2D[geometry]
    x = _signed_input((3, 2, 9, 7), seed=1)
    got = _run(backend, device, x, kernel, stride, padding, dilation, mode, statistic=statistic)
    want = _unfold_tap_mean(x, kernel, stride, padding, dilation, mode, statistic=statistic)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", ["3x3-pad1", "stride3-5x3", "dilation2"])
def test_wide_rows_of_several_samples_match_unfold(backend, device, geometry, mode, dtype):
    """Rows of 16 values or more and several samples (the CPU kernel adds them inside its first
    contraction), with a stats_fraction that leaves a sample out."""
    kernel, stride, padding, dilation = GEOMETRIES_2D[geometry]
    x = _signed_input((5, 3, 11, 19), seed=11, dtype=dtype)
    got = _run(backend, device, x, kernel, stride, padding, dilation, mode, stats_fraction=0.7)
    want = _unfold_tap_mean(x.double(), kernel, stride, padding, dilation, mode, rows=4)
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), want, **tolerance)


# (x shape, kernel, stride, padding, dilation): Conv1d and Conv3d, and nn.Conv's "same"/"valid"
CONV_CASES = {
    "conv1d": ((4, 3, 11), (5,), (2,), (2,), (1,)),
    "conv1d-dilation2": ((3, 2, 13), (3,), (3,), (3,), (2,)),
    "conv3d": ((2, 2, 5, 6, 7), (3, 2, 3), (2, 1, 2), (1, 1, 1), (1, 2, 1)),
    "conv2d-same-even-kernel": ((3, 2, 7, 6), (4, 3), (1, 1), "same", (1, 2)),
    "conv3d-same": ((2, 2, 5, 4, 5), (3, 3, 2), (1, 1, 1), "same", (1, 1, 1)),
    "conv1d-valid": ((3, 2, 9), (4,), (2,), "valid", (1,)),
}


@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv1d_conv3d_and_same_padding_match_one_hot_convolutions(backend, device, case, mode, statistic):
    shape, kernel, stride, padding, dilation = CONV_CASES[case]
    x = _signed_input(shape, seed=2)
    got = _run(backend, device, x, kernel, stride, padding, dilation, mode, statistic=statistic)
    want = _one_hot_conv_tap_mean(x, kernel, stride, padding, dilation, mode, statistic=statistic)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_two_independent_implementations_agree():
    """unfold and the one-hot convolution read the same values (so either one pins down nn.Conv's padding)."""
    x = _signed_input((2, 3, 8, 9), seed=3)
    for mode, (name, (kernel, stride, padding, dilation)) in itertools.product(MODES, GEOMETRIES_2D.items()):
        torch.testing.assert_close(
            _unfold_tap_mean(x, kernel, stride, padding, dilation, mode),
            _one_hot_conv_tap_mean(x, kernel, stride, padding, dilation, mode), msg=f"{mode} {name}",
        )


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_circular_stride_one_odd_kernels_give_the_channel_mean(backend, device, dims):
    """The paper's setting: every tap sees every input value once, so every tap's mean is the channel's."""
    shape = {1: (3, 4, 9), 2: (3, 4, 7, 6), 3: (2, 4, 5, 4, 5)}[dims]
    kernel = {1: (5,), 2: (3, 5), 3: (3, 1, 3)}[dims]
    x = _signed_input(shape, seed=4)
    got = _run(backend, device, x, kernel, 1, tuple((k - 1) // 2 for k in kernel), 1, "circular")
    channel_mean = x.mean(dim=(0, *range(2, x.dim())))
    torch.testing.assert_close(got, channel_mean.reshape(-1, *([1] * dims)).expand_as(got), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_and_stats_fraction(backend, device, dims, statistic):
    shape = (5, 3, 7, 6) if dims == 2 else (5, 3, 4, 5, 3)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = _signed_input(shape, seed=5).contiguous(memory_format=layout)
    kernel, stride, padding = (3,) * dims, (2,) * dims, (1,) * dims
    for mode in ("zeros", "reflect") if _is_interpreted_triton(backend, device) else MODES:
        got = _run(backend, device, x, kernel, stride, padding, 1, mode, stats_fraction=0.5, statistic=statistic)
        want = _one_hot_conv_tap_mean(x, kernel, stride, padding, 1, mode, rows=3, statistic=statistic)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=mode)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(backend, device, dtype):
    x = _signed_input((4, 3, 9, 8), seed=6, dtype=dtype)
    for statistic in STATISTICS:
        got = _run(backend, device, x, 3, 2, 1, 1, "reflect", statistic=statistic)
        assert got.dtype == torch.float32
        want = _unfold_tap_mean(x, (3, 3), (2, 2), (1, 1), (1, 1), "reflect", statistic=statistic)
        scale = _unfold_tap_mean(x, (3, 3), (2, 2), (1, 1), (1, 1), "reflect", statistic="abs_mean").abs().max()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=4e-6 * float(scale))


@pytest.mark.parametrize("backend,device", _backends())
def test_float64_stays_float64(backend, device):
    x = _signed_input((2, 2, 5, 5), seed=7)
    assert _run(backend, device, x, 3, padding=1).dtype == torch.float64


# ---- every path of the CPU kernel ----
# NCHW rows of 24 values or more are read plane by plane: float32 planes whose row residues and
# columns repeat within 128 values (lcm(row stride x W, 8)) are added flat, the others row by row.
# Shorter rows, and channels_last inputs, go through the samples' sum, whose positions are added
# into groups with 8 channels x 8 positions a tile where there are 8 channels. One sample of the
# accumulation type is read in place.
PATH_CASES = {
    "flat-w30": ((3, 4, 9, 30), "3x3-pad1"),  # period 120 values: 15 vectors
    "flat-w24-row-stride3": ((2, 3, 10, 24), "stride3-5x3"),  # 3 row residues: 72 values
    "rows-w33-stride2": ((2, 3, 7, 33), "stride2"),  # 66 x 4 = 264 values: row by row
    "flat-w28-dilation2": ((2, 3, 9, 28), "dilation2"),
    "7x7-stride2-w40": ((2, 2, 11, 40), "7x7-stride2-pad3"),
    "tiles-20-channels": ((3, 20, 7, 11), "3x3-pad1"),  # 16 channels in tiles, 4 one by one; 77 positions
    "tiles-16-channels-stride2": ((2, 16, 9, 9), "stride2"),
}


@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("batch", ["one", "all"])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_every_cpu_path_matches_unfold(backend, device, case, mode, batch, statistic, dtype, layout):
    shape, geometry = PATH_CASES[case]
    kernel, stride, padding, dilation = GEOMETRIES_2D[geometry]
    x = _signed_input(shape, seed=21, dtype=dtype)
    if batch == "one":
        x = x[:1]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    got = _run(backend, device, x, kernel, stride, padding, dilation, mode, statistic=statistic)
    want = _unfold_tap_mean(x.double(), kernel, stride, padding, dilation, mode, statistic=statistic)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    else:  # float32 sums of x's values, rounded to dtype: errors relative to the values' magnitudes
        scale = _unfold_tap_mean(x.double(), kernel, stride, padding, dilation, mode, statistic="abs_mean").abs().max()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=4e-6 * float(scale))


@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv3d_channels_last_sums_are_transposed_exactly(backend, device, batch, statistic, dtype):
    """channels_last_3d with 9 channels and 60 positions: the samples' sum (or the one sample
    itself) goes from (positions, C) to (C, positions) in 8 x 8 tiles and a remainder."""
    x = _signed_input((batch, 9, 3, 4, 5), seed=23, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    kernel, stride, padding = (3, 3, 3), (1, 2, 1), (1, 1, 1)
    got = _run(backend, device, x, kernel, stride, padding, 1, "zeros", statistic=statistic)
    want = _one_hot_conv_tap_mean(x.double(), kernel, stride, padding, 1, "zeros", statistic=statistic)
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), want, **tolerance)


@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("padding", [(0, 1, 1), (1, 1, 1)])
def test_conv3d_of_one_slice(backend, device, padding):
    """A Conv3d input one slice deep: with padding in depth (and a stride that skips the slice)
    its depth is not the trivial one of a Conv2d input."""
    x = _signed_input((2, 3, 1, 6, 26), seed=24).float()
    kernel, stride = (1, 3, 3), (3, 1, 1)
    got = _run(backend, device, x, kernel, stride, padding, 1, "zeros")
    want = _one_hot_conv_tap_mean(x.double(), kernel, stride, padding, 1, "zeros")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,device", _backends(every=False))
def test_many_geometries_in_turn(backend, device):
    """More geometries than the kernel keeps plans for, twice over: each call's plan is its own."""
    x = _signed_input((2, 3, 9, 26), seed=22).float()
    geometries = [((k, k), (s, s), (p, p), (1, 1)) for k in (1, 3, 5) for s in (1, 2, 3) for p in (0, 1)]
    assert len(geometries) > 16
    for kernel, stride, padding, dilation in geometries * 2:
        got = _run(backend, device, x, kernel, stride, padding, dilation, "zeros")
        want = _unfold_tap_mean(x.double(), kernel, stride, padding, dilation, "zeros")
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5, msg=str((kernel, stride, padding)))


# ---- gradients ----

@pytest.mark.parametrize("backend,device", _backends(every=False))
@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("case", ["conv1d-reflect", "conv2d-replicate-cl", "conv3d-circular", "zeros-fraction"])
def test_gradcheck(backend, device, case, statistic):
    shape, args, kwargs = {
        "conv1d-reflect": ((3, 2, 7), (3, 2, 1, 1, "reflect"), {}),
        "conv2d-replicate-cl": ((2, 2, 5, 4), ((3, 2), (2, 1), (1, 1), (1, 2), "replicate"), {}),
        "conv3d-circular": ((2, 2, 3, 4, 3), ((3, 2, 1), (1, 2, 1), (1, 1, 0), 1, "circular"), {}),
        "zeros-fraction": ((4, 2, 5, 5), (3, 2, 1, 1, "zeros"), {"stats_fraction": 0.5}),
    }[case]
    x = _signed_input(shape, seed=8).to(device)
    if case.endswith("-cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: ek.tap_mean(x, *args, statistic=statistic, backend=backend, **kwargs), (x,)
    )


@pytest.mark.parametrize("backend,device", fused_backend_params())
@pytest.mark.parametrize("statistic", STATISTICS)
def test_gradients_match_the_one_hot_convolution(backend, device, statistic):
    """dL/dx against autograd through the independent implementation (every backend, Triton included)."""
    x = _signed_input((4, 3, 7, 6), seed=9)
    x[0, 0, 0, 0] = 0.0  # sign(0) counts as +1: d|x|/dx = 1 there
    upstream = _signed_input((3, 3, 2), seed=10)
    args = ((3, 2), (2, 1), (1, 0), (1, 2), "reflect")
    leaf = x.clone().requires_grad_(True)
    got = torch.autograd.grad(
        ek.tap_mean(leaf.to(device), *args, stats_fraction=0.75, statistic=statistic, backend=backend),
        leaf, upstream.to(device),
    )[0]
    reference_leaf = x.clone().requires_grad_(True)
    sample = reference_leaf[:3]
    if statistic == "abs_mean":  # |x| with sign(0) = +1, written out for the one-hot convolution
        sample = sample * torch.where(sample < 0, -1.0, 1.0).double()
    want = torch.autograd.grad(_one_hot_conv_tap_mean(sample, *args), reference_leaf, upstream)[0]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_non_negative_input_gradient_is_a_broadcast_view(backend, device):
    """abs_mean on a non-negative input: no channel had a negative value, so no pass over x; the
    gradient is the mean statistic's, broadcast over the samples (stride 0) and never materialised."""
    x = _signed_input((3, 2, 6, 5), seed=11).abs().to(device)
    x[0, 1, 2, 2] = 0.0
    x.requires_grad_(True)
    upstream = _signed_input((2, 3, 3), seed=12).to(device)
    grads = {}
    for statistic in STATISTICS:
        out = ek.tap_mean(x, 3, 2, 1, 1, "replicate", statistic=statistic, backend=backend)
        grads[statistic] = torch.autograd.grad(out, x, upstream)[0]
    assert grads["abs_mean"].stride(0) == 0
    torch.testing.assert_close(grads["abs_mean"], grads["mean"], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_second_order_gradients(backend, device):
    """create_graph=True: the input gradient is differentiable in the upstream gradient."""
    x = _signed_input((2, 2, 5, 5), seed=13).to(device).requires_grad_(True)
    weights = _signed_input((2, 3, 3), seed=14).to(device).requires_grad_(True)
    for b in (backend, "reference"):
        out = (ek.tap_mean(x, 3, 1, 1, 1, "zeros", statistic="abs_mean", backend=b) * weights).sum()
        (grad_x,) = torch.autograd.grad(out, x, create_graph=True)
        (second,) = torch.autograd.grad(grad_x.square().sum(), weights)
        if b == backend:
            got = second
    torch.testing.assert_close(got, second)


# ---- op registration ----

@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_opcheck(backend, device):
    x = _signed_input((3, 2, 6, 5), seed=15).float().to(device)
    forward, backward = op(backend, "tap_mean"), op(backend, "tap_mean_backward")
    geometry = "kernel_size=3,3 stride=2,1 padding=1,1,0,2 dilation=1,2 padding_mode=reflect"
    grad = torch.randn(2, 3, 3, device=device)
    samples = [
        (forward, (x, 2, geometry, True)),
        (forward, (x.contiguous(memory_format=torch.channels_last), 3, geometry, False)),
        (backward, (grad, [6, 5], 2, geometry)),
    ]
    for function, args in samples:
        torch.library.opcheck(function, args)


@pytest.mark.parametrize("backend,device", fused_backend_params())
@pytest.mark.parametrize("geometry", [
    "kernel_size=3,3 stride=1,1 padding=1,1,1,1 dilation=1,1",  # no padding_mode
    "stride=1,1 kernel_size=3,3 padding=1,1,1,1 dilation=1,1 padding_mode=zeros",  # fields out of order
    "kernel_size=3,x stride=1,1 padding=1,1,1,1 dilation=1,1 padding_mode=zeros",
    "kernel_size=3,3 stride= padding=1,1,1,1 dilation=1,1 padding_mode=zeros",
    "kernel_size=3,3, stride=1,1 padding=1,1,1,1 dilation=1,1 padding_mode=zeros",
    "kernel_size=3,3 stride=1,1 padding=1,1,1,1 dilation=1,1 padding_mode=zeros extra=1",
])
def test_ops_reject_a_malformed_geometry(backend, device, geometry):
    x = torch.rand(2, 3, 6, 6, device=device)
    with pytest.raises((RuntimeError, ValueError), match="geometry"):
        op(backend, "tap_mean")(x, 2, geometry, False)
    with pytest.raises((RuntimeError, ValueError), match="geometry"):
        op(backend, "tap_mean_backward")(torch.rand(3, 3, 3, device=device), [6, 6], 2, geometry)


def test_geometry_spec_round_trips():
    # A 3-d geometry with "same" padding (worked out by hand) as the string the ops take, and back.
    geometry, _ = check_tap_mean_args(torch.rand(1, 2, 9, 8, 7), (3, 2, 1), 1, "same", 2, "circular", 1.0, "mean")
    assert geometry.spec == "kernel_size=3,2,1 stride=1,1,1 padding=2,2,1,1,0,0 dilation=2,2,2 padding_mode=circular"
    assert parse_geometry_spec(geometry.spec) == (
        geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation, geometry.padding_mode
    )


# Triton under its interpreter runs as opaque ops: compiled Triton (GPU) only, as test_compile_dynamic.
@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if tuple(p.values[:2]) != INTERPRETED_TRITON])
@pytest.mark.parametrize("statistic", STATISTICS)
def test_compile_dynamic_one_graph_for_every_batch_size(backend, device, statistic):
    torch._dynamo.reset()
    counters.clear()

    def taps(x):
        return ek.tap_mean(x, 3, 2, 1, 1, "reflect", stats_fraction=0.5, statistic=statistic, backend=backend)

    compiled = torch.compile(taps, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (2, 3, 5, 8):
        x = _signed_input((batch, 3, 7, 6), seed=batch).float().to(device).requires_grad_(True)
        x_eager = x.detach().clone().requires_grad_(True)
        got, want = compiled(x), taps(x_eager)
        torch.testing.assert_close(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(x.grad, x_eager.grad)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[0] == "cpp"])
@pytest.mark.parametrize("shape", [(6, 40, 23, 17), (6, 12, 9, 30), (4, 12, 7, 33)], ids=["groups", "flat", "rows"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_cpu_results_do_not_depend_on_the_thread_count(backend, device, shape, layout):
    x = _signed_input(shape, seed=16).float().contiguous(memory_format=layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(ek.tap_mean(x, 3, 2, 1, 1, "reflect", statistic="abs_mean", backend=backend))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[0] == "cpp"])
@pytest.mark.parametrize("shape", [(3, 11, 7, 9), (3, 11, 9, 30), (2, 11, 7, 33)], ids=["groups", "flat", "rows"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_channel_taps_do_not_depend_on_neighbouring_channels(backend, device, shape, stride):
    # Channels 0-7 go through the 8-channel vector tiles together, channels 8-10 and a channel alone
    # one by one: both must add in the same order.
    x = _signed_input(shape, seed=18).float()
    together = ek.tap_mean(x, 3, stride, 1, backend=backend)
    for c in (0, 7, 8, 10):
        alone = ek.tap_mean(x[:, c : c + 1].contiguous(), 3, stride, 1, backend=backend)
        assert torch.equal(together[c], alone[0]), c


@pytest.mark.parametrize("backend,device", _backends(every=False))
def test_calls_without_a_graph_give_the_same_means_and_no_grad_fn(backend, device):
    x = _signed_input((3, 4, 9, 30), seed=19).float().to(device)
    leaf = x.clone().requires_grad_(True)
    recorded = ek.tap_mean(leaf, 3, 2, 1, statistic="abs_mean", backend=backend)
    assert recorded.grad_fn is not None
    plain = ek.tap_mean(x, 3, 2, 1, statistic="abs_mean", backend=backend)
    with torch.no_grad():
        under_no_grad = ek.tap_mean(leaf, 3, 2, 1, statistic="abs_mean", backend=backend)
    for got in (plain, under_no_grad):
        assert got.grad_fn is None and not got.requires_grad
        assert torch.equal(got, recorded.detach())


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[0] == "triton"])
def test_triton_row_splits_add_in_order(backend, device):
    from equinorm_kernels.triton import tap_mean as triton_tap_mean

    x = _signed_input((7, 3, 5, 6), seed=17).float().to(device)
    want = _one_hot_conv_tap_mean(x, (3, 3), (1, 2), (1, 1), (1, 1), "zeros", rows=6, statistic="abs_mean")
    for splits in (1, 2, 4):
        got, negative = triton_tap_mean._tap_mean(x, 6, [3, 3], [1, 2], [1, 1, 1, 1], [1, 1], "zeros", True, splits)
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=2e-6)
        assert negative.tolist() == [True, True, True]


# ---- bad input ----

BAD_ARGUMENTS = [
    (dict(kernel_size=10), "kernel_size"),  # larger than the padded input (7 + 2 x 1)
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(stride=0), "stride"),
    (dict(stride=(1, 1.5)), "stride"),
    (dict(dilation=0), "dilation"),
    (dict(padding=-1), "padding"),
    (dict(padding="full"), "padding"),
    (dict(padding="same", stride=2), "padding='same'"),
    (dict(padding=7, padding_mode="reflect"), "padding"),
    (dict(padding=8, padding_mode="circular"), "padding"),
    (dict(padding_mode="mirror"), "padding_mode"),
    (dict(statistic="median"), "statistic"),
    (dict(stats_fraction=0.0), "stats_fraction"),
]


@pytest.mark.parametrize("arguments,named", BAD_ARGUMENTS, ids=[f"{a}" for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_named(arguments, named):
    x = torch.rand(2, 3, 7, 7)
    call = dict(kernel_size=3, padding=1) | arguments
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        ek.tap_mean(x, **call)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="x must have shape"):
        ek.tap_mean(torch.rand(4, 3), 1)  # a Linear input has no taps
    with pytest.raises(ValueError, match="x must have shape"):
        ek.tap_mean(torch.rand(1, 1, 2, 2, 2, 2), 1)
    with pytest.raises(TypeError, match="x must be"):
        ek.tap_mean(torch.ones(2, 3, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="contains NaN"):
        ek.tap_mean(torch.full((2, 3, 5), math.nan), 3, backend="cpp" if "cpp" in ek.available_backends() else "auto")


def test_the_measured_gpu_choice_tells_tap_mean_calls_apart_by_geometry_not_identity():
    """EQUINORM_KERNELS_GPU_BACKEND=fastest keys its measurements by call signature: each call builds
    a new geometry object, and equal convolutions must share one measurement (and its winner)."""
    from equinorm_kernels import backends
    from equinorm_kernels._tap_geometry import check_tap_mean_args

    class InstantTimer:
        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

        def elapsed_ms(self) -> float:
            return 1.0

    def candidate(name: str) -> backends.Backend:
        reference = backends.resolve_backend("reference", torch.device("cpu"))
        return backends.Backend(name=name, device_types=None, is_usable=lambda: True,
                                channel_mean=reference.channel_mean, equinorm_weight=reference.equinorm_weight,
                                equinorm_forward=reference.equinorm_forward, tap_mean=reference.tap_mean)

    chooser = backends.FastestBackend((candidate("cuda"), candidate("triton")), timer_factory=InstantTimer)
    x = torch.rand(2, 3, 5, 5)
    device = torch.device("cpu")
    for _ in range(2 * (chooser.warmup + chooser.trials)):
        geometry, fraction = check_tap_mean_args(x, 3, 1, 1, 1, "zeros", 1.0, "mean")
        chooser.run("tap_mean", device, x, fraction, geometry)
    geometry, fraction = check_tap_mean_args(x, 3, 1, 1, 1, "zeros", 1.0, "mean")
    assert chooser.winner("tap_mean", device, x, fraction, geometry) == "cuda"
    other, _ = check_tap_mean_args(x, 3, 2, 1, 1, "zeros", 1.0, "mean")
    assert chooser.winner("tap_mean", device, x, fraction, other) is None
