"""The "abs_mean" statistic (mean of |x|) for signed inputs, on every backend.

Checked against float64 ground truth computed here from |x| directly (not through the package),
gradients against autograd of that truth with sign(0) = +1, and on non-negative inputs bit for bit
against the "mean" statistic of the same backend (values, running statistics and gradients).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equinorm_kernels as ek
from equinorm_kernels import reference

from kernel_backends import fused_backend_params

ALL_BACKENDS = fused_backend_params() + [pytest.param("reference", "cpu", id="reference-cpu")]
# (shape, channels_last): each reduction path of the kernels (large planes, small planes, wide
# rows, channels_last, a (N, C) input).
SHAPES = [
    ((3, 4, 20, 20), False),
    ((5, 4, 18, 18), False),
    ((4, 6, 3, 3), False),
    ((3, 300, 4, 4), False),
    ((3, 5, 7, 9), True),
    ((2, 5000), False),
    ((5, 3, 4, 4, 4), False),
]


def _signed(shape, seed: int = 0) -> torch.Tensor:
    """Signed float64 values; channel 0 non-negative with a -0.0 in it, channel 1 (when C > 2)
    non-negative but for one value in the last sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    x[:, 0] = x[:, 0].abs()
    x.view(shape[0], shape[1], -1)[0, 0, 0] = -0.0
    if shape[1] > 2:
        x[:, 1] = x[:, 1].abs()
        x.view(shape[0], shape[1], -1)[-1, 1, -1] = -0.3
    return x


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _truth_abs_mean(x: torch.Tensor, rows: int) -> torch.Tensor:
    sample = x[:rows].double()
    flat = sample.transpose(0, 1).reshape(sample.shape[1], -1)
    return flat.abs().sum(dim=1) / flat.shape[1]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
def test_abs_mean_values_and_gradient(backend, device, shape, channels_last, stats_fraction):
    x64 = _layout(_signed(shape), channels_last)
    rows = math.ceil(shape[0] * stats_fraction)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        x = x64.to(device=device, dtype=dtype).requires_grad_()
        mean = ek.channel_mean(x, stats_fraction=stats_fraction, statistic="abs_mean", backend=backend)
        torch.testing.assert_close(mean.double().cpu(), _truth_abs_mean(x64, rows), rtol=rtol, atol=0)
        upstream = torch.linspace(-1, 2, shape[1], dtype=mean.dtype, device=device)
        (grad,) = torch.autograd.grad(mean, x, upstream)
        # d mean_c / d x = sign(x) / count with sign(0) = +1, on the rows that fed the means.
        count = rows * x64[0, 0].numel()
        sign = torch.where(x64 < 0, -1.0, 1.0)
        sign[rows:] = 0
        expected = sign * upstream.double().cpu().reshape(1, -1, *([1] * (x64.dim() - 2))) / count
        torch.testing.assert_close(grad.double().cpu(), expected, rtol=rtol, atol=1e-15)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_abs_mean_equals_mean_bit_for_bit_on_non_negative_inputs(backend, device, shape, channels_last):
    g = torch.Generator().manual_seed(3)
    x = _layout(torch.rand(shape, generator=g), channels_last).to(device)
    x[(0,) * x.dim()] = -0.0  # counts as non-negative: the same bits and gradient as "mean"
    means = {}
    grads = {}
    for statistic in ("mean", "abs_mean"):
        leaf = x.clone().requires_grad_()
        mean = ek.channel_mean(leaf, statistic=statistic, backend=backend)
        means[statistic] = mean
        (grads[statistic],) = torch.autograd.grad(mean, leaf, torch.arange(shape[1], dtype=mean.dtype, device=device))
    assert torch.equal(means["mean"], means["abs_mean"])
    assert torch.equal(grads["mean"], grads["abs_mean"])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_fused_forward_with_abs_mean_matches_the_weight_of_the_true_abs_mean(backend, device, mode):
    x64 = _signed((4, 3, 6, 6), seed=5)
    weight64 = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gain64 = torch.rand(5, dtype=torch.float64) + 0.5
    x = x64.to(device).requires_grad_()
    weight = weight64.to(device).requires_grad_()
    gain = gain64.to(device).requires_grad_()
    out, mean = ek.equinorm_forward(x, weight, mode=mode, gain=gain, ratio=0.7, statistic="abs_mean", backend=backend)
    # Ground truth: the reference weight transform of |x|'s mean, differentiated by autograd
    # through a magnitude with sign(0) = +1 written out here.
    xt, wt, gt = (t.detach().clone().requires_grad_() for t in (x64, weight64, gain64))
    magnitude = torch.where(xt < 0, -xt, xt)
    expected = reference.equinorm_weight(wt, magnitude.mean(dim=(0, 2, 3)), mode=mode, gain=gt, ratio=0.7)
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean.cpu(), _truth_abs_mean(x64, 4), rtol=1e-12, atol=0)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, (x, weight, gain), upstream.to(device))
    want = torch.autograd.grad(expected, (xt, wt, gt), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_gradcheck_through_abs_mean(backend, device):
    x = _signed((3, 3, 4, 4), seed=8)
    x[0, 0, 0, 0] = 0.2  # |x| has a kink at 0, where finite differences cannot see sign(0) = +1
    x = x.to(device).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, weight):
        return ek.equinorm_forward(x, weight, mode="exact", statistic="abs_mean", backend=backend)[0]

    assert torch.autograd.gradcheck(f, (x, weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_layer_on_signed_input_trains_and_tracks_the_abs_mean(backend, device):
    torch.manual_seed(0)
    layer = ek.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device)
    assert layer.statistic == "abs_mean"  # the default: a signed input is never an error
    x = _signed((4, 3, 5, 5), seed=9).float().to(device)
    layer(x).sum().backward()
    expected_running = 0.9 * torch.ones(3) + 0.1 * _truth_abs_mean(x.cpu(), 4).float()
    torch.testing.assert_close(layer.running_mean.cpu(), expected_running, rtol=1e-6, atol=0)
    assert torch.isfinite(layer.weight.grad).all()
    layer.eval()
    folded = layer.fold()
    torch.testing.assert_close(folded(x), layer(x), rtol=1e-5, atol=1e-6)
    # The folded weight is the reference weight transform of the running |x| mean.
    expected_weight = reference.equinorm_weight(
        layer.weight.detach().cpu().double(), layer.running_mean.cpu().double(), gain=layer.gain.detach().cpu().double()
    )
    torch.testing.assert_close(folded.weight.detach().cpu().double(), expected_weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_layers_with_either_statistic_agree_bit_for_bit_on_non_negative_input(backend, device):
    x = torch.rand(4, 3, 6, 6, device=device)
    outputs, grads, running = [], [], []
    for statistic in ("mean", "abs_mean"):
        torch.manual_seed(1)
        layer = ek.EquiNormConv2d(3, 4, 3, padding=1, statistic=statistic, backend=backend).to(device)
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append((leaf.grad, layer.weight.grad, layer.gain.grad))
        running.append(layer.running_mean.clone())
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(running[0], running[1])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_mean_statistic_on_a_signed_input_names_abs_mean(backend, device):
    layer = ek.EquiNormConv2d(3, 4, 3, statistic="mean", backend=backend).to(device)
    x = torch.rand(2, 3, 5, 5, device=device)
    x[:, 1] -= 2.0
    with pytest.raises(ValueError, match=r'non-negative.*channel 1.*statistic="abs_mean"'):
        layer(x)


def test_bad_statistic_is_a_clear_error():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"statistic must be .*'median'"):
        ek.channel_mean(x, statistic="median")
    with pytest.raises(ValueError, match=r"statistic must be"):
        ek.EquiNormConv2d(3, 4, 3, statistic="abs")
    with pytest.raises(ValueError, match=r"statistic must be"):
        ek.equinorm_forward(x, torch.randn(4, 3, 3, 3), statistic=None)
    with pytest.raises(RuntimeError, match=r'statistic must be "mean" or "abs_mean"'):
        torch.ops.equinorm_kernels.channel_mean(x, 2, "l2")


def test_abs_mean_backward_reads_x_only_in_flagged_channels():
    """The input gradient of channels with no negative value is the broadcast constant, without a
    read of x: a negative value planted in x after the forward changes the gradient only where x
    is read."""
    x = torch.rand(2, 3, 4, 4)
    x[:, 2] -= 0.5  # only channel 2 has negative values
    x[0, 2, 0, 0] = 0.25
    x.requires_grad_()
    mean = ek.channel_mean(x, statistic="abs_mean", backend="cpp")
    x.data[0, 0, 0, 0] = -1.0  # channel 0 had no negative value: not read
    x.data[0, 2, 0, 0] = -1.0  # channel 2 had some: read, so the flip is seen
    (grad,) = torch.autograd.grad(mean, x, torch.ones(3))
    constant = 1.0 / 32
    assert torch.all(grad[:, :2] == constant)
    assert grad[0, 2, 0, 0] == -constant


def test_compiled_layer_with_abs_mean_matches_eager():
    torch.manual_seed(2)
    layer = ek.EquiNormConv2d(3, 4, 3, padding=1)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    x = _signed((4, 3, 6, 6), seed=11).float().requires_grad_()
    eager_out = layer(x)
    (eager_grad,) = torch.autograd.grad(eager_out.sum(), x)
    compiled_out = compiled(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out.sum(), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
    assert F.relu(compiled_out).isfinite().all()
