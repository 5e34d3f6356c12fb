"""EquiNorm's ratio and ENorm's c: the bounds of [2**-63, 2**63] give finite results, past them an error."""
from __future__ import annotations

import math

import pytest
import torch

import equinorm_kernels as ek
from equinorm_kernels import ENorm, reference
from nets import mlp

LOW, HIGH = 2.0**-63, 2.0**63
PAST_THE_BOUNDS = [1e300, math.nextafter(HIGH, math.inf), math.nextafter(LOW, 0.0), 1e-300]
RANGE_MESSAGE = r"must be in \[2\*\*-63, 2\*\*63\]"


def _operands():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    x = torch.rand(2, 3, 5, 5, generator=gen)
    return weight, x, x.mean(dim=(0, 2, 3))


@pytest.mark.parametrize("ratio", [LOW, HIGH])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ratio_at_the_bounds_scales_the_ratio_one_result_exactly(ratio, backend):
    weight, x, mean = _operands()
    unit = ek.equinorm_weight(weight, mean, backend=backend)
    out = ek.equinorm_weight(weight, mean, ratio=ratio, backend=backend)
    fused, _ = ek.equinorm_forward(x, weight, ratio=ratio, backend=backend)
    # The result is linear in ratio and a power of two scales float32 exactly.
    assert torch.isfinite(out).all() and torch.isfinite(fused).all()
    torch.testing.assert_close(out, unit * ratio, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused, unit * ratio, rtol=1e-5, atol=0)
    assert (out != 0).any()


@pytest.mark.parametrize("ratio", PAST_THE_BOUNDS)
def test_ratio_past_the_bounds_is_rejected_naming_ratio(ratio):
    weight, x, mean = _operands()
    for call in (
        lambda: ek.equinorm_weight(weight, mean, ratio=ratio),
        lambda: reference.equinorm_weight(weight, mean, ratio=ratio),
        lambda: ek.equinorm_forward(x, weight, ratio=ratio),
    ):
        with pytest.raises(ValueError, match=r"^ratio " + RANGE_MESSAGE + ".*got"):
            call()


def _expected_step(model: torch.nn.Sequential, c: float, p: float = 2.0) -> torch.Tensor:
    """d of the one group of a Linear-ReLU-Linear net, in float64 from the definition."""
    first, second = model[0], model[2]
    rows = first.weight.double().pow(2).sum(1) + first.bias.double().pow(2)
    columns = second.weight.double().pow(2).sum(0)
    return (columns / rows).pow(1 / (2 * p)) / math.sqrt(c)


@pytest.mark.parametrize("c", [LOW, HIGH])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_c_at_the_bounds_gives_finite_weights_and_the_defined_step(c, backend):
    torch.manual_seed(0)
    model = mlp((5, 6, 3))
    d = _expected_step(model, c)
    rows, columns = model[0].weight.detach().double().clone(), model[2].weight.detach().double().clone()
    ENorm(model, c=c, backend=backend).step()
    assert all(torch.isfinite(param).all() for param in model.parameters())
    torch.testing.assert_close(model[0].weight.double(), rows * d[:, None], rtol=1e-5, atol=0)
    torch.testing.assert_close(model[2].weight.double(), columns / d[None, :], rtol=1e-5, atol=0)


@pytest.mark.parametrize("c", PAST_THE_BOUNDS)
def test_c_past_the_bounds_is_rejected_naming_c(c):
    with pytest.raises(ValueError, match=r"^c " + RANGE_MESSAGE + ".*got"):
        ENorm(mlp((5, 6, 3)), c=c)
