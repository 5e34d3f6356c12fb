"""Second-order gradients through the fused ops (gradient penalties, R1, meta-learning): equal to
the reference's autograd, and checked numerically with gradgradcheck in float64."""
from __future__ import annotations

import pytest
import torch
from torch.nn.functional import conv2d

import equinorm_kernels as ek

from kernel_backends import fused_backend_params

pytestmark = pytest.mark.parametrize("backend,device", fused_backend_params())


def _skip_repeats_under_the_interpreter(backend: str, device: str) -> None:
    # gradgradcheck runs the forward a few hundred times, half a second each under Triton's
    # interpreter; the differentiable backward is one code path for every backend, so one case there.
    if backend == "triton" and device == "cpu":
        pytest.skip("one gradgradcheck case under Triton's interpreter")


def _penalty_gradients(backend: str, device: str, x_requires_grad: bool):
    """The gradient of a penalty on dL/dw, as in a gradient-penalty training step."""
    torch.manual_seed(0)
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64, device=device, requires_grad=x_requires_grad)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    gain = torch.rand(8, dtype=torch.float64, device=device).add(0.5).requires_grad_(True)
    out, _ = ek.equinorm_forward(x, w, gain=gain, backend=backend)
    (grad_w,) = torch.autograd.grad(conv2d(x, out).square().sum(), w, create_graph=True)
    grad_w.square().sum().backward()
    return w.grad, gain.grad, x.grad


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_gradient_penalty_matches_the_reference(backend, device, x_requires_grad):
    got = _penalty_gradients(backend, device, x_requires_grad)
    expected = _penalty_gradients("reference", device, x_requires_grad)
    assert got[0].abs().max() > 0.1  # second-order terms are far from zero here
    for name, g, e in zip(("weight", "gain", "x"), got, expected):
        if e is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", ["single_pass", "exact"])
@pytest.mark.parametrize("groups", [1, 2])
def test_gradgradcheck_of_the_fused_forward(backend, device, mode, groups):
    _skip_repeats_under_the_interpreter(backend, device)
    torch.manual_seed(1)
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 4 // groups, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64, device=device).add(0.5).requires_grad_(True)

    def weight_of(x, w, gain):
        return ek.equinorm_forward(x, w, gain=gain, groups=groups, mode=mode, stats_fraction=0.5, backend=backend)[0]

    assert torch.autograd.gradgradcheck(weight_of, (x, w, gain))


def test_gradgradcheck_of_the_weight_transform(backend, device):
    torch.manual_seed(2)
    w = torch.randn(2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    mean = torch.rand(3, dtype=torch.float64, device=device).add(0.1).requires_grad_(True)
    gain = torch.rand(2, dtype=torch.float64, device=device).add(0.5).requires_grad_(True)

    def weight_of(w, mean, gain):
        return ek.equinorm_weight(w, mean, gain=gain, mode="exact", backend=backend)

    assert torch.autograd.gradgradcheck(weight_of, (w, mean, gain))
