"""EquiNorm conv layers with per_tap=True: the paper's two constraints hold exactly for the
convolution actually run, checked on the convolution's own output.

For output channel d over a training batch, with w'' the weight the layer applies (gain 1, exact
mode, no bias): its outputs sum to zero over samples and positions, and its positive weights alone
produce a total of N x (output positions) on the batch. Both are read off F.conv of the batch
with w'' and with max(w'', 0): nothing of the layer's statistics is reused. Channel means with the
ratio miss the first constraint under zero padding and stride; that is checked too, so the test
can tell the two apart.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equinorm_kernels as ek
from kernel_backends import fused_backend_params

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *fused_backend_params()]

# (kernel, stride, padding, dilation, padding_mode, input size)
GEOMETRIES = [
    pytest.param(3, 1, 1, 1, "zeros", (7, 7), id="3x3-pad1-7x7"),
    pytest.param(3, 2, 1, 1, "zeros", (8, 7), id="3x3-stride2-8x7"),
    pytest.param(3, 3, 1, 1, "zeros", (10, 9), id="3x3-stride3-10x9"),
    pytest.param(3, 1, 2, 2, "zeros", (7, 8), id="3x3-dilation2"),
    pytest.param(5, 2, 2, 1, "reflect", (9, 9), id="5x5-stride2-reflect"),
    pytest.param(3, 2, 1, 1, "circular", (6, 7), id="3x3-stride2-circular"),
    pytest.param(3, 1, 0, 1, "zeros", (5, 6), id="3x3-valid"),
]


def _layer(kernel, stride, padding, dilation, padding_mode, per_tap, backend, in_channels=3, out_channels=4):
    torch.manual_seed(0)
    return ek.EquiNormConv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                             padding_mode=padding_mode, bias=False, mode="exact", per_tap=per_tap,
                             backend=backend).double()


def _applied_weight(layer, x):
    """The weight the layer applies in training on x, captured from its convolution (the forward
    made step by step: the layer's whole-forward op keeps the weight inside)."""
    captured = {}
    original = layer._run_op

    def run(x, weight):
        captured["weight"] = weight.detach()
        return original(x, weight)

    layer._run_op = run
    layer._train_forward_in_one_call = lambda x: None
    out = layer(x)
    del layer._run_op, layer._train_forward_in_one_call
    return captured["weight"], out


def _conv(layer, x, weight):
    if layer.padding_mode != "zeros":
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return F.conv2d(padded, weight, None, layer.stride, 0, layer.dilation)
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kernel, stride, padding, dilation, padding_mode, size", GEOMETRIES)
def test_both_constraints_hold_on_the_convolution_output(backend, device, kernel, stride, padding, dilation,
                                                          padding_mode, size):
    layer = _layer(kernel, stride, padding, dilation, padding_mode, True, backend).to(device).train()
    x = torch.rand(5, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    weight, out = _applied_weight(layer, x)
    positions = math.prod(out.shape[2:])
    per_channel_sum = out.sum(dim=(0, 2, 3))
    positive_total = _conv(layer, x, weight.clamp_min(0)).sum(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel_sum, torch.zeros_like(per_channel_sum), atol=1e-9 * positions, rtol=0)
    torch.testing.assert_close(positive_total, torch.full_like(positive_total, x.shape[0] * positions), rtol=1e-10, atol=0)


@pytest.mark.parametrize("kernel, stride, padding, dilation, padding_mode, size", GEOMETRIES[1:3])
def test_channel_means_with_the_ratio_do_not_centre_the_output_under_zero_padding_and_stride(
    kernel, stride, padding, dilation, padding_mode, size
):
    layer = _layer(kernel, stride, padding, dilation, padding_mode, False, "cpp").train()
    x = torch.rand(5, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, out = _applied_weight(layer, x)
    assert out.sum(dim=(0, 2, 3)).abs().max() > 1e-3


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_running_statistics_eval_and_fold_per_tap(backend, device):
    layer = _layer(3, 2, 1, 1, "zeros", True, backend).to(device)
    assert layer.running_mean.shape == (3, 3, 3)
    generator = torch.Generator().manual_seed(2)
    batches = [torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=generator).to(device) for _ in range(3)]
    layer.train()
    for x in batches:
        layer(x)
    # momentum 0.1 from ones: the running statistic is the layer's own exponential average of tap_mean
    expected = torch.ones(3, 3, 3, dtype=torch.float64, device=device)
    for x in batches:
        expected = 0.9 * expected + 0.1 * ek.tap_mean(x, 3, 2, 1, backend="reference")
    torch.testing.assert_close(layer.running_mean, expected)
    layer.eval()
    x = batches[0]
    folded = layer.fold()  # exact: needs no input size
    torch.testing.assert_close(folded(x), layer(x))
    torch.testing.assert_close(folded.weight, ek.equinorm_weight(layer.weight, expected, gain=layer.gain, mode="exact"))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_gradients_match_the_reference_composition(backend, device):
    """Input, weight and gain gradients of a per-tap layer against reference ops composed by hand."""
    from equinorm_kernels import reference

    layer = _layer(3, 2, 1, 1, "zeros", True, backend).to(device).train()
    x = torch.rand(3, 3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    x_ref, w_ref, g_ref = (t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.gain))
    x.requires_grad_()
    out = layer(x)
    mean = reference.tap_mean(x_ref, 3, 2, 1)
    weight = reference.equinorm_weight(w_ref, mean, gain=g_ref, mode="exact")
    expected = F.conv2d(x_ref, weight, None, 2, 1)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.weight, layer.gain), upstream)
    truth = torch.autograd.grad(expected, (x_ref, w_ref, g_ref), upstream)
    for name, value, true in zip(("x", "weight", "gain"), got, truth):
        torch.testing.assert_close(value, true, msg=lambda m, name=name: f"{name}: {m}")


def test_per_tap_must_be_a_bool():
    with pytest.raises(TypeError, match="per_tap must be a bool"):
        ek.EquiNormConv2d(3, 4, 3, per_tap=1)
