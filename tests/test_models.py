"""equinorm_kernels.models: shapes, the schemes' initial properties, training, ENorm and convert."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd.functional import jacobian
from torch.nn.modules.batchnorm import _BatchNorm

from equinorm_kernels import ENorm, EquiNormConv2d, EquiNormLinear, convert
from equinorm_kernels.layers import EquiNormLayer
from equinorm_kernels.models import NORMS, SCHEMES, CifarResNet, ResidualMLP, build_model

NUM_CLASSES = 3
COMBINATIONS = [(norm, scheme) for norm in NORMS for scheme in SCHEMES if scheme != "fixup" or norm == "none"]
IMAGE = (3, 5, 7)  # odd sizes: the stride-2 stages round up


def small_model(arch: str, in_shape: tuple[int, ...] = IMAGE, **options: object) -> nn.Module:
    sizes = {"width": 8} if arch == "resnet" else {"hidden": 8}
    return build_model(arch, in_shape, NUM_CLASSES, **{**sizes, **options})


def weight_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def block_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input each residual block sees in ``model(x)``, in order."""
    inputs: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


class EquiNormLeafTracer(fx.Tracer):
    """EquiNorm layers need concrete input shapes, so they are traced as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, EquiNormLayer) or super().is_leaf_module(module, qualified_name)


# --- shapes, forward and backward, tracing ----------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
@pytest.mark.parametrize(("norm", "scheme"), COMBINATIONS)
def test_forward_backward_every_combination(arch: str, norm: str, scheme: str) -> None:
    torch.manual_seed(0)
    model = small_model(arch, norm=norm, scheme=scheme)
    x = torch.rand(2, *IMAGE)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.head.weight.grad.abs().sum() > 0
    assert (model.norm, model.scheme) == (norm, scheme)
    assert isinstance(model.blocks, nn.Sequential) and isinstance(model.head, nn.Linear)


@pytest.mark.parametrize("arch", ["resnet", "mlp"])
@pytest.mark.parametrize(("norm", "scheme"), COMBINATIONS)
def test_fx_traceable(arch: str, norm: str, scheme: str) -> None:
    torch.manual_seed(0)
    model = small_model(arch, norm=norm, scheme=scheme).eval()
    if norm == "equinorm":
        traced = fx.GraphModule(model, EquiNormLeafTracer().trace(model))
    else:
        traced = fx.symbolic_trace(model)
    x = torch.rand(2, *IMAGE)
    torch.testing.assert_close(traced(x), model(x))


def test_layer_types_per_norm() -> None:
    equinorm = CifarResNet(8, 8, norm="equinorm")
    body = weight_layers(equinorm.stem) + weight_layers(equinorm.blocks)
    assert all(isinstance(layer, EquiNormConv2d) for layer in body)
    assert type(equinorm.head) is nn.Linear
    assert all(isinstance(layer, EquiNormLinear) for layer in weight_layers(ResidualMLP(6, 2, norm="equinorm").blocks))
    batch = CifarResNet(8, 8, norm="batch")
    assert all(layer.bias is None for layer in weight_layers(batch.blocks))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 1 + 2 * 3 + 2  # stem, branches, projections
    assert all(layer.bias is not None for layer in weight_layers(CifarResNet(8, 8, norm="none").blocks))
    group = CifarResNet(8, 12, norm="group", group_norm_groups=8)
    assert group.stem.norm.num_groups == 6  # the largest divisor of 12 that is <= 8
    assert group.blocks[1].norm1.num_groups == 8


def test_build_model() -> None:
    resnet = build_model("resnet", (1, 4, 4), 10, depth=14, width=4, norm="group")
    assert isinstance(resnet, CifarResNet) and len(resnet.blocks) == 6 and resnet.stem.layer.in_channels == 1
    assert resnet(torch.rand(2, 1, 4, 4)).shape == (2, 10)
    mlp = build_model("mlp", (2, 3, 4), 5, hidden=6, blocks=3)
    assert isinstance(mlp, ResidualMLP) and mlp.stem.layer.in_features == 24 and len(mlp.blocks) == 3
    assert mlp(torch.rand(2, 2, 3, 4)).shape == (2, 5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CifarResNet(norm="layer"), r"norm must be one of \('batch', 'group', 'equinorm', 'none'\)"),
        (
            lambda: ResidualMLP(4, 2, scheme="lsuv"),
            r"scheme must be one of \('standard', 'skipinit', 'fixup', 'risotto'\), got 'lsuv'",
        ),
        (lambda: CifarResNet(depth=10), "depth must be 6n \\+ 2"),
        (lambda: CifarResNet(depth=2), "depth must be 6n \\+ 2"),
        (lambda: CifarResNet(width=15, scheme="risotto"), "even width"),
        (lambda: ResidualMLP(4, 2, hidden=7, scheme="risotto"), "even hidden"),
        (lambda: CifarResNet(width=0), "width must be a positive int"),
        (lambda: ResidualMLP(4, 2, blocks=0), "blocks must be a positive int"),
        (lambda: CifarResNet(group_norm_groups=0), "group_norm_groups must be a positive int"),
        (lambda: build_model("vit", (3, 8, 8), 10), r"arch must be one of \('resnet', 'mlp'\)"),
        (lambda: build_model("resnet", (3, 3, 8), 10), "H, W >= 4"),
        (lambda: build_model("resnet", (8, 8), 10), "H, W >= 4"),
    ],
)
def test_bad_options(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("norm", ["batch", "group", "equinorm"])
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_fixup_needs_norm_none(arch: str, norm: str) -> None:
    with pytest.raises(ValueError, match="normalization-free") as info:
        small_model(arch, norm=norm, scheme="fixup")
    assert "norm='none'" in str(info.value) and "stay zero" in str(info.value)


# --- SkipInit and Fixup at init ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
@pytest.mark.parametrize(("norm", "scheme"), [("none", "skipinit"), ("batch", "skipinit"), ("none", "fixup")])
def test_blocks_start_as_skip(arch: str, norm: str, scheme: str) -> None:
    torch.manual_seed(0)
    in_shape = (3, 8, 8) if arch == "resnet" else (6,)
    model = small_model(arch, in_shape, norm=norm, scheme=scheme, **({"depth": 14} if arch == "resnet" else {}))
    x = torch.rand(4, *in_shape)
    identities = downsamplings = 0
    for block, block_input in zip(model.blocks, block_inputs(model, x)):
        # A generic non-negative input, not only what the stem happens to produce.
        probe = F.relu(torch.randn_like(block_input))
        with torch.no_grad():
            if isinstance(block.shortcut, nn.Identity):
                assert torch.equal(block(probe), probe)
                identities += 1
            else:
                torch.testing.assert_close(block(probe), F.relu(block.shortcut(probe)), rtol=0, atol=0)
                downsamplings += 1
    assert identities >= 2 and (arch == "mlp" or downsamplings == 2)
    assert torch.equal(model(x), torch.zeros(4, NUM_CLASSES))
    assert not model.head.weight.any() and not model.head.bias.any()


def test_fixup_branch_scaling() -> None:
    torch.manual_seed(0)
    resnet = CifarResNet(depth=14, width=32, norm="none", scheme="fixup")
    num_blocks = len(resnet.blocks)
    assert num_blocks == 6
    for block in resnet.blocks:
        weight = block.layer1.weight
        he = math.sqrt(2.0 / (weight.shape[0] * 9))  # fan_out of a 3x3 conv
        assert weight.std().item() == pytest.approx(he * num_blocks**-0.5, rel=0.04)
        assert weight.mean().abs().item() < 0.05 * weight.std().item()
        assert not block.layer2.weight.any() and block.layer2.bias is None
    mlp = ResidualMLP(10, 4, hidden=256, blocks=4, norm="none", scheme="fixup")
    for block in mlp.blocks:
        assert block.layer1.weight.std().item() == pytest.approx(math.sqrt(2.0 / 256) * 4**-0.5, rel=0.03)
        assert not block.layer2.weight.any()


def test_fixup_scalars() -> None:
    model = CifarResNet(depth=14, width=4, norm="none", scheme="fixup")
    scalars = model.fixup_scalars()
    assert len(scalars) == 5 * 6 + 2  # four biases and a scale per block, the stem and head biases
    assert all(p.dim() == 0 and p.requires_grad for p in scalars)
    assert sorted(p.item() for p in scalars) == [0.0] * 26 + [1.0] * 6
    named = {id(p) for p in scalars}
    weights = {id(layer.weight) for layer in weight_layers(model)}
    assert not named & weights
    assert CifarResNet(8, 4, norm="none").fixup_scalars() == []
    assert ResidualMLP(4, 2, scheme="skipinit").fixup_scalars() == []
    assert len(ResidualMLP(4, 2, blocks=3, norm="none", scheme="fixup").fixup_scalars()) == 5 * 3 + 2


# --- RISOTTO ----------------------------------------------------------------------------------
def residual_part(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """z -> relu([z; -z]) -> blocks -> out, y = out[:, :n] - out[:, n:]."""
    out = model.blocks(F.relu(torch.cat([z, -z], dim=1)))
    half = out.shape[1] // 2
    return out[:, :half] - out[:, half:]


def residual_singular_values(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    model = model.double()
    z = z.double()
    matrix = jacobian(lambda t: residual_part(model, t), z)
    out_numel = matrix.numel() // z.numel()
    return torch.linalg.svdvals(matrix.reshape(out_numel, z.numel()))


RISOTTO_CASES = {
    # 4x4 inputs: stages of 4x4, 2x2 and 1x1 pixels, two stride-2 blocks.
    "resnet": (lambda scheme: CifarResNet(depth=14, width=8, norm="none", scheme=scheme), (1, 4, 4, 4)),
    "mlp": (lambda scheme: ResidualMLP(6, 3, hidden=8, blocks=3, norm="none", scheme=scheme), (1, 4)),
}


@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_risotto_residual_part_is_an_isometry(arch: str) -> None:
    build, z_shape = RISOTTO_CASES[arch]
    torch.manual_seed(0)
    z = torch.randn(z_shape)
    singular = residual_singular_values(build("risotto"), z)
    out_numel = residual_part(build("risotto").double(), z.double()).numel()
    assert singular.numel() == min(out_numel, z.numel())
    torch.testing.assert_close(singular, torch.ones_like(singular), rtol=0, atol=1e-4)
    standard = residual_singular_values(build("standard"), z)
    assert (standard - 1).abs().max() > 0.1


@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_risotto_residual_part_is_linear(arch: str) -> None:
    build, z_shape = RISOTTO_CASES[arch]
    torch.manual_seed(1)
    model = build("risotto").double()
    z1, z2 = torch.randn(z_shape, dtype=torch.float64), torch.randn(z_shape, dtype=torch.float64)
    with torch.no_grad():
        combined = residual_part(model, z1 - 2 * z2)
        torch.testing.assert_close(combined, residual_part(model, z1) - 2 * residual_part(model, z2))


def z_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four quarters of a looks-linear weight: top-left, top-right, bottom-left, bottom-right."""
    rows, cols = weight.shape[0] // 2, weight.shape[1] // 2
    return weight[:rows, :cols], weight[:rows, cols:], weight[rows:, :cols], weight[rows:, cols:]


def assert_orthonormal(matrix: torch.Tensor) -> None:
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), rtol=0, atol=1e-5)


def test_risotto_looks_linear_weights() -> None:
    torch.manual_seed(0)
    model = CifarResNet(depth=8, width=8, norm="none", scheme="risotto")
    stem = model.stem.layer.weight.detach()
    torch.testing.assert_close(stem[:4], -stem[4:], rtol=0, atol=0)
    assert not stem[:, :, [0, 2]].any() and not stem[:, :, :, [0, 2]].any()  # centre tap only
    assert_orthonormal(stem[:4, :, 1, 1])
    for block in model.blocks:
        first, second, skip = (layer.weight.detach() for layer in (block.layer1, block.layer2, block.shortcut.layer))
        for weight in (first, second, skip):
            top_left, top_right, bottom_left, bottom_right = z_blocks(weight)
            for quarter, sign in ((top_right, -1), (bottom_left, -1), (bottom_right, 1)):
                torch.testing.assert_close(quarter, sign * top_left, rtol=0, atol=0)
        stride = block.layer1.stride[0]
        patch = (slice(None), slice(None), slice(1, 1 + stride), slice(1, 1 + stride))
        first_patch = z_blocks(first)[0][patch]
        outside = first.clone()
        outside[patch] = 0
        assert not outside.any()
        second_z = z_blocks(second)[0][:, :, 1, 1]
        assert not z_blocks(second)[0][:, :, [0, 2]].any() and not z_blocks(second)[0][:, :, :, [0, 2]].any()
        assert_orthonormal(first_patch.reshape(first_patch.shape[0], -1))
        assert_orthonormal(second_z)
        expected_skip = torch.einsum("om,mikl->oikl", second_z, first_patch)
        torch.testing.assert_close(z_blocks(skip)[0], expected_skip, rtol=0, atol=1e-6)
        assert block.alpha.scale.item() == block.beta.scale.item() == 0.5
        assert all(not layer.bias.any() for layer in (block.layer1, block.layer2, block.shortcut.layer))
    head = model.head.weight.detach()
    torch.testing.assert_close(head[:, :16], -head[:, 16:], rtol=0, atol=0)
    assert_orthonormal(head[:, :16])
    assert not model.head.bias.any()


# --- training, ENorm, convert -----------------------------------------------------------------
def synthetic_task(in_shape: tuple[int, ...], samples: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative inputs whose class is which third of the features is brightest."""
    labels = torch.arange(samples) % NUM_CLASSES
    x = torch.rand(samples, *in_shape) * 0.5
    flat = x.view(samples, -1)
    third = flat.shape[1] // NUM_CLASSES
    for i, label in enumerate(labels.tolist()):
        flat[i, label * third : (label + 1) * third] += 0.5
    return x, labels


@pytest.mark.parametrize("scheme", ["standard", "skipinit", "risotto"])
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_equinorm_models_train(arch: str, scheme: str) -> None:
    torch.manual_seed(0)
    in_shape = (3, 4, 4)
    x, y = synthetic_task(in_shape)
    model = small_model(arch, in_shape, norm="equinorm", scheme=scheme)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def full_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    before = full_loss()
    stem_before = model.stem.layer.weight.detach().clone()
    for step in range(40):
        batch = slice(2 * (step % 4), 2 * (step % 4) + 2)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    after = full_loss()
    assert math.isfinite(after) and after < 0.5 * before
    assert not torch.equal(model.stem.layer.weight, stem_before)  # the gradients reached the EquiNorm layers


@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_enorm_preserves_standard_models(arch: str) -> None:
    torch.manual_seed(0)
    model = small_model(arch, (3, 8, 8), norm="none", scheme="standard").double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    weights_before = [layer.weight.clone() for layer in weight_layers(model)]
    enorm = ENorm(model)
    assert len(enorm.groups) >= len(model.blocks)
    enorm.balance(tol=1e-8)
    torch.testing.assert_close(model(x), before, rtol=1e-9, atol=1e-9)
    assert any(not torch.allclose(w, layer.weight) for w, layer in zip(weights_before, weight_layers(model)))


@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_convert_batchnorm_models(arch: str) -> None:
    torch.manual_seed(0)
    model = small_model(arch, (3, 8, 8), norm="batch", scheme="standard")
    batchnorms = sum(isinstance(m, _BatchNorm) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert(model, strict=True)
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, EquiNormLayer) for m in converted.modules()) == batchnorms
    assert converted(torch.rand(2, 3, 8, 8)).shape == (2, NUM_CLASSES)


# --- EquiNorm options -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_equinorm_options_reach_every_equinorm_layer(arch):
    options = {"stats_fraction": 0.25, "mode": "exact", "momentum": 0.3}
    model = build_model(arch, (1, 8, 8), 10, norm="equinorm", equinorm_options=options)
    layers = [m for m in model.modules() if isinstance(m, EquiNormLayer)]
    assert layers
    for layer in layers:
        assert (layer.stats_fraction, layer.mode, layer.momentum) == (0.25, "exact", 0.3)


@pytest.mark.parametrize(
    "norm, options, match",
    [("batch", {"mode": "exact"}, "norm='equinorm'"), ("equinorm", {"gain": 2}, "unknown"), ("equinorm", [1], "dict")],
)
def test_equinorm_options_are_checked(norm, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_model("mlp", (1, 8, 8), 10, norm=norm, equinorm_options=options)
