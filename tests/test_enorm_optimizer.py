"""Optimizer state and gradients follow ENorm's rescaling (sequential schedule)."""
from __future__ import annotations

import pytest
import torch

from equinorm_kernels import ENorm
from nets import SmallCNN, mlp


def _trained(optimizer_factory, steps=2):
    torch.manual_seed(0)
    model = mlp((6, 8, 7, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # unbalanced, so every group moves
    optimizer = optimizer_factory(model.parameters())
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()  # leave gradients in place
    return model, optimizer, x, y


def _snapshot(model, optimizer, key, power=1):
    return {
        name: (param.detach() ** power * optimizer.state[param][key]).clone()
        for name, param in model.named_parameters()
    }


def _assert_weights_moved(model, before):
    moved = max(float((param.detach() - before[name]).abs().max()) for name, param in model.named_parameters())
    assert moved > 1e-2


def test_sgd_momentum_and_grad_follow_the_weights():
    model, optimizer, _, _ = _trained(lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    momentum = _snapshot(model, optimizer, "momentum_buffer")
    grads = {name: (param.detach() * param.grad).clone() for name, param in model.named_parameters()}
    ENorm(model, optimizer).step()
    _assert_weights_moved(model, weights)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach() * optimizer.state[param]["momentum_buffer"], momentum[name])
        torch.testing.assert_close(param.detach() * param.grad, grads[name])


def test_sgd_step_after_enorm_matches_the_update_by_hand():
    lr, beta = 0.05, 0.9
    model, optimizer, x, y = _trained(lambda params: torch.optim.SGD(params, lr=lr, momentum=beta))
    old = {
        name: (param.detach().clone(), optimizer.state[param]["momentum_buffer"].clone())
        for name, param in model.named_parameters()
    }
    ENorm(model, optimizer).step()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    expected = {}
    for name, param in model.named_parameters():
        weight_before, buffer_before = old[name]
        scale = param.detach() / weight_before  # what ENorm did to this weight (no zero weights here)
        buffer = beta * buffer_before / scale + param.grad
        expected[name] = param.detach() - lr * buffer
    optimizer.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name])


def test_adam_moments_follow_the_weights():
    model, optimizer, _, _ = _trained(lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True))
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    first = _snapshot(model, optimizer, "exp_avg")
    second = _snapshot(model, optimizer, "exp_avg_sq", power=2)
    peak = _snapshot(model, optimizer, "max_exp_avg_sq", power=2)
    ENorm(model, optimizer).step()
    _assert_weights_moved(model, weights)
    for name, param in model.named_parameters():
        state = optimizer.state[param]
        torch.testing.assert_close(param.detach() * state["exp_avg"], first[name])
        torch.testing.assert_close(param.detach() ** 2 * state["exp_avg_sq"], second[name])
        torch.testing.assert_close(param.detach() ** 2 * state["max_exp_avg_sq"], peak[name])


def test_adam_without_state_yet_and_no_optimizer_rescale_grads_only():
    torch.manual_seed(0)
    model = SmallCNN().double()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    products = {name: (param.detach() * param.grad).clone() for name, param in model.named_parameters()}
    ENorm(model, optimizer).balance()
    assert not optimizer.state
    ENorm(model).step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach() * param.grad, products[name])


def test_unsupported_optimizer_is_an_error_and_ignore_opts_out():
    model, optimizer, _, _ = _trained(lambda params: torch.optim.RMSprop(params, lr=0.01))
    with pytest.raises(ValueError, match="RMSprop.*optimizer_state='ignore'"):
        ENorm(model, optimizer)
    averages = {name: optimizer.state[param]["square_avg"].clone() for name, param in model.named_parameters()}
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    ENorm(model, optimizer, optimizer_state="ignore").step()
    _assert_weights_moved(model, weights)
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["square_avg"], averages[name])
        assert torch.equal(param.grad, grads[name])


def test_optimizer_must_be_an_optimizer():
    with pytest.raises(TypeError, match="^optimizer must be a torch.optim.Optimizer"):
        ENorm(mlp(), optimizer=[1, 2])


class _AdamWithOwnState(torch.optim.Adam):
    """An Adam subclass that keeps a per-element tensor of its own in the state."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["trace"] = param.detach().clone()
        return loss


class _AdamWithStepsOnly(torch.optim.Adam):
    """An Adam subclass with the standard state only."""


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_an_adam_subclass_with_unknown_state_is_an_error_and_ignore_opts_out(backend):
    model, optimizer, _, _ = _trained(lambda params: _AdamWithOwnState(params, lr=0.01))
    enorm = ENorm(model, optimizer, backend=backend)
    with pytest.raises(ValueError, match=r"optimizer state \['trace'\] of _AdamWithOwnState.*optimizer_state='ignore'"):
        enorm.step()
    ENorm(model, optimizer, optimizer_state="ignore", backend=backend).step()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_an_adam_subclass_with_the_standard_state_is_rescaled(backend):
    model, optimizer, _, _ = _trained(lambda params: _AdamWithStepsOnly(params, lr=0.01))
    first = _snapshot(model, optimizer, "exp_avg")
    ENorm(model, optimizer, backend=backend).step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach() * optimizer.state[param]["exp_avg"], first[name])
