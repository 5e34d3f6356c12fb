"""convert() on models whose convs read signed values, and on norm layers with their activation inside.

The structures of the torchvision and timm models that need them, built here so the suite runs
without either library: inverted residuals with linear bottlenecks (MobileNetV2/V3, EfficientNet),
channel shuffle (ShuffleNetV2), squeeze-excitation, dense blocks (DenseNet), and a BatchNorm2d
subclass with its activation inside (timm's BatchNormAct2d). For each, the statistic every layer
should get is written out from the structure, and the converted model trains a few SGD steps and
evaluates with finite results. When torchvision or timm is importable, their classification models
are swept too.
"""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equinorm_kernels as ek
from equinorm_kernels import ConversionReport
from equinorm_kernels.layers import EquiNormLayer


# --- the structures ---------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d with dropout and an activation applied after normalising, as timm's."""

    def __init__(self, channels: int, act: nn.Module | None = None, drop: float = 0.0) -> None:
        super().__init__(channels)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(self.drop(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, linear 1x1 projection."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu6(self.expand_bn(self.expand(x)))
        y = nn.functional.relu6(self.depthwise_bn(self.depthwise(y)))
        return x + self.project_bn(self.project(y))  # linear bottleneck: signed


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_act = nn.ReLU6()
        self.block1 = InvertedResidual(8)
        self.block2 = InvertedResidual(8)
        self.head = nn.Conv2d(8, 16, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem_act(self.stem_bn(self.stem(x)))))
        x = F.relu(self.head_bn(self.head(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


MOBILENET_STATISTICS = {
    "stem": "abs_mean",  # the model input (signed unless the caller says otherwise)
    "block1.expand": "mean",  # ReLU6 output
    "block1.depthwise": "mean",
    "block1.project": "mean",
    "block2.expand": "abs_mean",  # x + linear bottleneck
    "block2.depthwise": "mean",
    "block2.project": "mean",
    "head": "abs_mean",
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split, branch (1x1 + ReLU, depthwise 3x3 without activation, 1x1 + ReLU), concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        kept, processed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((kept, self.branch(processed)), dim=1), 2)


class ShuffleNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.unit1 = ShuffleUnit(8)
        self.unit2 = ShuffleUnit(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.unit2(self.unit1(self.pool(self.stem(x))))
        return self.fc(x.mean((2, 3)))


SHUFFLENET_STATISTICS = {
    "stem.0": "mean",  # with input_non_negative=True
    "unit1.branch.0": "mean",  # a chunk of a max-pooled ReLU output
    "unit1.branch.3": "mean",
    "unit1.branch.5": "abs_mean",  # the depthwise conv's BatchNorm has no activation
    "unit2.branch.0": "mean",  # concat of ReLU outputs, shuffled, chunked
    "unit2.branch.3": "mean",
    "unit2.branch.5": "abs_mean",
}


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(scale))))
        return x * scale


class EfficientBlock(nn.Module):
    """timm-style depthwise-separable block: norm layers with their activation inside, SE, drop path."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = BatchNormAct2d(channels, act(), drop=0.1)
        self.se = SqueezeExcite(channels, 4)
        self.conv_pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = BatchNormAct2d(channels)  # no activation: a linear bottleneck

    def forward(self, x):
        return x + self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))


class EfficientNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8, nn.ReLU())
        self.block_relu = EfficientBlock(8, nn.ReLU)
        self.block_silu = EfficientBlock(8, nn.SiLU)
        self.conv_head = nn.Conv2d(8, 12, 1, bias=False)
        self.bn2 = BatchNormAct2d(12, nn.Hardswish())
        self.classifier = nn.Linear(12, 3)

    def forward(self, x):
        x = self.block_silu(self.block_relu(self.bn1(self.conv_stem(x))))
        return self.classifier(self.bn2(self.conv_head(x)).mean((2, 3)))


EFFICIENTNET_STATISTICS = {
    "conv_stem": "abs_mean",
    "block_relu.conv_dw": "mean",  # bn1's ReLU inside the norm layer
    "block_relu.conv_pw": "mean",  # ReLU output times a sigmoid (SE)
    "block_silu.conv_dw": "abs_mean",  # x + linear bottleneck
    "block_silu.conv_pw": "abs_mean",  # SiLU output (signed) times a sigmoid
    "conv_head": "abs_mean",
}


class DenseLayer(nn.Module):
    """DenseNet's pre-activation layer: BN-ReLU-Conv 1x1, BN-ReLU-Conv 3x3, concatenated onto the input."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        out = self.conv1(F.relu(self.norm1(features)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([features, out], 1)


class DenseNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.layer1 = DenseLayer(8, 4)
        self.layer2 = DenseLayer(12, 4)
        self.norm5 = nn.BatchNorm2d(16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm0(self.conv0(x))), 2)
        x = F.relu(self.norm5(self.layer2(self.layer1(x))))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


DENSENET_STATISTICS = {
    "conv0": "abs_mean",
    "layer1.conv1": "mean",  # ReLU(norm1(...)): norm1 itself stays (its input is a concatenation)
    "layer2.conv1": "mean",
}
DENSENET_LEFT = {"layer1.norm1", "layer2.norm1", "layer1.norm2", "layer2.norm2", "norm5"}


CASES = {
    "mobilenet": (MobileNetLike, MOBILENET_STATISTICS, False),
    "shufflenet": (ShuffleNetLike, SHUFFLENET_STATISTICS, True),
    "efficientnet": (EfficientNetLike, EFFICIENTNET_STATISTICS, False),
    "densenet": (DenseNetLike, DENSENET_STATISTICS, False),
}


def _converted_statistics(model: nn.Module) -> dict[str, str]:
    return {name: m.statistic for name, m in model.named_modules() if isinstance(m, EquiNormLayer)}


def _train_and_evaluate(model: nn.Module, x: torch.Tensor, classes: int, steps: int = 3) -> None:
    target = torch.arange(x.shape[0]) % classes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), target)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# --- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_statistics_follow_the_graph_and_the_model_trains(name):
    model_class, expected, input_non_negative = CASES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # densenet's pre-activation norms are listed as left in place
        converted, report = ek.convert(model_class(), input_non_negative=input_non_negative, return_report=True)
    assert _converted_statistics(converted) == expected
    assert isinstance(report, ConversionReport)
    assert {item.conv: item.statistic for item in report.converted} == expected
    x = torch.randn(4, 3, 8, 8)
    if input_non_negative:
        x = x.abs()
    _train_and_evaluate(converted, x, classes=converted.classifier.out_features if hasattr(converted, "classifier")
                        else converted.fc.out_features)


def test_linear_bottleneck_model_fails_with_the_mean_statistic_and_trains_with_auto():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)  # non-negative pixels: the stem is fine, block2.expand is not
    model = MobileNetLike()
    with torch.no_grad():
        model.block1.project_bn.bias.fill_(-10.0)  # a linear bottleneck with a negative mean
    forced = ek.convert(model, statistic="mean")
    assert set(_converted_statistics(forced).values()) == {"mean"}
    with pytest.raises(ValueError, match=r'non-negative.*statistic="abs_mean"'):
        forced(x)
    _train_and_evaluate(ek.convert(model), x, classes=5)


def test_norm_with_activation_keeps_its_activation_and_drop():
    torch.manual_seed(0)
    model = EfficientNetLike()
    converted = ek.convert(model)
    assert isinstance(converted.bn1, nn.ReLU)
    kept = converted.block_relu.bn1
    assert isinstance(kept, nn.Sequential) and isinstance(kept[0], nn.Dropout) and isinstance(kept[1], nn.ReLU)
    assert kept[0].p == 0.1
    assert isinstance(converted.block_silu.bn2, nn.Identity)  # no activation, no drop
    assert isinstance(converted.bn2, nn.Hardswish)
    # The affine moved into the layer, and what the norm applied after it still runs after the conv.
    converted.eval()
    stem_out = converted.conv_stem(torch.rand(2, 3, 8, 8))
    assert torch.equal(converted.bn1(stem_out), F.relu(stem_out))


def test_report_lists_converted_and_left_layers():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = ek.convert(DenseNetLike(), return_report=True)
    left = {item.where.split("`")[1] for item in report.left_in_place}
    assert left == DENSENET_LEFT - {"layer1.norm2", "layer2.norm2"}
    assert {item.norm for item in report.converted} == {"norm0", "layer1.norm2", "layer2.norm2"}
    text = str(report)
    assert "converted 3 layer(s), left 3 in place" in text
    assert "layer1.conv1 + layer1.norm2 -> EquiNormConv2d(statistic='mean')" in text
    assert "conv0 + norm0 -> EquiNormConv2d(statistic='abs_mean')" in text
    assert any("layer1.norm1" in str(w.message) for w in caught)  # still warned about


def test_model_input_counts_as_signed_unless_declared_non_negative():
    for declared, expected in ((False, "abs_mean"), (True, "mean")):
        model = ek.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), input_non_negative=declared)
        assert model[0].statistic == expected


@pytest.mark.parametrize(
    "between, expected",
    [
        (nn.ReLU(), "mean"),
        (nn.ReLU6(), "mean"),
        (nn.Hardtanh(0.0, 2.0), "mean"),
        (nn.Hardtanh(-1.0, 1.0), "abs_mean"),
        (nn.Sigmoid(), "mean"),
        (nn.Softmax(dim=1), "mean"),
        (nn.Sequential(nn.ReLU(), nn.AvgPool2d(1), nn.Dropout(0.1), nn.Identity()), "mean"),
        (nn.SiLU(), "abs_mean"),
        (nn.Hardswish(), "abs_mean"),
        (nn.LeakyReLU(), "abs_mean"),
        (nn.Tanh(), "abs_mean"),
        (nn.Identity(), "abs_mean"),
    ],
)
def test_activation_rules(between, expected):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), between, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert ek.convert(model)[3].statistic == expected


class _Functional(nn.Module):
    def __init__(self, combine) -> None:
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.combine = combine

    def forward(self, x):
        return self.bn(self.conv(self.combine(self.a_bn(self.a(x)))))


@pytest.mark.parametrize(
    "combine, expected",
    [
        (lambda y: F.relu(y) + F.relu(-y), "mean"),
        (lambda y: F.relu(y) - F.relu(-y), "abs_mean"),  # subtraction is not covered
        (lambda y: F.relu(y) * 2.0, "mean"),
        (lambda y: F.relu(y) * -2.0, "abs_mean"),
        (lambda y: torch.add(F.relu(y), F.relu(y), alpha=-1), "abs_mean"),
        (lambda y: y.clamp(min=0), "mean"),
        (lambda y: y.clamp(min=-1), "abs_mean"),
        (lambda y: F.hardtanh(y, 0.0, 6.0), "mean"),
        (lambda y: torch.sigmoid(y) * y.relu(), "mean"),
        (lambda y: F.max_pool2d(y.relu(), 1) / 3.0, "mean"),
        (lambda y: y.relu().view(y.shape[0], 4, -1).view(y.shape), "mean"),
        (lambda y: y.abs(), "mean"),
        (lambda y: y, "abs_mean"),
    ],
)
def test_function_rules(combine, expected):
    assert ek.convert(_Functional(combine)).conv.statistic == expected


class _Untraceable(nn.Module):
    """Python control flow on a tensor value around a traceable child."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.body(x)
        return self.bn(x) if x.sum() > 0 else x


def test_untraceable_parent_converts_its_traceable_children_with_a_safe_statistic():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = ek.convert(_Untraceable(), return_report=True, input_non_negative=True)
    assert isinstance(model.body[0], ek.EquiNormConv2d) and model.body[0].statistic == "abs_mean"
    assert isinstance(model.body[3], ek.EquiNormConv2d) and model.body[3].statistic == "mean"
    assert type(model.bn) is nn.BatchNorm2d
    assert [item.where for item in report.left_in_place] == ["`bn` (BatchNorm2d)"]
    assert "could not trace _Untraceable" in report.left_in_place[0].reason
    assert caught


def test_bad_convert_statistic_is_a_clear_error():
    with pytest.raises(ValueError, match=r'statistic must be "auto".*\'median\''):
        ek.convert(MobileNetLike(), statistic="median")
    with pytest.raises(TypeError, match="input_non_negative must be True or False"):
        ek.convert(MobileNetLike(), input_non_negative=1)


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) + x


class ConvMixerLike(nn.Module):
    """ConvMixer's norm after the activation: patch conv -> GELU -> BatchNorm, then residual
    depthwise conv -> GELU -> BatchNorm and pointwise conv -> GELU -> BatchNorm."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 2, stride=2), nn.GELU(), nn.BatchNorm2d(dim))
        self.mix = _Residual(nn.Sequential(nn.Conv2d(dim, dim, 3, groups=dim, padding="same"), nn.GELU(), nn.BatchNorm2d(dim)))
        self.pointwise, self.bn = nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.bn(F.gelu(self.pointwise(self.mix(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def test_norm_after_an_activation_normalises_the_conv_and_keeps_the_affine_after_it():
    torch.manual_seed(0)
    model = ConvMixerLike()
    with torch.no_grad():
        for bn in (model.stem[2], model.mix.body[2], model.bn):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    converted, report = ek.convert(model, return_report=True)
    assert not report.left_in_place
    assert {item.conv: item.activation_before_norm for item in report.converted} == {
        "stem.0": "`stem.1` (GELU)", "mix.body.0": "`mix.body.1` (GELU)", "pointwise": "torch._C._nn.gelu(...)",
    }
    for conv, act, norm, bn in (("stem.0", "stem.1", "stem.2", model.stem[2]),
                                ("mix.body.0", "mix.body.1", "mix.body.2", model.mix.body[2]), ("pointwise", None, "bn", model.bn)):
        layer, affine = converted.get_submodule(conv), converted.get_submodule(norm)
        assert isinstance(layer, ek.EquiNormConv2d)
        assert torch.equal(layer.gain, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
        assert isinstance(affine, ek.ChannelAffine)
        assert torch.equal(affine.weight, bn.weight) and torch.equal(affine.bias, bn.bias)
        if act is not None:
            assert isinstance(converted.get_submodule(act), nn.GELU)
    assert "the norm read `stem.1` (GELU)'s output: its affine stays after it" in str(report)
    # What the converted stem computes, written out: EquiNorm's conv, the GELU, then the affine.
    x = torch.randn(4, 3, 8, 8)
    stem = converted.stem
    expected = F.gelu(stem[0](x)) * model.stem[2].weight.view(1, -1, 1, 1) + model.stem[2].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(stem(x), expected)
    _train_and_evaluate(converted, x, classes=5)


def test_activation_output_used_elsewhere_is_not_a_pair():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.bn = nn.Conv2d(3, 4, 3), nn.SiLU(), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.act(self.conv(x))
            return self.bn(y) + y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = ek.convert(Branching(), return_report=True)
    assert not report.converted and type(converted.bn) is nn.BatchNorm2d
    assert "its input is `act` (SiLU)" in report.left_in_place[0].reason


def test_channel_affine_checks_its_input_and_arguments():
    affine = ek.ChannelAffine(3)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        affine.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(affine(x), torch.stack([x[:, 0], -2.0 * x[:, 1] + 1.0, 0.5 * x[:, 2] - 1.0], dim=1))
    with pytest.raises(ValueError, match=r"ChannelAffine expects an input of shape \(N, 3, \*\), got \(2, 4\)"):
        affine(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        ek.ChannelAffine(0)


# --- the real model zoos, where installed (the torch 2.14.1 CI environment) ------------------
# timm has over a thousand models, most of them without BatchNorm or too large for a CPU test. By
# default: TIMM_MODELS, the common families built on BatchNorm (BatchNormAct2d included), and
# TIMM_MODULE_MODELS, the smallest model with BatchNorm of every other architecture module of timm
# 1.0.31, so each model file's way of using BatchNorm is met once. EQUINORM_KERNELS_ZOO=all sweeps
# every model.
TIMM_MODELS = (
    "efficientnet_b0", "tf_efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv3_small_100", "regnety_002", "regnetx_002", "densenet121", "cspresnet50", "cspdarknet53",
    "rexnet_100", "resnet18", "resnet50d", "resnext26ts", "mnasnet_100", "spnasnet_100", "fbnetc_100",
    "ghostnet_100", "lcnet_050", "hardcorenas_a", "tinynet_a", "mixnet_s", "dla34", "dpn68", "selecsls42b",
    "gernet_s", "repvgg_a2", "ese_vovnet19b_dw", "res2net50_26w_4s", "skresnet18", "hrnet_w18_small",
    "xception41", "inception_v3", "semnasnet_100", "mobileone_s0", "fastvit_t8",
)
TIMM_MODULE_MODELS = (
    "convmixer_768_32", "cpubone_nano", "cspnext_tiny", "efficientformer_l1", "efficientformerv2_s0",
    "efficientvim_m1", "efficientvit_b0", "efficientvit_m0", "fasternet_t0", "halonet_h1", "hgnetv2_b0",
    "iformer_t", "inception_next_atto", "inception_resnet_v2", "inception_v4", "lcnetv2_small",
    "legacy_seresnet18", "legacy_xception", "levit_128s", "lowformer_b0", "mobilevit_xxs", "nasnetalarge",
    "nextvit_small", "pnasnet5large", "repghostnet_050", "repvit_m1", "resnest14d", "resnetv2_18", "shvit_s1",
    "starnet_s050", "swiftformer_xs", "test_coatnet", "tiny_vit_5m_224", "tresnet_m", "vgg11_bn",
    "visformer_tiny", "vit_small_resnet50d_s16_224", "volo_d1_224", "xcit_nano_12_p8_224",
)
# Every torchvision model with BatchNorm is below this but regnet_y_128gf (644 M parameters, 14 GB of
# memory and minutes per step on a CPU).
MAX_ZOO_PARAMETERS = 200_000_000


def _zoo_models():
    import os

    everything = os.environ.get("EQUINORM_KERNELS_ZOO") == "all"
    params = []
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            params.append(pytest.param("torchvision", name, id=f"torchvision-{name}"))
    if importlib.util.find_spec("timm") is not None:
        import timm

        available = set(timm.list_models())
        chosen = TIMM_MODELS + TIMM_MODULE_MODELS
        names = sorted(available) if everything else [name for name in chosen if name in available]
        params += [pytest.param("timm", name, id=f"timm-{name}") for name in names]
    return params or [pytest.param(None, None, marks=pytest.mark.skip(reason="neither torchvision nor timm is installed"))]


def _build_zoo_model(library: str, name: str) -> nn.Module:
    if library == "torchvision":
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


def _zoo_input_size(library: str, name: str, model: nn.Module) -> int:
    if "inception" in name:
        return 299
    if library == "torchvision" and name.startswith("maxvit"):
        return 224  # its 7 x 7 attention windows tile the feature maps of a 224 x 224 input only
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if library == "timm" and config.get("fixed_input_size"):
        return config["input_size"][-1]
    # Attention over fixed-size blocks (halonet's 8 x 8 halos, for example) needs its minimum input.
    return max(64, config.get("min_input_size", (0,))[-1])


@pytest.mark.parametrize("library, name", _zoo_models())
def test_zoo_model_with_batchnorm_converts_trains_and_evaluates(library, name):
    torch.manual_seed(0)
    try:
        model = _build_zoo_model(library, name)
    except Exception as error:  # a model that needs arguments or weights of its own
        pytest.skip(f"cannot build {name}: {type(error).__name__}: {error}")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        pytest.skip("no BatchNorm")
    if sum(p.numel() for p in model.parameters()) > MAX_ZOO_PARAMETERS:
        pytest.skip("too large for a CPU test")
    size = _zoo_input_size(library, name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = ek.convert(model, return_report=True)
    assert report.converted, str(report)
    _train_and_evaluate(converted, torch.randn(2, 3, size, size), classes=10, steps=2)
