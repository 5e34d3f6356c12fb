"""A small set of CUDA-kernel calls that reaches every launch path, each compared with the reference.

What ``make gpu-check`` runs under compute-sanitizer (memcheck, racecheck), where every call costs
a hundred times its native time: few calls, small shapes, but each kernel variant at least once
(scalar and vector loads, misaligned bases, channels split over blocks with the finish kernel,
warp and block teams, groups, Linear weights, each dtype, tap_mean's plane runs, ENorm groups). The suite runs it natively
wherever the CUDA extension and a GPU are present; the thorough comparisons are in
test_ops_equinorm.py and test_ops_enorm.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

import equinorm_kernels as ek
from equinorm_kernels import reference

from nets import GroupedConvNet, SmallResNet

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in ek.available_backends("cuda")),
    reason="needs a GPU and the CUDA extension",
)

TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (2e-2, 1e-3),
              torch.bfloat16: (5e-2, 1e-2)}


def _input(shape, dtype, *, channels_last=False, misaligned=False):
    torch.manual_seed(0)
    numel = torch.Size(shape).numel()
    storage = torch.rand(numel + 1, dtype=torch.float64, device="cuda").to(dtype)
    x = (storage[1:] if misaligned else storage[:numel]).view(shape)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize(
    "shape, dtype, channels_last, misaligned",
    [
        ((3, 5, 7, 7), torch.float32, False, False),    # a plane that is no multiple of the vector width
        ((2, 64, 16, 16), torch.float16, False, False),  # vector loads
        ((2, 64, 16, 16), torch.float16, False, True),   # a misaligned base: scalar head, vector body
        ((1, 4, 128, 128), torch.float32, False, False),  # channels split over blocks, finish kernel
        ((8, 128, 14, 14), torch.bfloat16, True, False),  # channels_last, several slots
        ((5, 37), torch.float64, False, False),          # (N, C)
    ],
)
def test_channel_mean(shape, dtype, channels_last, misaligned):
    x = _input(shape, dtype, channels_last=channels_last, misaligned=misaligned)
    got = ek.channel_mean(x, backend="cuda")
    expected = reference.channel_mean(x.double().cpu())
    rtol, atol = TOLERANCES[torch.float32 if dtype != torch.float64 else dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "shape, kernel, stride, channels_last, statistic",
    [
        ((2, 3, 12, 12), 3, 1, False, "abs_mean"),  # a warp per (channel, tap)
        ((1, 2, 20, 24), 3, 2, True, "mean"),      # a block per (channel, tap), channels_last
        ((1, 2, 48, 40), 3, 1, False, "abs_mean"),  # planes split into runs over blocks, their finish kernel
    ],
)
def test_tap_mean_forward_and_backward(shape, kernel, stride, channels_last, statistic):
    x = (_input(shape, torch.float32, channels_last=channels_last) - 0.25).requires_grad_()
    got = ek.tap_mean(x, kernel, stride, kernel // 2, statistic=statistic, backend="cuda")
    leaf = x.detach().double().cpu().requires_grad_()
    expected = reference.tap_mean(leaf, kernel, stride, kernel // 2, statistic=statistic)
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=rtol, atol=atol)
    grad = torch.randn(got.shape, dtype=torch.float64)
    got.backward(grad.to(got.dtype).cuda())
    expected.backward(grad)
    torch.testing.assert_close(x.grad.double().cpu(), leaf.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "weight_shape, groups, mode, dtype, channels_last",
    [
        ((16, 8, 3, 3), 1, "single_pass", torch.float32, False),
        ((16, 8, 3, 3), 1, "exact", torch.float32, True),          # channels_last weight (taps outer)
        ((8, 1, 3, 3), 8, "single_pass", torch.float32, False),     # depthwise
        ((12, 4, 3, 3), 3, "exact", torch.float64, False),          # groups
        ((32, 64, 1, 1), 1, "exact", torch.float16, False),         # 1x1: one tap per channel
        ((256, 96, 3, 3), 1, "single_pass", torch.bfloat16, False),  # rows long enough for block teams
        ((10, 37), 1, "single_pass", torch.float32, False),         # Linear
    ],
)
def test_equinorm_forward_and_backward(weight_shape, groups, mode, dtype, channels_last):
    torch.manual_seed(1)
    channels = weight_shape[1] * groups
    x_shape = (3, channels) + ((5, 5) if len(weight_shape) == 4 else ())
    x = _input(x_shape, dtype).requires_grad_(True)
    weight = torch.randn(weight_shape, dtype=torch.float64, device="cuda").to(dtype)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    weight.requires_grad_(True)
    gain = torch.rand(weight_shape[0], dtype=torch.float64, device="cuda").add(0.5).to(dtype).requires_grad_(True)
    out, _ = ek.equinorm_forward(x, weight, groups=groups, mode=mode, gain=gain, backend="cuda")
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight, gain), upstream)

    cpu = [t.detach().double().cpu().requires_grad_(True) for t in (x, weight, gain)]
    expected = reference.equinorm_weight(cpu[1], reference.channel_mean(cpu[0]), groups=groups, mode=mode, gain=cpu[2])
    expected_grads = torch.autograd.grad(expected, cpu, upstream.double().cpu())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), expected.detach(), rtol=rtol, atol=atol)
    for name, got, want in zip(("x", "weight", "gain"), grads, expected_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol * 10, msg=name)


@pytest.mark.parametrize("net", [SmallResNet, GroupedConvNet], ids=lambda n: n.__name__)
def test_enorm_cycle(net):
    torch.manual_seed(0)
    model = net().double()
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.mul_(0.25 + (i % 4))  # far from balanced: every group moves
    fused_model, reference_model = copy.deepcopy(model).cuda(), model
    fused, expected = ek.ENorm(fused_model, backend="cuda"), ek.ENorm(reference_model, backend="reference")
    for _ in range(2):
        fused.step()
        expected.step()
    for (name, got), want in zip(fused_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-10, atol=1e-12, msg=name)
