"""ENorm balances any finite weights: energies of float32 weights far from 1 (|w|^2 beyond
float32's range from |w| ~ 1.8e19) are computed in float64, so every backend finds the float64
coefficients, keeps the network's function and leaves finite, balanced weights.

The truth is the reference ENorm run on a float64 copy of the same float32 values.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import equinorm_kernels as ek
from kernel_backends import fused_backend_params

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *fused_backend_params()]
# (scale of the producer, scale of the consumer): products near 1, so the network's output is
# representable, while |w|^p of one side or both leaves float32's range.
SCALE_PAIRS = [(1e25, 1e-25), (1e30, 1e-28), (1e-30, 1e28), (1e20, 1e-18)]


def _network(kind: str, producer_scale: float, consumer_scale: float) -> nn.Module:
    torch.manual_seed(3)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    else:
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        for parameter in net[0].parameters():
            parameter.mul_(producer_scale)
        for parameter in net[2].parameters():
            parameter.mul_(consumer_scale)
    return net


def _input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    shape = (3, 5) if kind == "linear" else (2, 2, 5, 5)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("producer_scale, consumer_scale", SCALE_PAIRS)
def test_balances_weights_whose_energies_leave_float32(backend, device, kind, p, producer_scale, consumer_scale):
    net = _network(kind, producer_scale, consumer_scale).to(device)
    truth_net = copy.deepcopy(net).double()
    x = _input(kind).to(device)
    before = net(x)
    assert torch.isfinite(before).all()

    enorm = ek.ENorm(net, p=p, backend=backend)
    energy_before = sum(enorm.energy().values())
    assert math.isfinite(energy_before), "energy() must be finite for finite weights"
    enorm.step()
    ek.ENorm(truth_net, p=p, backend="reference").step()

    for (name, got), truth in zip(net.named_parameters(), truth_net.parameters()):
        assert torch.isfinite(got).all(), f"{name} is not finite after the step"
        scale = truth.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), truth.cpu(), rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # Balanced: both layers now hold weights of comparable size, far from the starting scales.
    norms = [net[i].weight.abs().max().item() for i in (0, 2)]
    assert max(norms) / min(norms) < 1e4, f"weights not balanced: max |w| per layer {norms}"
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5 * before.abs().max().item())
    assert sum(enorm.energy().values()) < energy_before
