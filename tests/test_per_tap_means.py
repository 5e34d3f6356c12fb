"""The weight transform with per-tap means: mean (C, *kernel), one value per input channel and
kernel tap (the mean of the input value that tap multiplies, which ek.tap_mean computes exactly
under zero padding and stride).

Checked against what the means mean, not against the implementation: with per-tap means every
output channel's weights are centred (sum_ct mu_ct w''_dct = 0) and, in exact mode, their positive
part has unit mass (sum_ct mu_ct max(w''_dct, 0) = gain_d); channel means broadcast over the taps
give the channel-mean result; every backend agrees with the reference, gradients included.
"""
from __future__ import annotations

import pytest
import torch

import equinorm_kernels as ek
from kernel_backends import fused_backend_params

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *fused_backend_params()]
# (weight shape, groups): Conv2d, grouped and depthwise Conv2d, Conv1d, Conv3d, 1x1
SHAPES = [((6, 4, 3, 3), 1), ((6, 2, 3, 3), 2), ((4, 1, 3, 3), 4), ((5, 3, 3), 1), ((4, 3, 2, 2, 2), 1),
          ((5, 3, 1, 1), 1)]


def _operands(shape, groups, dtype=torch.float64, channels_last=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    channels = shape[1] * groups
    mean = torch.rand((channels, *shape[2:]), generator=generator, dtype=torch.float64) + 0.05
    mean[0].view(-1)[0] = 0.0  # a tap that reads only padding
    gain = torch.rand(shape[0], generator=generator, dtype=torch.float64) + 0.5
    weight = weight.to(dtype)
    if channels_last and weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return weight, mean.to(acc), gain.to(acc)


def _per_value(mean: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """mu[d, c, t] for a weight (D, C/groups, *kernel), written out with explicit loops."""
    out_channels, group_channels = weight.shape[:2]
    mu = torch.empty((out_channels, group_channels, weight[0, 0].numel()), dtype=torch.float64)
    for d in range(out_channels):
        group = d // (out_channels // groups)
        for c in range(group_channels):
            mu[d, c] = mean[group * group_channels + c].double().reshape(-1)
    return mu


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shape, groups", SHAPES)
def test_exact_mode_satisfies_both_constraints_per_tap(backend, device, shape, groups):
    weight, mean, gain = (t.to(device) for t in _operands(shape, groups))
    out = ek.equinorm_weight(weight, mean, groups=groups, gain=gain, mode="exact", backend=backend)
    mu = _per_value(mean.cpu(), weight, groups)
    values = out.cpu().double().reshape(mu.shape)
    centred = (mu * values).sum(dim=(1, 2))
    positive_mass = (mu * values.clamp_min(0)).sum(dim=(1, 2))
    torch.testing.assert_close(centred, torch.zeros_like(centred), atol=1e-12, rtol=0)
    torch.testing.assert_close(positive_mass, gain.cpu().double(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_channel_means_broadcast_over_taps_give_the_channel_mean_result(backend, device, mode):
    weight, _, gain = (t.to(device) for t in _operands((6, 4, 3, 3), 1))
    channel_mean = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device) + 0.1
    per_tap = channel_mean[:, None, None].expand(4, 3, 3).contiguous()
    expected = ek.equinorm_weight(weight, channel_mean, gain=gain, mode=mode, backend=backend)
    got = ek.equinorm_weight(weight, per_tap, gain=gain, mode=mode, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.id != "reference-cpu"])
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, groups", SHAPES)
def test_fused_backends_match_the_reference_with_gradients(backend, device, mode, channels_last, dtype, shape, groups):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-d layout")
    weight, mean, gain = (t.to(device) for t in _operands(shape, groups, dtype, channels_last))
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)

    def run(name, weight, mean, gain):
        weight, mean, gain = (t.detach().clone().requires_grad_() for t in (weight, mean, gain))
        out = ek.equinorm_weight(weight, mean, groups=groups, gain=gain, mode=mode, backend=name)
        grads = torch.autograd.grad(out, (weight, mean, gain), upstream.to(out.dtype))
        return [out, *grads]

    got = run(backend, weight, mean, gain)
    truth = run("reference", weight.double(), mean.double(), gain.double())
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, value, true in zip(("out", "grad_weight", "grad_mean", "grad_gain"), got, truth):
        assert value.shape == true.shape, name
        scale = true.abs().max().item()
        torch.testing.assert_close(value.double().cpu(), true.cpu(), rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_gradcheck_per_tap(backend, device):
    weight, mean, gain = _operands((3, 2, 2, 2), 1)
    mean = mean + 0.1  # away from 0, where gradcheck's steps would make a mean negative
    weight, mean, gain = (t.to(device).requires_grad_() for t in (weight, mean, gain))
    assert torch.autograd.gradcheck(
        lambda w, m, g: ek.equinorm_weight(w, m, gain=g, mode="exact", backend=backend), (weight, mean, gain)
    )


def test_per_tap_means_of_the_wrong_shape_are_refused():
    weight, mean, _ = _operands((6, 4, 3, 3), 1)
    with pytest.raises(ValueError, match=r"per-tap means must have shape \(C, \*kernel\) = \(4, 3, 3\)"):
        ek.equinorm_weight(weight, mean[:, :2])
    with pytest.raises(ValueError, match=r"mean must have C = .* got 3"):
        ek.equinorm_weight(weight, mean[:3])


def test_per_tap_means_need_ratio_one():
    weight, mean, _ = _operands((6, 4, 3, 3), 1)
    with pytest.raises(ValueError, match=r"ratio must be 1 with per-tap means"):
        ek.equinorm_weight(weight, mean, ratio=0.5)


@pytest.mark.parametrize("name", ["equinorm_weight", "triton_equinorm_weight"])
def test_raw_ops_check_per_tap_shapes(name):
    if name.startswith("triton") and "triton" not in ek.available_backends("cpu"):
        pytest.skip("Triton is not available here")
    import equinorm_kernels.triton.equinorm  # noqa: F401  (registers the Triton ops)

    weight, mean, gain = (t.float() for t in _operands((6, 4, 3, 3), 1))
    op = getattr(torch.ops.equinorm_kernels, name)
    with pytest.raises(RuntimeError, match=r"mean must have shape"):
        op(weight, mean[:, :2].contiguous(), gain, 1.0, 1, "exact", 1e-5)
