"""schedule="release": the released code's cycle, recomputed here one channel at a time."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from equinorm_kernels import ENorm
from nets import mlp


def _conv_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(5, 6, 1, bias=False), nn.ReLU(),
        nn.Conv2d(6, 2, 1, bias=False),
    ).double()  # fmt: skip


def _mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp((5, 6, 7, 4, 3), bias=bias).double()
    with torch.no_grad():
        model[2].weight.mul_(3.0)
    return model


def _expected_release_cycle(weights: list[torch.Tensor], q: float, c: float) -> list[torch.Tensor]:
    """Jacobi: every d from the weights before the cycle; pairs (W_{k-1}, W_k) for k = 1 .. n-2."""
    n = len(weights)
    coefficients = []
    for k in range(1, n - 1):
        previous, current = weights[k - 1], weights[k]
        d = []
        for j in range(previous.shape[0]):
            row = previous[j].abs().pow(q).sum().pow(1 / q)
            col = current[:, j].abs().pow(q).sum().pow(1 / q)
            d.append(torch.sqrt(col / (c * row)) if row > 0 and col > 0 else torch.tensor(1.0, dtype=row.dtype))
        coefficients.append(torch.stack(d))
    new = [w.clone() for w in weights]
    for k, d in zip(range(1, n - 1), coefficients):
        for j in range(len(d)):
            new[k - 1][j] *= d[j]
            new[k][:, j] /= d[j]
    return new


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_release_mlp_matches_the_jacobi_cycle_with_q_equal_p():
    model = _mlp()
    before = _weights(model)
    biases = [model[i].bias.detach().clone() for i in (0, 2, 4, 6)]
    enorm = ENorm(model, schedule="release", p=3.0, c=1.2)
    assert enorm.convolutional is False
    assert [(g.producers, g.consumers) for g in enorm.groups] == [(("0",), ("2",)), (("2",), ("4",))]
    enorm.step()
    expected = _expected_release_cycle(before, q=3.0, c=1.2)
    for got, want in zip(_weights(model), expected):
        torch.testing.assert_close(got, want)
    assert torch.equal(_weights(model)[3], before[3])  # the last matrix never changes
    for i, bias in zip((0, 2, 4, 6), biases):
        assert torch.equal(model[i].bias, bias)  # biases neither counted nor rescaled


def test_release_conv_chain_uses_q_2_and_skips_batchnorm():
    model = _conv_chain()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
    gamma = model[1].weight.detach().clone()
    before = _weights(model)
    enorm = ENorm(model, schedule="release", p=3.0)
    assert enorm.convolutional is True
    assert enorm.layer_names == ("0", "3", "5", "7")
    enorm.step()
    for got, want in zip(_weights(model), _expected_release_cycle(before, q=2.0, c=1.0)):
        torch.testing.assert_close(got, want)
    assert torch.equal(model[1].weight, gamma)


def test_release_zero_row_and_column_stay_finite_with_d_one():
    model = _mlp(bias=False)
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[2].weight[:, 4].zero_()
    before = _weights(model)
    ENorm(model, schedule="release").step()
    after = _weights(model)
    assert all(torch.isfinite(w).all() for w in after)
    for got, want in zip(after, _expected_release_cycle(before, q=2.0, c=1.0)):
        torch.testing.assert_close(got, want)
    assert torch.equal(after[0][4], before[0][4])  # d = 1 for the unread channel


def test_release_balance_reaches_its_fixed_point():
    model = _mlp(bias=False)
    cycles = ENorm(model, schedule="release", c=1.1).balance(tol=1e-10, max_cycles=5000)
    assert 1 < cycles < 5000
    weights = _weights(model)
    for k in (1, 2):
        rows = weights[k - 1].norm(dim=1)
        cols = weights[k].norm(dim=0)
        torch.testing.assert_close(cols, 1.1 * rows)


def test_release_momentum_only_for_convolutional_models():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    optimizer.step()
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    ENorm(model, optimizer, schedule="release").step()
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers))

    model = _conv_chain()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    optimizer.step()
    chain = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    products = [(w.detach() * optimizer.state[w]["momentum_buffer"]).clone() for w in chain]
    grads = [w.grad.clone() for w in chain]
    before = _weights(model)
    ENorm(model, optimizer, schedule="release").step()
    assert not torch.allclose(_weights(model)[0], before[0])
    for weight, product, grad in zip(chain, products, grads):
        torch.testing.assert_close(weight.detach() * optimizer.state[weight]["momentum_buffer"], product)
        assert torch.equal(weight.grad, grad)  # the release schedule leaves gradients alone


def test_release_weights_that_do_not_chain_are_an_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="chain.*'0' has 5 output channels.*'2'"):
        ENorm(model, schedule="release")
    with pytest.raises(ValueError, match="at least 2 dims"):
        ENorm(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)), schedule="release")


def test_release_needs_no_tracing():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.c(h) if h.sum() > 0 else -self.c(h)

    enorm = ENorm(DataDependent(), schedule="release")
    assert [(g.producers, g.consumers) for g in enorm.groups] == [(("a",), ("b",))]
