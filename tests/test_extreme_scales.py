"""EquiNorm at the ends of the floating-point range: every backend returns the float64 answer
wherever it is representable in the operands' dtype, and an infinity of the right sign only where
it is not.

w'' does not depend on the scale of a weight row and scales as 1 / |x|, but the sums behind it
(mu_c w_dct, P_d, and P_d**2 in the gradient) leave float32's range long before the answer does.
The truth is the reference run on the same values in float64, whose range holds every product.
"""
from __future__ import annotations

import pytest
import torch

import equinorm_kernels as ek
from kernel_backends import fused_backend_params

SCALES = [1e-38, 1e-30, 1e-20, 1.0, 1e20, 1e30]
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *fused_backend_params()]


def _operands(x_scale: float, w_scale: float, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 4, 4, generator=generator, dtype=torch.float64) * x_scale
    w = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64) * w_scale
    upstream = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (x, w, upstream)]


def _forward_and_grads(x, w, upstream, backend: str, mode: str):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    out, _ = ek.equinorm_forward(x, w, backend=backend, mode=mode)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), upstream)
    return {"out": out.detach(), "grad_x": grad_x, "grad_w": grad_w}


def _assert_matches_representable_truth(name: str, got: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                                        rtol: float) -> None:
    assert torch.isfinite(truth).all(), f"{name}: the float64 truth itself is not finite"
    # The answer in the dtype: the truth rounded to it, an infinity where it overflows and 0 or a
    # subnormal where it underflows.
    expected, got, finfo = truth.to(dtype).double(), got.double().cpu(), torch.finfo(dtype)
    assert not torch.isnan(got).any(), f"{name}: NaN where the answer is {expected[torch.isnan(got)][:4].tolist()}"
    overflow = expected.isinf()
    assert torch.equal(got[overflow], expected[overflow]), f"{name}: only values beyond {finfo.max:.3g} may be infinite"
    representable = expected[~overflow]
    if representable.numel() == 0:
        return
    # A tolerance relative to the tensor's largest value: values far below it only need the absolute
    # accuracy the largest one has, and values among the subnormals that of their spacing.
    scale = representable.abs().max().item()
    subnormal_spacing = finfo.smallest_normal * finfo.eps
    torch.testing.assert_close(got[~overflow], representable, rtol=rtol, atol=rtol * scale + subnormal_spacing,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
@pytest.mark.parametrize("w_scale", SCALES)
@pytest.mark.parametrize("x_scale", SCALES)
def test_float32_answer_wherever_representable(backend, device, mode, x_scale, w_scale):
    x, w, upstream = _operands(x_scale, w_scale, torch.float32, device)
    got = _forward_and_grads(x, w, upstream, backend, mode)
    truth = _forward_and_grads(x.double(), w.double(), upstream.double(), "reference", mode)
    for name in got:
        _assert_matches_representable_truth(f"{name} (x ~ {x_scale:g}, w ~ {w_scale:g})", got[name], truth[name].cpu(),
                                            torch.float32, rtol=2e-4)


HALF_CASES = [
    # fp16: inputs among its subnormals, weights near its smallest normal, and both near its largest
    pytest.param(torch.float16, 1e-7, 1e-4, id="float16-tiny"),
    pytest.param(torch.float16, 3e4, 1e4, id="float16-huge"),
    # bf16 has float32's exponent range with 8 bits of mantissa
    pytest.param(torch.bfloat16, 1e-38, 1e-38, id="bfloat16-tiny"),
    pytest.param(torch.bfloat16, 1e30, 1e30, id="bfloat16-huge"),
    pytest.param(torch.bfloat16, 1e-30, 1e30, id="bfloat16-tiny-x-huge-w"),
]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, x_scale, w_scale", HALF_CASES)
def test_half_precision_extremes(backend, device, dtype, x_scale, w_scale):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16 and min(x_scale, w_scale) < 1e-37:
        pytest.skip("Triton's CPU interpreter widens bfloat16 subnormals to float32 inexactly (a GPU widens them exactly)")
    x, w, upstream = _operands(x_scale, w_scale, dtype, device)
    got = _forward_and_grads(x, w, upstream, backend, "single_pass")
    truth = _forward_and_grads(x.double(), w.double(), upstream.double(), "reference", "single_pass")
    # The outputs are rounded once to the dtype; the truth is computed from the same rounded operands.
    rtol = 2 * torch.finfo(dtype).eps
    for name in got:
        _assert_matches_representable_truth(f"{name} ({dtype}, x ~ {x_scale:g}, w ~ {w_scale:g})", got[name],
                                            truth[name].cpu(), dtype, rtol=rtol)
