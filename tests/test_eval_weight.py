"""The eval-mode weight is built once and reused while nothing it depends on changes; every change
(in place or by assignment, of weight, gain, running mean, options, device or dtype) rebuilds it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import equinorm_kernels as ek
from equinorm_kernels import layers


@pytest.fixture
def builds(monkeypatch):
    """Counts the eval-weight builds (calls of equinorm_weight from the layers)."""
    count = {"n": 0}
    original = layers.equinorm_weight

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "equinorm_weight", counting)
    return count


def _trained_layer() -> ek.EquiNormConv2d:
    torch.manual_seed(0)
    layer = ek.EquiNormConv2d(3, 4, 3, padding=1)
    layer(torch.rand(2, 3, 6, 6))  # running statistics away from their initial ones
    return layer.eval()


def _expected(layer: ek.EquiNormConv2d, x: torch.Tensor) -> torch.Tensor:
    """The eval output computed from scratch by the reference."""
    weight = ek.reference.equinorm_weight(layer.weight.detach(), layer.running_mean, gain=layer.gain.detach(),
                                          mode=layer.mode, eps=layer.eps)
    return torch.nn.functional.conv2d(x, weight.to(x.dtype), layer.bias.detach(), padding=1)


def _eval(layer, x):
    with torch.no_grad():
        return layer(x)


def test_repeated_eval_calls_build_the_weight_once(builds):
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    builds["n"] = 0
    first = _eval(layer, x)
    for _ in range(3):
        torch.testing.assert_close(_eval(layer, x), first, rtol=0, atol=0)
    assert builds["n"] == 1
    torch.testing.assert_close(first, _expected(layer, x))
    assert not any("eval_weight" in key for key in layer.state_dict())


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: torch.optim.SGD(layer.parameters(), lr=0.5).step() if _with_grads(layer) else None,
        lambda layer: _through_data_then_reset(layer),
        lambda layer: _no_grad(lambda: layer.gain.mul_(2.0)),
        lambda layer: _no_grad(lambda: layer.weight.add_(0.1)),
        lambda layer: setattr(layer, "weight", nn.Parameter(torch.randn_like(layer.weight))),
        lambda layer: setattr(layer, "gain", nn.Parameter(torch.full_like(layer.gain, 0.5))),
        lambda layer: layer.train()(torch.rand(4, 3, 6, 6) * 3) is None or layer.eval(),  # running mean moves
        lambda layer: layer.load_state_dict({**layer.state_dict(), "running_mean": torch.full((3,), 2.0)}),
        lambda layer: nn.init.normal_(layer.weight),
        lambda layer: setattr(layer, "mode", "exact"),
        lambda layer: layer.double(),
    ],
    ids=["optimizer-step", "data-with-reset", "gain-in-place", "weight-in-place", "weight-assigned",
         "gain-assigned", "training-step", "load-state-dict", "init", "mode", "to-double"],
)
def test_every_change_rebuilds_the_weight(change, builds):
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    _eval(layer, x)
    change(layer)
    layer.eval()
    x = x.to(layer.weight.dtype)
    builds["n"] = 0
    torch.testing.assert_close(_eval(layer, x), _expected(layer, x))
    assert builds["n"] == 1


def _with_grads(layer) -> bool:
    layer.train()
    layer(torch.rand(2, 3, 6, 6)).square().sum().backward()
    return True


def _through_data_then_reset(layer) -> None:
    layer.weight.data.copy_(torch.randn_like(layer.weight))  # no version bump: the documented reset
    layer.reset_eval_weight()


def _no_grad(action):
    with torch.no_grad():
        action()


def test_eval_with_gradients_is_differentiable_and_not_reused(builds):
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    builds["n"] = 0
    for _ in range(2):
        layer.zero_grad()
        layer(x).square().sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert builds["n"] == 2


def test_inference_mode_weight_is_not_reused_outside_it():
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    with torch.inference_mode():
        inferred = layer(x)
    x.requires_grad_(True)
    with torch.no_grad():
        layer.weight.requires_grad_(False)
        layer.gain.requires_grad_(False)
    out = layer(x)  # grad enabled for x: an inference tensor here could not be saved for backward
    out.sum().backward()
    torch.testing.assert_close(out.detach(), inferred)
    assert x.grad is not None


def test_a_copied_layer_builds_its_own_weight():
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    _eval(layer, x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.mul_(-1.0)
    torch.testing.assert_close(_eval(twin, x), _expected(twin, x))
    torch.testing.assert_close(_eval(layer, x), _expected(layer, x))


def test_compiled_eval_equals_eager():
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
        layer.gain.mul_(3.0)
        torch.testing.assert_close(compiled(x), _expected(layer, x))


def test_copies_and_pickles_do_not_carry_the_eval_weight(tmp_path):
    layer, x = _trained_layer(), torch.rand(2, 3, 6, 6)
    _eval(layer, x)
    assert "_cached_eval_weight" in layer.__dict__
    assert "_cached_eval_weight" not in copy.deepcopy(layer).__dict__
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert "_cached_eval_weight" not in loaded.__dict__
    torch.testing.assert_close(_eval(loaded, x), _expected(layer, x))
