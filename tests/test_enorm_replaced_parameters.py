"""ENorm after parameters were replaced: it rescales what the model computes with."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from equinorm_kernels import ENorm
from nets import SmallCNN, mlp


def _replace_by_assignment(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight = nn.Parameter(torch.randn_like(module.weight) * 3)
            module.bias = nn.Parameter(torch.randn_like(module.bias))


def _replace_by_load_state_dict(model: nn.Module) -> None:
    state = {name: torch.randn_like(value) * 3 for name, value in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _energy_of(module: nn.Module, p: float) -> float:
    return float(module.weight.detach().abs().pow(p).sum() + module.bias.detach().abs().pow(p).sum())


REPLACEMENTS = [_replace_by_assignment, _replace_by_load_state_dict]


@pytest.mark.parametrize("replace", REPLACEMENTS)
@pytest.mark.parametrize("schedule", ["sequential", "release"])
def test_energies_describe_the_replacing_parameters(replace, schedule):
    torch.manual_seed(0)
    model = mlp((6, 8, 7, 3)).double()
    enorm = ENorm(model, schedule=schedule)
    replace(model)
    energies = enorm.energy()
    for name in ("0", "2", "4"):
        expected = _energy_of(model.get_submodule(name), 2.0)
        if schedule == "release":  # the release schedule counts weights only
            expected = float(model.get_submodule(name).weight.detach().pow(2).sum())
        assert energies[name] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("replace", REPLACEMENTS)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_step_after_replacement_rescales_the_live_parameters(replace, backend):
    torch.manual_seed(0)
    model = SmallCNN().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    enorm = ENorm(model, backend=backend)
    replace(model)
    before = model(x)
    energy_before = sum(enorm.energy().values())
    enorm.balance(tol=1e-8)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    # Balancing the live parameters lowers their energy; rescaling stale copies would leave it.
    current = sum(_energy_of(module, 2.0) for module in (model.conv1, model.conv2, model.fc1, model.fc2))
    assert current < 0.9 * energy_before
    assert sum(enorm.energy().values()) == pytest.approx(current, rel=1e-12)


def test_replacement_follows_the_optimizer_state_of_the_new_parameter():
    torch.manual_seed(0)
    model = mlp((4, 5, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    enorm = ENorm(model, optimizer)
    model[0].weight = nn.Parameter(torch.randn(5, 4, dtype=torch.float64) * 4)
    optimizer.param_groups[0]["params"] = list(model.parameters())
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    weight, momentum = model[0].weight, optimizer.state[model[0].weight]["momentum_buffer"]
    weight_before, product = weight.detach().clone(), (weight * momentum).detach().clone()
    enorm.step()
    assert not torch.allclose(weight.detach(), weight_before, rtol=1e-3)  # the live weight was rescaled
    torch.testing.assert_close(weight * optimizer.state[weight]["momentum_buffer"], product)


def test_replacement_of_another_shape_is_refused_with_the_parameter_named():
    model = mlp((6, 8, 7, 3))
    enorm = ENorm(model)
    model[2].weight = nn.Parameter(torch.randn(9, 8))
    with pytest.raises(ValueError, match=r"parameter '2\.weight' of module '2'.*shape \(9, 8\).*\(7, 8\)"):
        enorm.step()


def test_a_removed_parameter_is_refused():
    model = mlp((6, 8, 7, 3))
    enorm = ENorm(model)
    model[0].bias = None
    with pytest.raises(ValueError, match=r"parameter '0\.bias'.*replaced by NoneType"):
        enorm.energy()


def test_a_layer_module_replaced_by_another_type_is_refused():
    model = mlp((6, 8, 7, 3))
    enorm = ENorm(model)
    model[2] = nn.Identity()
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) was replaced by a Identity"):
        enorm.step()


def test_a_layer_module_replaced_by_one_of_the_same_type_is_followed():
    torch.manual_seed(0)
    model = mlp((6, 8, 7, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    enorm = ENorm(model)
    model[2] = nn.Linear(8, 7).double()
    before = model(x)
    enorm.balance(tol=1e-8)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    assert enorm.energy()["2"] == pytest.approx(_energy_of(model[2], 2.0), rel=1e-12)
