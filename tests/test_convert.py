"""equinorm_kernels.convert: Conv/Linear -> BatchNorm pairs become EquiNorm layers."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from equinorm_kernels import EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear, convert
from equinorm_kernels.layers import EquiNormLayer

from nets import BasicBlock, DataDependentNet, PartlyConvertibleNet, ReusedModulesNet, SmallResNet


# --- helpers ----------------------------------------------------------------------------------
def resnet_pairs(model: SmallResNet) -> list[tuple[str, str]]:
    """The (conv, BatchNorm) qualified names of SmallResNet, read from its structure, not traced."""
    pairs = [("stem", "stem_bn")]
    for name, module in model.named_modules():
        if isinstance(module, BasicBlock):
            pairs += [(f"{name}.conv1", f"{name}.bn1"), (f"{name}.conv2", f"{name}.bn2")]
            if isinstance(module.shortcut, nn.Sequential):
                pairs.append((f"{name}.shortcut.0", f"{name}.shortcut.1"))
    return pairs


def randomize_batchnorms(model: nn.Module) -> None:
    """Non-trivial affine values, so that copying them is observable."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-1.0, 1.0)


def convert_quietly(model: nn.Module, **kwargs) -> nn.Module:
    """convert, failing the test on any warning it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return convert(model, **kwargs)


def convert_warnings(model: nn.Module, **kwargs) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "convert" in str(w.message)]
    return converted, messages


def listed_reasons(message: str) -> dict[str, str]:
    """Module path -> reason, from the '  - `path` (Type): reason' lines of a convert report."""
    return dict(re.findall(r"^  - `([^`]+)` \(\w+\): (.*)$", message, flags=re.MULTILINE))


def mixed_sign_rows(weight: torch.Tensor) -> torch.Tensor:
    rows = weight.reshape(weight.shape[0], -1)
    return (rows > 0).any(dim=1) & (rows < 0).any(dim=1)


# --- SmallResNet --------------------------------------------------------------------------------
@pytest.fixture
def resnet() -> SmallResNet:
    torch.manual_seed(0)
    model = SmallResNet(norm="batch")
    randomize_batchnorms(model)
    return model


def test_resnet_every_pair_is_converted(resnet):
    pairs = resnet_pairs(resnet)
    assert len(pairs) == 10  # stem, 4 blocks x 2, one 1x1 shortcut
    converted = convert_quietly(resnet)
    assert type(converted) is SmallResNet
    for conv_name, bn_name in pairs:
        assert type(converted.get_submodule(conv_name)) is EquiNormConv2d, conv_name
        assert type(converted.get_submodule(bn_name)) is nn.Identity, bn_name
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, EquiNormLayer) for m in converted.modules()) == len(pairs)
    assert type(converted.fc) is nn.Linear  # a Linear without a BatchNorm after it stays


def test_resnet_layers_copy_conv_hyperparameters_and_batchnorm_affine(resnet):
    resnet.layer1[0].bn1.momentum = 0.3
    resnet.layer2[1].bn2.momentum = None
    converted = convert_quietly(resnet)
    for conv_name, bn_name in resnet_pairs(resnet):
        conv, bn = resnet.get_submodule(conv_name), resnet.get_submodule(bn_name)
        layer = converted.get_submodule(conv_name)
        for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            assert getattr(layer, attribute) == getattr(conv, attribute), (conv_name, attribute)
        assert layer.weight.dtype == conv.weight.dtype and layer.weight.device == conv.weight.device
        mixed = mixed_sign_rows(conv.weight)
        torch.testing.assert_close(layer.weight[mixed], conv.weight[mixed])
        torch.testing.assert_close(layer.weight.abs(), conv.weight.abs())
        assert bool(mixed_sign_rows(layer.weight).all())
        torch.testing.assert_close(layer.gain, bn.weight)
        torch.testing.assert_close(layer.bias, bn.bias)
        torch.testing.assert_close(layer.running_mean, torch.ones(conv.in_channels))
        assert layer.momentum == bn.momentum
        assert layer.training
    assert converted.layer1[0].conv1.momentum == 0.3 and converted.layer2[1].conv2.momentum is None


def test_resnet_forward_backward_train_and_eval(resnet):
    converted = convert_quietly(resnet)
    x = torch.rand(2, 3, 8, 8)
    out = converted(x)
    assert out.shape == (2, 3) and bool(torch.isfinite(out).all())
    out.square().sum().backward()
    for conv_name, _ in resnet_pairs(resnet):
        layer = converted.get_submodule(conv_name)
        for name in ("weight", "gain", "bias"):
            grad = getattr(layer, name).grad
            assert grad is not None and bool(torch.isfinite(grad).all()), (conv_name, name)
        assert not torch.equal(layer.running_mean, torch.ones_like(layer.running_mean))
    converted.eval()
    with torch.no_grad():
        assert bool(torch.isfinite(converted(x)).all())


def test_converted_resnet_trains():
    torch.manual_seed(0)
    model = convert_quietly(SmallResNet(norm="batch"))
    x, target = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


# --- what cannot be converted ---------------------------------------------------------------
def test_unconvertible_batchnorms_are_listed_in_one_warning():
    model = PartlyConvertibleNet()
    converted, messages = convert_warnings(model)
    assert len(messages) == 1
    reasons = listed_reasons(messages[0])
    assert set(reasons) == {"shared_bn_a", "shared_bn_b", "after_add_bn", "after_relu_bn", "depthwise_bn"}
    assert "output of `shared` is also used by `shared_bn_b`" in reasons["shared_bn_a"]
    assert "output of `shared` is also used by `shared_bn_a`" in reasons["shared_bn_b"]
    assert "operator.add" in reasons["after_add_bn"]
    assert "relu" in reasons["after_relu_bn"]
    assert "single weight per output channel" in reasons["depthwise_bn"]
    assert "torch.nn.functional.batch_norm" in messages[0] and "functional calls are not converted" in messages[0]
    assert type(converted.convertible) is EquiNormConv2d and type(converted.convertible_bn) is nn.Identity
    for name in reasons:
        assert type(converted.get_submodule(name)) is nn.BatchNorm2d
    assert type(converted.shared) is nn.Conv2d and type(converted.depthwise) is nn.Conv2d
    assert bool(torch.isfinite(converted(torch.rand(2, 3, 6, 6))).all())


def test_modules_called_twice_are_listed():
    converted, messages = convert_warnings(ReusedModulesNet())
    assert len(messages) == 1
    reasons = listed_reasons(messages[0])
    assert set(reasons) == {"first_bn", "second_bn", "reused_bn"}
    assert "`reused_conv` is called 2 times" in reasons["first_bn"]
    assert "`reused_conv` is called 2 times" in reasons["second_bn"]
    assert reasons["reused_bn"].startswith("it is called 2 times")
    assert not any(isinstance(m, EquiNormLayer) for m in converted.modules())


def test_functional_batch_norm_names_the_calling_module():
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(x, None, None, training=True)

    _, messages = convert_warnings(nn.Sequential(nn.Conv2d(3, 4, 3), Block()))
    assert len(messages) == 1
    assert "torch.nn.functional.batch_norm(...)" in messages[0] and "in `1` (Block)" in messages[0]


@pytest.mark.parametrize("model_class", [PartlyConvertibleNet, ReusedModulesNet])
def test_strict_raises_and_changes_nothing(model_class):
    model = model_class()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"strict=True.*cannot be converted") as error:
        convert(model, strict=True, inplace=True)
    listed = listed_reasons(str(error.value))
    assert listed and all(type(model.get_submodule(name)) is nn.BatchNorm2d for name in listed)
    assert not any(isinstance(m, EquiNormLayer) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dimensionality_mismatch_is_listed():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm2d(5))
    _, messages = convert_warnings(model)
    assert "`1`" in messages[0] and "needs BatchNorm1d, not BatchNorm2d" in messages[0]


def test_hooks_and_direct_parameter_reads_block_conversion():
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) * self.conv.weight.sum()

    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda module, inputs, output: None)
    _, hook_messages = convert_warnings(hooked)
    _, read_messages = convert_warnings(ReadsWeight())
    assert "`0` has hooks" in hook_messages[0]
    assert "reads `conv.weight` directly" in read_messages[0]


def test_subclasses_are_not_converted():
    class MyConv(nn.Conv2d):
        pass

    _, messages = convert_warnings(nn.Sequential(MyConv(3, 4, 3), nn.SyncBatchNorm(4), MyConv(4, 4, 3), nn.BatchNorm2d(4)))
    reasons = listed_reasons(messages[0])
    assert "not SyncBatchNorm" in reasons["1"]
    assert "not subclasses of nn.Conv2d" in reasons["3"]


def test_untraceable_model_lists_its_batchnorms_with_the_trace_error():
    model = DataDependentNet()
    converted, messages = convert_warnings(model)
    assert "could not trace DataDependentNet" in listed_reasons(messages[0])["bn"]
    assert "TraceError" in listed_reasons(messages[0])["bn"]
    assert type(converted.bn) is nn.BatchNorm2d and type(converted.conv) is nn.Conv2d
    with pytest.raises(ValueError, match=r"(?s)strict=True.*could not trace DataDependentNet"):
        convert(model, strict=True)


# --- other layer kinds and options ----------------------------------------------------------
def test_linear_to_batchnorm1d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    randomize_batchnorms(model)
    converted = convert_quietly(model)
    layer = converted[0]
    assert type(layer) is EquiNormLinear and type(converted[1]) is nn.Identity and type(converted[3]) is nn.Linear
    assert (layer.in_features, layer.out_features) == (6, 5)
    torch.testing.assert_close(layer.bias, model[1].bias)  # the Linear's own bias is dropped
    torch.testing.assert_close(layer.gain, model[1].weight)
    out = converted(torch.rand(4, 6))
    out.sum().backward()
    assert out.shape == (4, 3) and layer.weight.grad is not None


@pytest.mark.parametrize(
    "conv, bn, layer_class, shape",
    [
        (nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.BatchNorm1d(4), EquiNormConv1d, (2, 3, 9)),
        (nn.Conv3d(3, 4, 2, dilation=2, bias=False), nn.BatchNorm3d(4), EquiNormConv3d, (2, 3, 5, 5, 5)),
    ],
)
def test_conv1d_and_conv3d_pairs(conv, bn, layer_class, shape):
    converted = convert_quietly(nn.Sequential(conv, bn))
    layer = converted[0]
    assert type(layer) is layer_class and type(converted[1]) is nn.Identity
    for attribute in ("kernel_size", "stride", "padding", "dilation"):
        assert getattr(layer, attribute) == getattr(conv, attribute)
    out = converted(torch.rand(shape))
    out.sum().backward()
    assert out.shape == conv(torch.rand(shape)).shape and bool(torch.isfinite(layer.weight.grad).all())


def test_one_signed_weights_get_mixed_signs():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.abs_()
    converted = convert_quietly(nn.Sequential(conv, nn.BatchNorm2d(4)))
    assert bool(mixed_sign_rows(converted[0].weight).all())
    torch.testing.assert_close(converted[0].weight.abs(), conv.weight)


def test_options_eval_mode_and_frozen_affine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, momentum=0.5)).eval()
    layer = convert_quietly(model, mode="exact", momentum=0.2, stats_fraction=0.5, eps=1e-4)[0]
    assert (layer.mode, layer.momentum, layer.stats_fraction, layer.eps) == ("exact", 0.2, 0.5, 1e-4)
    assert not layer.training
    torch.testing.assert_close(layer.gain, torch.ones(4))
    torch.testing.assert_close(layer.bias, torch.zeros(4))
    assert not layer.gain.requires_grad and not layer.bias.requires_grad and layer.weight.requires_grad


def test_channels_last_weight_keeps_its_memory_format():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    layer = convert_quietly(model)[0]
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)


def test_inplace_false_leaves_the_original_untouched(resnet):
    before = copy.deepcopy(resnet.state_dict())
    converted = convert_quietly(resnet)
    assert converted is not resnet
    assert type(resnet.stem) is nn.Conv2d and type(resnet.stem_bn) is nn.BatchNorm2d
    assert resnet.state_dict().keys() == before.keys()
    for key, value in resnet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_inplace_true_converts_the_model_itself(resnet):
    converted = convert_quietly(resnet, inplace=True)
    assert converted is resnet
    assert type(resnet.stem) is EquiNormConv2d and type(resnet.stem_bn) is nn.Identity


def test_converting_twice_changes_nothing(resnet):
    once = convert_quietly(resnet)
    twice = convert_quietly(once)
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(model=nn.Conv2d), TypeError, "torch.nn.Module"),
        (dict(inplace=1), TypeError, "inplace must be True or False"),
        (dict(strict="yes"), TypeError, "strict must be True or False"),
        (dict(momentum="bn"), ValueError, "momentum must be"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(mode="fast"), ValueError, "mode must be one of"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(stats_fraction=0.0), ValueError, "stats_fraction"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, match):
    arguments = dict(model=nn.Sequential(nn.ReLU()))  # no pair: options are checked up front anyway
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        convert(arguments.pop("model"), **arguments)


def test_a_module_held_under_two_names_is_replaced_under_both():
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.same_conv, self.same_bn = self.conv, self.bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.same_bn(self.same_conv(x))

    converted = convert_quietly(Aliased())
    assert type(converted.same_conv) is EquiNormConv2d and converted.same_conv is converted.conv
    assert type(converted.same_bn) is nn.Identity and converted.same_bn is converted.bn


def test_a_batchnorm_without_running_statistics_is_left_in_place_with_the_reason():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
    )
    converted, messages = convert_warnings(model)
    assert type(converted[1]) is nn.BatchNorm2d and isinstance(converted[3], EquiNormLayer)
    assert len(messages) == 1 and "track_running_stats=False" in messages[0] and "`1`" in messages[0]
