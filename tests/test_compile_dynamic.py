"""torch.compile(dynamic=True) of a model of EquiNorm layers: one graph for every batch size, no
graph break, and the eager results (outputs, gradients, running statistics, eval)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import equinorm_kernels as ek

from kernel_backends import fused_backend_params


def _model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        ek.EquiNormConv2d(3, 8, 3, padding=1, backend=backend),
        nn.ReLU(),
        # a part of the batch feeding the statistics, and the cumulative running mean
        ek.EquiNormConv2d(8, 8, 3, stride=2, padding=1, stats_fraction=0.5, momentum=None, backend=backend),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        ek.EquiNormLinear(8, 4, backend=backend),
    )


# Triton under its interpreter runs as opaque ops, a second per launch: compiled Triton (GPU) only.
@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[:2] != ("triton", "cpu")])
def test_one_graph_for_every_batch_size(backend, device):
    torch._dynamo.reset()
    counters.clear()
    model = _model(backend).to(device)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (2, 3, 5, 8):
        x = torch.rand(batch, 3, 8, 8, device=device, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_(True)
        out = compiled(x)
        expected = eager(x_eager)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x.grad, x_eager.grad)
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    for (name, got), want in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(got, want, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

    model.eval()
    eager.eval()
    for batch in (3, 6):
        x = torch.rand(batch, 3, 8, 8, device=device)
        torch.testing.assert_close(compiled(x), eager(x))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one more for eval mode
