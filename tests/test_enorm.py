"""ENorm with the sequential schedule: function preservation, energy descent, the fixed point."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from equinorm_kernels import ENorm
from nets import FunctionalNet, GroupedConvNet, SmallCNN, SmallResNet, mlp

# Hand-written channel groups, (producers, consumers with their columns per channel), following
# the paper's figure 3 for the residual net: identity skips chain the block outputs of a stage.
MLP_GROUPS = [(["0"], [("2", 1)]), (["2"], [("4", 1)])]
CNN_GROUPS = [(["conv1"], [("conv2", 1)]), (["conv2"], [("fc1", 4)]), (["fc1"], [("fc2", 1)])]
RESNET_GROUPS = [
    (["stem", "layer1.0.conv2", "layer1.1.conv2"],
     [("layer1.0.conv1", 1), ("layer1.1.conv1", 1), ("layer2.0.conv1", 1), ("layer2.0.shortcut.0", 1)]),
    (["layer1.0.conv1"], [("layer1.0.conv2", 1)]),
    (["layer1.1.conv1"], [("layer1.1.conv2", 1)]),
    (["layer2.0.conv1"], [("layer2.0.conv2", 1)]),
    (["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"], [("layer2.1.conv1", 1), ("fc", 1)]),
    (["layer2.1.conv1"], [("layer2.1.conv2", 1)]),
]  # fmt: skip
GROUPED_GROUPS = [(["conv1"], [("depthwise", 1)]), (["depthwise"], [("grouped", 1)]), (["grouped"], [("fc", 4)])]


def _case(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp((6, 8, 7, 3)), torch.randn(5, 6), MLP_GROUPS
    if name == "cnn":
        return SmallCNN(), torch.randn(3, 3, 8, 8), CNN_GROUPS
    if name == "resnet":
        return SmallResNet(), torch.randn(2, 3, 8, 8), RESNET_GROUPS
    return GroupedConvNet(), torch.randn(2, 4, 6, 6), GROUPED_GROUPS


CASES = ["mlp", "cnn", "resnet", "grouped"]


# ---- independent per-channel energies (explicit indexing, one channel at a time) -------------
def _row_energy(module: nn.Module, i: int, p: float, with_bias: bool = True) -> torch.Tensor:
    energy = module.weight[i].abs().pow(p).sum()
    if with_bias and module.bias is not None:
        energy = energy + module.bias[i].abs().pow(p)
    return energy


def _column(module: nn.Module, i: int, per_channel: int) -> torch.Tensor:
    weight = module.weight
    if per_channel > 1:
        return weight[:, i * per_channel : (i + 1) * per_channel]
    groups = getattr(module, "groups", 1)
    per_group = weight.shape[1]
    g, j = divmod(i, per_group)
    outs = weight.shape[0] // groups
    return weight[g * outs : (g + 1) * outs, j]


def _column_energy(module: nn.Module, i: int, p: float, per_channel: int) -> torch.Tensor:
    return _column(module, i, per_channel).abs().pow(p).sum()


def _channel_energies(model, spec, p, with_bias=True):
    producers, consumers = spec
    modules = dict(model.named_modules())
    channels = modules[producers[0]].weight.shape[0]
    rows = torch.stack([sum(_row_energy(modules[n], i, p, with_bias) for n in producers) for i in range(channels)])
    cols = torch.stack([sum(_column_energy(modules[n], i, p, s) for n, s in consumers) for i in range(channels)])
    return rows, cols


def _total_energy(model: nn.Module, p: float, with_bias: bool) -> float:
    total = 0.0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            total += float(module.weight.detach().abs().pow(p).sum())
            if with_bias and module.bias is not None:
                total += float(module.bias.detach().abs().pow(p).sum())
    return total


@torch.no_grad()
def _random_rescale(model, groups, spread, generator):
    """Function-preserving: producers' rows and biases times d, consumers' columns divided by d."""
    modules = dict(model.named_modules())
    for producers, consumers in groups:
        channels = modules[producers[0]].weight.shape[0]
        d = torch.exp(spread * torch.randn(channels, generator=generator, dtype=torch.float64))
        for i in range(channels):
            for name in producers:
                modules[name].weight[i] *= d[i]
                if modules[name].bias is not None:
                    modules[name].bias[i] *= d[i]
            for name, per_channel in consumers:
                _column(modules[name], i, per_channel).div_(d[i])


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_groups_match_the_hand_written_ones(case):
    model, _, spec = _case(case)
    groups = ENorm(model).groups
    got = sorted((sorted(g.producers), sorted(g.consumers)) for g in groups)
    expected = sorted((sorted(p), sorted(n for n, _ in c)) for p, c in spec)
    assert got == expected


@pytest.mark.parametrize("case", CASES)
def test_step_and_balance_preserve_the_function_float64(case):
    model, x, _ = _case(case)
    model, x = model.double(), x.double()
    before = model(x)
    enorm = ENorm(model)
    enorm.step()
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)
    enorm.balance()
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", ["mlp", "cnn", "resnet"])
def test_float32_stays_float32_and_preserves_the_function(case):
    model, x, _ = _case(case)
    before = model(x)
    ENorm(model).balance(tol=1e-4)
    assert all(param.dtype == torch.float32 for param in model.parameters())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_functional_layers_scalar_scale_and_view_preserve_the_function():
    torch.manual_seed(0)
    model = FunctionalNet().double().eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    before = model(x)
    enorm = ENorm(model)
    assert sorted((g.producers, g.consumers) for g in enorm.groups) == [
        (("conv_weight",), ("hidden",)),
        (("hidden",), ("out_weight",)),
    ]
    enorm.balance()
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)
    assert model.scale.item() == pytest.approx(1.7)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_affine_preserves_the_function(mode):
    torch.manual_seed(0)
    model = SmallResNet(norm="batch").double()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(4, 3, 8, 8, dtype=torch.float64) * 2 + 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
    model.train(mode == "train")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    enorm = ENorm(model, batchnorm="affine")
    producers = {name for group in enorm.groups for name in group.producers}
    assert "layer1.0.bn1" in producers and "layer1.0.conv1" not in producers
    enorm.step()
    enorm.balance()
    torch.testing.assert_close(model(x), before, atol=1e-9, rtol=1e-9)


class BatchNormSideBranch(nn.Module):
    """conv1's output feeds a BatchNorm and, directly, another conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head, self.side = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return self.head(F.relu(self.bn(h))) + self.side(h)


def test_batchnorm_affine_keeps_the_space_it_normalises():
    torch.manual_seed(0)
    model = BatchNormSideBranch().double()
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6, dtype=torch.float64) + 1)  # running statistics
        model.conv1.weight.mul_(5.0)
    model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model(x)
    enorm = ENorm(model, batchnorm="affine")
    assert [(g.producers, g.consumers) for g in enorm.groups] == [(("bn",), ("head",))]
    enorm.balance()
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)


def test_batchnorm_paper_mode_keeps_bn_affine_and_rescales_the_conv():
    torch.manual_seed(0)
    model = SmallResNet(norm="batch")
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(3.0)  # unbalanced, so conv1's rows must move
    bn = model.layer1[0].bn1
    gamma, beta, conv = bn.weight.clone(), bn.bias.clone(), model.layer1[0].conv1.weight.clone()
    enorm = ENorm(model)
    assert sorted(sorted(g.producers) for g in enorm.groups) == sorted(sorted(p) for p, _ in RESNET_GROUPS)
    enorm.step()
    assert torch.equal(bn.weight, gamma) and torch.equal(bn.bias, beta)
    assert not torch.allclose(model.layer1[0].conv1.weight, conv)


@pytest.mark.parametrize("include_bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_energy_decreases_every_cycle(case, include_bias):
    model, _, _ = _case(case)
    model = model.double()
    enorm = ENorm(model, include_bias=include_bias)
    energies = [_total_energy(model, 2.0, include_bias)]
    assert sum(enorm.energy().values()) == pytest.approx(energies[0], rel=1e-12)
    for _ in range(15):
        enorm.step()
        energies.append(_total_energy(model, 2.0, include_bias))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(energies, energies[1:]))
    assert energies[-1] < energies[0] * 0.999


@pytest.mark.parametrize("case", CASES)
def test_balance_reaches_the_fixed_point(case):
    model, _, spec = _case(case)
    model = model.double()
    cycles = ENorm(model).balance(tol=1e-10, max_cycles=5000)
    assert 1 < cycles < 5000
    for group in spec:
        rows, cols = _channel_energies(model, group, 2.0)
        torch.testing.assert_close(cols.sqrt(), rows.sqrt(), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("case", ["mlp", "resnet"])
def test_no_function_preserving_rescaling_beats_the_fixed_point(case):
    model, x, spec = _case(case)
    model, x = model.double(), x.double()
    ENorm(model).balance(tol=1e-11, max_cycles=5000)
    balanced = _total_energy(model, 2.0, True)
    output = model(x)
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        other = copy.deepcopy(model)
        _random_rescale(other, spec, 0.5 if trial % 2 else 0.01, generator)
        torch.testing.assert_close(other(x), output, atol=1e-10, rtol=1e-10)  # the test's own rescale is valid
        assert _total_energy(other, 2.0, True) >= balanced * (1 - 1e-12)


@pytest.mark.parametrize("p, c", [(2.0, 1.5), (3.0, 1.2), (1.5, 0.8)])
def test_fixed_point_with_asymmetric_scaling(p, c):
    model, x, spec = _case("cnn")
    model, x = model.double(), x.double()
    before = model(x)
    ENorm(model, c=c, p=p).balance(tol=1e-11, max_cycles=5000)
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)
    for group in spec:
        rows, cols = _channel_energies(model, group, p)
        torch.testing.assert_close(cols.pow(1 / p), c * rows.pow(1 / p), rtol=1e-7, atol=1e-12)


def test_step_hand_computed_on_one_pair():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[2.0, 0.0], [2.0, 1.0]]))
    ENorm(model).step()
    # R = (2, 4), C = (8, 1): d = (sqrt 2, 1/sqrt 2)
    r = math.sqrt(2.0)
    torch.testing.assert_close(model[0].weight, torch.tensor([[r, r], [r, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(model[2].weight, torch.tensor([[r, 0.0], [r, r]], dtype=torch.float64))


def test_bias_counting_changes_the_coefficient():
    for include_bias, d in ((True, 1 / math.sqrt(5.0)), (False, 1 / math.sqrt(3.0))):
        model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1, bias=False)).double()
        with torch.no_grad():
            model[0].weight.fill_(3.0)
            model[0].bias.fill_(4.0)
            model[2].weight.fill_(1.0)
        ENorm(model, include_bias=include_bias).step()
        assert model[0].weight.item() == pytest.approx(3.0 * d)
        assert model[0].bias.item() == pytest.approx(4.0 * d)
        assert model[2].weight.item() == pytest.approx(1.0 / d)


@pytest.mark.parametrize("widths", [(3, 4, 2), (3, 4, 4, 2)])
def test_dead_unit_and_zero_column_keep_d_one_and_stay_finite(widths):
    torch.manual_seed(0)
    model = mlp(widths).double()
    last = len(model) - 1
    with torch.no_grad():
        model[0].weight[1].zero_()  # dead unit: no input weights, no bias
        model[0].bias[1] = 0.0
        model[2].weight[:, 2].zero_()  # channel 2 of the first hidden layer is never read
    x = torch.randn(6, 3, dtype=torch.float64)
    before = model(x)
    dead_column = model[2].weight[:, 1].clone()
    unread_row, unread_bias = model[0].weight[2].clone(), model[0].bias[2].clone()
    enorm = ENorm(model)
    enorm.step()
    # model[0]'s rows only move with the first group, where the unread channel keeps d = 1
    assert torch.equal(model[0].weight[2], unread_row) and torch.equal(model[0].bias[2], unread_bias)
    if last == 2:  # model[2]'s columns only move with the first group, where the dead unit keeps d = 1
        assert torch.equal(model[2].weight[:, 1], dead_column)
    enorm.balance(tol=1e-10, max_cycles=2000)
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert torch.equal(model[0].weight[2], unread_row)
    if last == 2:
        assert torch.equal(model[2].weight[:, 1], dead_column)
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=1e-10)


def test_energy_per_column_matches_column_norms():
    model, _, _ = _case("cnn")
    per_column = ENorm(model, p=2.0).energy(per_column=True)
    assert list(per_column) == ["conv1", "conv2", "fc1", "fc2"]
    torch.testing.assert_close(per_column["fc1"], model.fc1.weight.detach().norm(dim=0))
    conv2 = model.conv2.weight.detach()
    torch.testing.assert_close(per_column["conv2"], conv2.transpose(0, 1).reshape(4, -1).norm(dim=1))
    energies = ENorm(model, include_bias=False).energy()
    assert energies["conv1"] == pytest.approx(float(model.conv1.weight.detach().pow(2).sum()))


def test_balance_reports_cycles_and_warns_when_out_of_cycles():
    model, _, _ = _case("resnet")
    enorm = ENorm(model.double())
    with pytest.warns(RuntimeWarning, match="did not reach"):
        assert enorm.balance(tol=1e-12, max_cycles=2) == 2
    cycles = enorm.balance(tol=1e-8)
    assert enorm.balance(tol=1e-8) == 1  # already balanced
    assert cycles > 1
