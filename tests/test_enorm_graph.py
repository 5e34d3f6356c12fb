"""ENorm's channel-group discovery: what it accepts, what it refuses, and its argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from equinorm_kernels import ENorm
from nets import SmallCNN, mlp


class SigmoidBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


class CatBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.shared, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.shared(F.relu(self.shared(F.relu(self.fc1(x))))))


class InputSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) + x)


class ConstantShift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x) + 1.0))


class LinearOnConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(2, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)))


class BadFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 1), nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class HiddenOutput(nn.Module):
    """Returns a hidden activation besides the logits: that space must stay as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x):
        features = F.relu(self.fc2(F.relu(self.fc1(x))))
        return features, self.fc3(features)


class OutputOps(nn.Module):
    """Unsupported ops on the output space only, a flatten of the input, a weight-free branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = torch.tanh(x.flatten(1))
        logits = self.fc2(nn.functional.dropout(F.relu(self.fc1(x)), 0.1, self.training))
        return torch.sigmoid(logits) + logits.log_softmax(-1) * 0.5


class PoolOverLinearChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(3, 2)

    def forward(self, x):  # x: (N, T, 4); MaxPool1d pools the last dim, here fc1's channels
        return self.fc2(F.max_pool1d(F.relu(self.fc1(x)), 2))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


@pytest.mark.parametrize(
    "model, pattern",
    [
        (SigmoidBetween(), r"'fc2' reads the result of torch\.sigmoid.*produced by 'fc1'"),
        (nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)), r"module '1' \(Sigmoid\)"),
        (nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2)), r"GELU"),
        (CatBranches(), r"cat"),
        (PoolOverLinearChannels(), r"max_pool1d.*on channels on the last dim"),
        (InputSkip(), r"adds a tensor that is not rescaled with these channels.*'fc1'"),
        (ConstantShift(), r"adds a tensor that is not rescaled with these channels.*'fc1'"),
    ],
)
def test_unsupported_op_on_a_hidden_group_is_an_error(model, pattern):
    with pytest.raises(ValueError, match=pattern):
        ENorm(model)


def test_module_called_twice_is_an_error():
    with pytest.raises(ValueError, match="module 'shared' is called more than once"):
        ENorm(CalledTwice())


def test_tied_weights_are_an_error():
    model = mlp((4, 4, 4, 2))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match="already used by layer '0'"):
        ENorm(model)


def test_linear_reading_channels_on_dim_1_is_an_error():
    with pytest.raises(ValueError, match="layer 'fc'.*on dim 1"):
        ENorm(LinearOnConvOutput())


def test_flatten_with_a_feature_count_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match="10 is not a multiple of 3"):
        ENorm(BadFlatten())


def test_untraceable_model_is_an_error_that_names_fx():
    with pytest.raises(ValueError, match="torch.fx"):
        ENorm(DataDependent())


def test_ops_on_the_output_space_and_the_input_are_fine():
    torch.manual_seed(0)
    model = OutputOps().double().eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    before = model(x)
    enorm = ENorm(model)
    assert [(g.producers, g.consumers) for g in enorm.groups] == [(("fc1",), ("fc2",))]
    enorm.balance()
    torch.testing.assert_close(model(x), before)


def test_space_that_reaches_the_output_is_not_rescaled():
    torch.manual_seed(0)
    model = HiddenOutput().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    features, logits = model(x)
    enorm = ENorm(model)
    assert [(g.producers, g.consumers) for g in enorm.groups] == [(("fc1",), ("fc2",))]
    enorm.balance()
    new_features, new_logits = model(x)
    torch.testing.assert_close(new_features, features)
    torch.testing.assert_close(new_logits, logits)


def test_groups_are_readable():
    enorm = ENorm(SmallCNN())
    group = enorm.groups[1]
    assert (group.channels, group.producers, group.consumers) == (6, ("conv2",), ("fc1",))
    assert str(group) == "6 channels: conv2 -> fc1"
    assert "conv2 -> fc1" in repr(enorm)
    assert enorm.layer_names == ("conv1", "conv2", "fc1", "fc2")


def test_equinorm_layer_in_the_model_is_an_error():
    layers = pytest.importorskip("equinorm_kernels.layers")
    if not hasattr(layers, "EquiNormLayer") or not hasattr(layers, "EquiNormLinear"):
        pytest.skip("EquiNorm layers are not available")
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), layers.EquiNormLinear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'2' \(EquiNormLinear\) is an EquiNorm layer"):
        ENorm(model)
    with pytest.raises(ValueError, match=r"'2' \(EquiNormLinear\) is an EquiNorm layer"):
        ENorm(model, schedule="release")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"c": 0.0}, ValueError, "^c must be"),
        ({"c": -1.0}, ValueError, "^c must be"),
        ({"c": float("nan")}, TypeError, "^c must be"),
        ({"p": 0.5}, ValueError, "^p must be"),
        ({"p": float("inf")}, TypeError, "^p must be"),
        ({"p": "2"}, TypeError, "^p must be"),
        ({"schedule": "parallel"}, ValueError, "^schedule must be one of"),
        ({"batchnorm": "ignore"}, ValueError, "^batchnorm must be one of"),
        ({"optimizer_state": "drop"}, ValueError, "^optimizer_state must be one of"),
        ({"include_bias": 1}, TypeError, "^include_bias must be a bool"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ENorm(mlp(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module"):
        ENorm(lambda x: x)


def test_balance_arguments_are_checked():
    enorm = ENorm(mlp())
    with pytest.raises(ValueError, match="^tol must be"):
        enorm.balance(tol=-1.0)
    with pytest.raises(ValueError, match="^max_cycles must be a positive int"):
        enorm.balance(max_cycles=0)
