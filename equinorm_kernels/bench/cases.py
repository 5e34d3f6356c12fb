"""The benchmark cases and the providers that run them.

A :class:`Case` is one measurement setting (a family, such as the channel statistics, and one
shape). ``case.build(context)`` allocates its tensors on the context's device and returns one
factory per provider; a factory returns a :class:`Provider` whose ``run`` is the timed call.
Providers of one case compute the same thing unless they are marked not comparable (the plain
convolution and norm-layer baselines), so the runner checks them against the reference before
timing them.

Providers:
    <backend>            every fused backend for the device (available_backends minus "reference")
    reference            the pure-PyTorch reference, eager (backend="reference")
    reference_compiled   torch.compile of the reference, compiled once per case (static shapes)
    conv2d, conv2d_batchnorm, conv2d_groupnorm, stdconv2d    whole-layer baselines
    torch_sum            the plain read that sets the bandwidth ceiling (of the run; and of each
                         channel_mean case, on its own input)
    channel_mean         the fused channel_mean of the same input, timed beside tap_mean (not comparable)
    foreach_mul          every parameter multiplied in place (torch._foreach_mul_): one read and one
                         write of each, the least traffic any ENorm cycle can make (a floor, not comparable)
    batchnorm, groupnorm, equinorm, none (and each with _compiled: torch.compile of the model)
                         the model cases: one network in each norm, compared by ratios of medians to
                         the batchnorm and none providers of the same mode (eager or compiled)
    conv2d, conv2d_batchnorm, batchnorm2d, equinorm    the host-time case: one call of each layer

Bytes moved (for GB/s) are the least traffic the operation needs, defined per family in
:data:`FAMILIES`; 4 bytes per fp32 element.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from .. import functional
from ..enorm import ENorm
from ..layers import EquiNormConv2d
from .. import _tap_geometry as tap_geometry
from ..reference import equinorm as reference_math
from ..models import CifarResNet
from ..reference import tap_statistics as reference_taps
from .networks import ImageNetResNet, ImageNetResNet18, StdConv2d, parameter_count, residual_mlp

REFERENCE = "reference"
COMPILED_REFERENCE = "reference_compiled"
READ = "torch_sum"
PARAMETER_PASS = "foreach_mul"
CHANNEL_MEAN = "channel_mean"
BASELINES = ("conv2d", "conv2d_batchnorm", "conv2d_groupnorm", "stdconv2d")
MAX_GROUP_NORM_GROUPS = 32
FLOAT32_BYTES = 4
MIB = 2**20

FAMILIES: dict[str, str] = {
    "read_ceiling": "plain read, torch.sum of a large fp32 tensor: the bandwidth ceiling (bytes: the tensor)",
    "channel_mean": "channel statistics alone, channel_mean(x) (bytes: x read once)",
    "tap_mean": "per-tap input means, tap_mean(x, k, stride, padding=k // 2) of a ResNet conv input, beside "
    "channel_mean of the same x (bytes: x read once)",
    "weight_forward": "weight transform forward, equinorm_weight(w, mean, gain=g) (bytes: w read, w'' written)",
    "weight_backward": "weight transform backward alone, grads of w, mean, gain (bytes: dL/dw'' and w read, dL/dw written)",
    "weight_forward_backward": "weight transform forward + backward (bytes: both of the above)",
    "stats_weight_forward_backward": "statistics + weight transform, equinorm_forward(x, w, gain=g), forward + "
    "backward of sum(w'' * G) into x, w and gain (bytes: x read once + weight forward + backward)",
    "layer_train": "whole-layer training step: y = layer(x), grads of sum(y * G) into x and every parameter",
    "layer_eval": "whole-layer eval forward under no_grad (EquiNorm: weight from the running mean)",
    "enorm_cycle": "one ENorm cycle (sequential schedule, p = 2) in place (bytes: parameters read and written once)",
    "enorm_balance": "ENorm cycles until max |d - 1| <= tol, from the same initial weights every repetition",
    "model_train": "whole-model training step (forward, cross-entropy, backward, SGD with momentum) in every norm, "
    "eager and torch.compile; ratios are speedups over the batchnorm and none models of the same mode",
    "model_eval": "whole-model eval forward under no_grad in every norm, eager and torch.compile; ratios as model_train",
    "layer_host": "host time of one layer call at a tiny shape (forward + backward into x and every parameter): "
    "EquiNormConv2d against Conv2d, BatchNorm2d and Conv2d + BatchNorm2d",
}

# The op options every EquiNorm case uses: a stride-1 "same" conv (ratio 1), the default mode.
RATIO = 1.0
MODE = "single_pass"


@dataclass(frozen=True)
class LayerShape:
    """A convolution of a ResNet: channels in and out, input size (square), kernel (square)."""

    in_channels: int
    out_channels: int
    size: int
    kernel: int

    @property
    def label(self) -> str:
        channels = f"{self.in_channels}ch" if self.in_channels == self.out_channels else f"{self.in_channels}->{self.out_channels}"
        return f"{channels} {self.size}x{self.size} {self.kernel}x{self.kernel}"

    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, self.kernel, self.kernel)

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.size, self.size)

    def weight_numel(self) -> int:
        return math.prod(self.weight_shape())


# ResNet-18/50 convolutions at 224x224 input.
RESNET_LAYER_SHAPES = (
    LayerShape(64, 64, 56, 3),
    LayerShape(128, 128, 28, 3),
    LayerShape(256, 256, 14, 3),
    LayerShape(512, 2048, 7, 1),
    LayerShape(512, 512, 7, 3),
)
BATCH_SIZES = (1, 8, 32, 128)


@dataclass(frozen=True)
class BuildContext:
    """Where and how a case builds its providers."""

    device: torch.device
    fused_backends: tuple[str, ...]
    compile_reference: bool = True
    compile_backend: str = "inductor"
    channels_last: bool = False
    seed: int = 0


@dataclass
class Provider:
    """One way to run a case.

    Attributes:
        run: the timed call; returns what ``outputs`` turns into the tensors compared across providers.
        outputs: the tensors to compare with the reference's, from what ``run`` returned.
        restore: puts the state ``run`` changes back to where it started (untimed).
        restore_every_run: time every call right after a restore (else ``restore`` only serves the check).
        comparable: computes the same thing as the reference.
        details: facts about a run worth reporting (e.g. ENorm cycles), from what ``run`` returned.
    """

    run: Callable[[], object]
    outputs: Callable[[object], tuple[torch.Tensor, ...]] = field(default=lambda value: _as_tensors(value))
    restore: Callable[[], None] | None = None
    restore_every_run: bool = False
    comparable: bool = True
    details: Callable[[object], dict[str, object]] | None = None


ProviderFactory = Callable[[], Provider]


@dataclass(frozen=True)
class Target:
    """A performance goal stated for one case."""

    description: str
    min_speedup_over_reference: float | None = None
    min_speedup_over_compiled: float | None = None
    min_fraction_of_read_ceiling: float | None = None
    # Goals against other providers of the case, (baseline, least speedup); a "_compiled" provider
    # is held against the baseline's compiled form.
    min_speedup_over_baselines: tuple[tuple[str, float], ...] = ()
    # The providers the goals are for (None: every fused backend of the case).
    providers: tuple[str, ...] | None = None


# Which providers a case has: see Case.provider_names.
READ_PROVIDERS, EQUINORM_PROVIDERS, LAYER_PROVIDERS, ENORM_PROVIDERS = "read", "equinorm", "layer", "enorm"
MODEL_PROVIDERS, HOST_PROVIDERS = "model", "host"
COMPILED_SUFFIX = "_compiled"
MODEL_NORMS = {"batchnorm": "batch", "groupnorm": "group", "equinorm": "equinorm", "none": "none"}
HOST_LAYERS = ("conv2d", "batchnorm2d", "conv2d_batchnorm", "equinorm")


@dataclass(frozen=True)
class Case:
    """One benchmark setting; ``build(context)`` returns the provider factories in display order."""

    family: str
    label: str
    params: Mapping[str, object]
    build: Callable[[BuildContext], dict[str, ProviderFactory]]
    bytes_moved: int | None = None
    target: Target | None = None
    provider_set: str = EQUINORM_PROVIDERS
    # The providers the report's ratio columns divide by (None: the reference and its compiled form).
    ratio_baselines: tuple[str, ...] | None = None
    # CPU interleaved rounds for this case, instead of the run's (slow cases on a noisy machine want more).
    rounds: int | None = None
    # Whether the case also runs torch.compile'd providers (when the run compiles at all).
    compiled_providers: bool = True

    @property
    def id(self) -> str:
        return f"{self.family}/{self.label}"

    def provider_names(self, context: BuildContext) -> tuple[str, ...]:
        """The providers ``build(context)`` returns, known without allocating anything."""
        if self.provider_set == READ_PROVIDERS:
            return (READ,)
        if self.provider_set == MODEL_PROVIDERS:
            names = tuple(MODEL_NORMS)
            if context.compile_reference and self.compiled_providers:
                names += tuple(name + COMPILED_SUFFIX for name in MODEL_NORMS)
            return names
        if self.provider_set == HOST_PROVIDERS:
            return HOST_LAYERS
        names = [*context.fused_backends, REFERENCE]
        if self.provider_set != ENORM_PROVIDERS and context.compile_reference:
            names.append(COMPILED_REFERENCE)
        if self.provider_set == LAYER_PROVIDERS:
            names += BASELINES
        if self.family == "channel_mean":
            names.append(READ)
        if self.family == "tap_mean":
            names.append(CHANNEL_MEAN)
        if self.family == "enorm_cycle":
            names.append(PARAMETER_PASS)
        return tuple(names)


def _as_tensors(value: object) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(item for item in value if isinstance(item, torch.Tensor))
    return ()


# ---- the reference functions torch.compile sees (plain functions of tensors, no argument checks) ----

def reference_channel_mean(x: torch.Tensor) -> torch.Tensor:
    return reference_math.channel_mean_unchecked(x, 1.0)


def reference_weight(weight: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return reference_math.equinorm_weight_unchecked(weight, mean, RATIO, 1, MODE, gain, 1e-5)


def reference_statistics_and_weight(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = reference_channel_mean(x)
    return reference_weight(weight, mean, gain), mean


def compile_fresh(function: Callable, context: BuildContext) -> Callable:
    """torch.compile of ``function`` for this case alone: static shapes, caches of earlier cases dropped
    (so a case never runs a graph specialised for another, nor hits the recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(function, backend=context.compile_backend, dynamic=False)


# ---- tensors ----------------------------------------------------------------------------------

def _seed(context: BuildContext) -> None:
    """Every case draws its tensors from the same seed, so reruns time the same data."""
    torch.manual_seed(context.seed)


def _memory_format(tensor: torch.Tensor, context: BuildContext) -> torch.Tensor:
    if context.channels_last and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def activation(shape: Sequence[int], context: BuildContext, requires_grad: bool = False) -> torch.Tensor:
    """Non-negative input, as a ReLU output: uniform in [0, 1)."""
    x = _memory_format(torch.rand(*shape, device=context.device), context)
    return x.requires_grad_(requires_grad)


def conv_weight(shape: LayerShape, context: BuildContext, requires_grad: bool = False) -> torch.Tensor:
    fan_in = shape.in_channels * shape.kernel**2
    weight = torch.randn(*shape.weight_shape(), device=context.device) * math.sqrt(2.0 / fan_in)
    return _memory_format(weight, context).requires_grad_(requires_grad)


def channel_means(channels: int, context: BuildContext, requires_grad: bool = False) -> torch.Tensor:
    return (torch.rand(channels, device=context.device) + 0.05).requires_grad_(requires_grad)


def gains(channels: int, context: BuildContext, requires_grad: bool = False) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(channels, device=context.device)).requires_grad_(requires_grad)


# ---- provider sets --------------------------------------------------------------------------------

def equinorm_providers(
    context: BuildContext,
    public_run: Callable[[str], Provider],
    compiled_run: Callable[[], Provider],
) -> dict[str, ProviderFactory]:
    """Every fused backend and the eager reference through the public API, then the compiled reference."""
    factories: dict[str, ProviderFactory] = {name: partial(public_run, name) for name in context.fused_backends}
    factories[REFERENCE] = partial(public_run, REFERENCE)
    if context.compile_reference:
        factories[COMPILED_REFERENCE] = compiled_run
    return factories


# ---- read ceiling -------------------------------------------------------------------------------

def read_ceiling_case(mebibytes: int) -> Case:
    numel = mebibytes * MIB // FLOAT32_BYTES
    return Case(
        family="read_ceiling",
        label=f"{mebibytes} MiB",
        params={"numel": numel, "dtype": "float32", "op": "torch.sum(x)"},
        build=partial(_build_read_ceiling, numel),
        bytes_moved=numel * FLOAT32_BYTES,
        provider_set=READ_PROVIDERS,
    )


def _build_read_ceiling(numel: int, context: BuildContext) -> dict[str, ProviderFactory]:
    x = torch.rand(numel, device=context.device)
    return {READ: lambda: Provider(run=partial(torch.sum, x), comparable=False)}


# ---- channel statistics -----------------------------------------------------------------------

def channel_mean_case(shape: Sequence[int], target: Target | None = None) -> Case:
    numel = math.prod(shape)
    size = numel * FLOAT32_BYTES
    batch, channels, height, width = shape
    return Case(
        family="channel_mean",
        label=f"N{batch} {channels}ch {height}x{width} ({size / MIB:.1f} MiB)",
        params={"input_shape": list(shape), "dtype": "float32", "mebibytes": size / MIB},
        build=partial(_build_channel_mean, tuple(shape)),
        bytes_moved=size,
        target=target,
    )


def _build_channel_mean(shape: tuple[int, ...], context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    x = activation(shape, context)

    def public(backend: str) -> Provider:
        return Provider(run=partial(functional.channel_mean, x, backend=backend))

    def compiled() -> Provider:
        return Provider(run=partial(compile_fresh(reference_channel_mean, context), x))

    factories = equinorm_providers(context, public, compiled)
    factories[READ] = lambda: Provider(run=partial(torch.sum, x), comparable=False)
    return factories


# ---- per-tap statistics ----------------------------------------------------------------------

def tap_mean_case(
    shape: LayerShape, batch: int, stride: int = 1, target: Target | None = None, rounds: int | None = None
) -> Case:
    input_shape = shape.input_shape(batch)
    size = math.prod(input_shape) * FLOAT32_BYTES
    return Case(
        family="tap_mean",
        label=f"N{batch} {shape.in_channels}ch {shape.size}x{shape.size} {shape.kernel}x{shape.kernel} stride {stride}",
        params={"input_shape": list(input_shape), "kernel": shape.kernel, "stride": stride,
                "padding": shape.kernel // 2, "dtype": "float32"},
        build=partial(_build_tap_mean, input_shape, shape.kernel, stride),
        bytes_moved=size,
        target=target,
        rounds=rounds,
    )


def _build_tap_mean(input_shape: tuple[int, ...], kernel: int, stride: int, context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    x = activation(input_shape, context)
    geometry, _ = tap_geometry.check_tap_mean_args(x, kernel, stride, kernel // 2, 1, "zeros", 1.0, "mean")

    def public(backend: str) -> Provider:
        return Provider(run=partial(functional.tap_mean, x, kernel, stride, kernel // 2, backend=backend))

    def compiled() -> Provider:
        return Provider(run=partial(compile_fresh(partial(reference_taps.tap_mean_unchecked, geometry=geometry,
                                                          stats_fraction=1.0), context), x))

    factories = equinorm_providers(context, public, compiled)
    side_by_side = context.fused_backends[0] if context.fused_backends else REFERENCE
    factories[CHANNEL_MEAN] = lambda: Provider(
        run=partial(functional.channel_mean, x, backend=side_by_side), comparable=False
    )
    return factories


# ---- weight transform ---------------------------------------------------------------------------

WEIGHT_FAMILIES = ("weight_forward", "weight_backward", "weight_forward_backward")
_WEIGHT_TRAFFIC = {"weight_forward": 2, "weight_backward": 3, "weight_forward_backward": 5}  # weight-sized passes


def weight_case(family: str, shape: LayerShape) -> Case:
    if family not in WEIGHT_FAMILIES:
        raise ValueError(f"family must be one of {WEIGHT_FAMILIES}, got {family!r}")
    weight_label = "x".join(map(str, shape.weight_shape()))
    return Case(
        family=family,
        label=f"{shape.label} (w {weight_label})",
        params={"weight_shape": list(shape.weight_shape()), "ratio": RATIO, "mode": MODE, "gain": True},
        build=partial(_build_weight, family, shape),
        bytes_moved=_WEIGHT_TRAFFIC[family] * shape.weight_numel() * FLOAT32_BYTES,
    )


def _build_weight(family: str, shape: LayerShape, context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    needs_grad = family != "weight_forward"
    weight = conv_weight(shape, context, needs_grad)
    mean = channel_means(shape.in_channels, context, needs_grad)
    gain = gains(shape.out_channels, context, needs_grad)
    grad_out = torch.randn_like(weight)
    inputs = (weight, mean, gain)

    def public(backend: str) -> Provider:
        return _weight_provider(family, partial(_public_weight, backend=backend), inputs, grad_out)

    def compiled() -> Provider:
        compiled_function = compile_fresh(reference_weight, context)
        if family != "weight_backward":
            return _weight_provider(family, compiled_function, inputs, grad_out)
        # The backward-alone case reuses one graph (retain_graph), which compiled backwards with
        # donated buffers refuse; the option is read when the first call compiles.
        with torch._functorch.config.patch(donated_buffer=False):
            return _weight_provider(family, compiled_function, inputs, grad_out)

    return equinorm_providers(context, public, compiled)


def _public_weight(weight: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor, *, backend: str) -> torch.Tensor:
    return functional.equinorm_weight(weight, mean, ratio=RATIO, mode=MODE, gain=gain, backend=backend)


def _weight_provider(
    family: str, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor
) -> Provider:
    if family == "weight_forward":
        return Provider(run=partial(function, *inputs))
    if family == "weight_backward":
        out = function(*inputs)  # the forward is built once; only the backward is timed
        return Provider(run=partial(torch.autograd.grad, out, inputs, grad_out, retain_graph=True))
    return Provider(run=partial(_forward_backward, function, inputs, inputs, grad_out))


def _forward_backward(
    function: Callable[..., object],
    arguments: tuple[torch.Tensor, ...],
    differentiated: tuple[torch.Tensor, ...],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Run ``function``, then backpropagate sum(out * grad_out) (out: its first result) into ``differentiated``."""
    result = function(*arguments)
    results = result if isinstance(result, tuple) else (result,)
    grads = torch.autograd.grad(results[0], differentiated, grad_out)
    return (*results, *grads)


# ---- statistics + weight transform ------------------------------------------------------------------

def stats_weight_case(shape: LayerShape, batch: int, target: Target | None = None) -> Case:
    x_bytes = math.prod(shape.input_shape(batch)) * FLOAT32_BYTES
    weight_bytes = shape.weight_numel() * FLOAT32_BYTES
    return Case(
        family="stats_weight_forward_backward",
        label=f"N{batch} {shape.label}",
        params={"input_shape": list(shape.input_shape(batch)), "weight_shape": list(shape.weight_shape()),
                "ratio": RATIO, "mode": MODE, "gain": True},
        build=partial(_build_stats_weight, shape, batch),
        bytes_moved=x_bytes + _WEIGHT_TRAFFIC["weight_forward_backward"] * weight_bytes,
        target=target,
    )


def _build_stats_weight(shape: LayerShape, batch: int, context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    x = activation(shape.input_shape(batch), context, requires_grad=True)
    weight = conv_weight(shape, context, requires_grad=True)
    gain = gains(shape.out_channels, context, requires_grad=True)
    grad_out = torch.randn_like(weight)
    inputs = (x, weight, gain)

    def public(backend: str) -> Provider:
        function = partial(_public_stats_weight, backend=backend)
        return Provider(run=partial(_forward_backward, function, inputs, inputs, grad_out))

    def compiled() -> Provider:
        function = compile_fresh(reference_statistics_and_weight, context)
        return Provider(run=partial(_forward_backward, function, inputs, inputs, grad_out))

    return equinorm_providers(context, public, compiled)


def _public_stats_weight(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor, *, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return functional.equinorm_forward(x, weight, ratio=RATIO, mode=MODE, gain=gain, backend=backend)


# ---- whole layers ---------------------------------------------------------------------------------

def group_norm_groups(channels: int) -> int:
    """The largest group count <= 32 that divides ``channels``."""
    return next(g for g in range(min(MAX_GROUP_NORM_GROUPS, channels), 0, -1) if channels % g == 0)


def layer_case(shape: LayerShape, batch: int, train: bool) -> Case:
    return Case(
        family="layer_train" if train else "layer_eval",
        label=f"N{batch} {shape.label}",
        params={"input_shape": list(shape.input_shape(batch)), "weight_shape": list(shape.weight_shape()),
                "padding": shape.kernel // 2, "group_norm_groups": group_norm_groups(shape.out_channels)},
        build=partial(_build_layer, shape, batch, train),
        provider_set=LAYER_PROVIDERS,
    )


def _baseline_layers(shape: LayerShape) -> dict[str, Callable[[], nn.Module]]:
    conv = partial(nn.Conv2d, shape.in_channels, shape.out_channels, shape.kernel, padding=shape.kernel // 2)
    return {
        "conv2d": conv,
        "conv2d_batchnorm": lambda: nn.Sequential(conv(bias=False), nn.BatchNorm2d(shape.out_channels)),
        "conv2d_groupnorm": lambda: nn.Sequential(
            conv(bias=False), nn.GroupNorm(group_norm_groups(shape.out_channels), shape.out_channels)
        ),
        "stdconv2d": partial(StdConv2d, shape.in_channels, shape.out_channels, shape.kernel, padding=shape.kernel // 2),
    }


def _build_layer(shape: LayerShape, batch: int, train: bool, context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    x = activation(shape.input_shape(batch), context, requires_grad=train)
    output_shape = (batch, shape.out_channels, shape.size, shape.size)
    grad_out = _memory_format(torch.randn(*output_shape, device=context.device), context) if train else None
    layer = EquiNormConv2d(shape.in_channels, shape.out_channels, shape.kernel, padding=shape.kernel // 2,
                           backend=REFERENCE, device=context.device)  # fmt: skip
    with torch.no_grad():  # eval mode reads the running mean: make it the input's, as after training
        layer.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    prepare = partial(_prepared_module, context=context, train=train)
    run = partial(_layer_run, x=x, grad_out=grad_out)

    def equinorm(backend: str) -> Provider:
        module = copy.deepcopy(layer)
        module.backend = backend
        return Provider(run=run(prepare(module)))

    def compiled() -> Provider:
        return Provider(run=run(compile_fresh(prepare(copy.deepcopy(layer)), context)))

    factories = equinorm_providers(context, equinorm, compiled)
    for name, make in _baseline_layers(shape).items():
        factories[name] = partial(_baseline_provider, make, prepare, run)
    return factories


def _baseline_provider(
    make: Callable[[], nn.Module], prepare: Callable[[nn.Module], nn.Module], run: Callable[[nn.Module], Callable]
) -> Provider:
    return Provider(run=run(prepare(make())), comparable=False)


def _prepared_module(module: nn.Module, *, context: BuildContext, train: bool) -> nn.Module:
    module = module.to(context.device).train(train)
    return module.to(memory_format=torch.channels_last) if context.channels_last else module


def _layer_run(module: Callable[[torch.Tensor], torch.Tensor], *, x: torch.Tensor, grad_out: torch.Tensor | None) -> Callable[[], tuple]:
    """The timed call: forward under no_grad (eval), or forward and grads into x and every parameter (train)."""
    if grad_out is None:
        return partial(_eval_forward, module, x)
    parameters = tuple(module.parameters())
    return partial(_forward_backward, module, (x,), (x, *parameters), grad_out)


@torch.no_grad()
def _eval_forward(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return module(x)


# ---- whole models -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A network the model cases train: how to build it in a norm, its input, dtype and layout."""

    name: str
    build: Callable[[str], nn.Module]  # norm ("batch", "group", "equinorm", "none") -> model
    sample_shape: tuple[int, ...]  # one input, without the batch dim
    num_classes: int
    description: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False


def cifar_resnet_spec(depth: int = 20, width: int = 16, size: int = 32) -> ModelSpec:
    return ModelSpec(
        name=f"CifarResNet-{depth}" + ("" if width == 16 else f" width {width}"),
        build=lambda norm: CifarResNet(depth, width, norm=norm),
        sample_shape=(3, size, size), num_classes=10,
        description=f"CifarResNet(depth={depth}, width={width}), {size}x{size} inputs, 10 classes",
    )  # fmt: skip


def imagenet_resnet_spec(depth: int, width: int = 64, size: int = 224, num_classes: int = 1000,
                         dtype: torch.dtype = torch.bfloat16, channels_last: bool = True) -> ModelSpec:  # fmt: skip
    layout = "channels_last" if channels_last else "NCHW"
    return ModelSpec(
        name=f"ResNet-{depth}" + ("" if width == 64 else f" width {width}") + f" {str(dtype).removeprefix('torch.')}",
        build=lambda norm: ImageNetResNet(depth, norm, width, num_classes),
        sample_shape=(3, size, size), num_classes=num_classes, dtype=dtype, channels_last=channels_last,
        description=f"ResNet-{depth} ImageNet layout, base width {width}, {size}x{size} inputs, {num_classes} "
        f"classes, {str(dtype).removeprefix('torch.')}, {layout}",
    )  # fmt: skip


# The model cases' goals: EquiNorm within 5% of no normalization,
# 1.25x faster than BatchNorm and faster than GroupNorm, eager and compiled.
MODEL_TARGET = Target(
    "equinorm within 5% of none (>= 1/1.05x), >= 1.25x batchnorm, >= 1x groupnorm; eager and compiled",
    min_speedup_over_baselines=(("none", 1 / 1.05), ("batchnorm", 1.25), ("groupnorm", 1.0)),
    providers=("equinorm", "equinorm" + COMPILED_SUFFIX),
)
# Eval: the eval-mode weight is built once and reused, so the model should run as the unnormalized one.
MODEL_EVAL_TARGET = Target(
    "equinorm within 5% of none (>= 1/1.05x); eager and compiled",
    min_speedup_over_baselines=(("none", 1 / 1.05),),
    providers=("equinorm", "equinorm" + COMPILED_SUFFIX),
)
MODEL_RATIO_BASELINES = ("batchnorm", "none")
MODEL_LEARNING_RATE = 1e-3  # small: the timed steps repeat one batch, and must stay finite
MODEL_MOMENTUM = 0.9


def model_case(spec: ModelSpec, batch: int, train: bool, *, rounds: int | None = None, compiled: bool = True) -> Case:
    return Case(
        family="model_train" if train else "model_eval",
        label=f"{spec.name} N{batch}",
        params={"network": spec.description, "input_shape": [batch, *spec.sample_shape],
                "optimizer": f"SGD lr {MODEL_LEARNING_RATE} momentum {MODEL_MOMENTUM}" if train else None},
        build=partial(_build_model, spec, batch, train, compiled),
        target=MODEL_TARGET if train else MODEL_EVAL_TARGET,
        provider_set=MODEL_PROVIDERS,
        ratio_baselines=MODEL_RATIO_BASELINES,
        rounds=rounds,
        compiled_providers=compiled,
    )  # fmt: skip


def _build_model(spec: ModelSpec, batch: int, train: bool, with_compiled: bool,
                 context: BuildContext) -> dict[str, ProviderFactory]:  # fmt: skip
    _seed(context)
    x = torch.rand(batch, *spec.sample_shape, device=context.device).to(spec.dtype)  # raw pixels in [0, 1)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, spec.num_classes, (batch,), device=context.device)
    factories: dict[str, ProviderFactory] = {}
    for compiled in (False, True) if with_compiled and context.compile_reference else (False,):
        for name, norm in MODEL_NORMS.items():
            provider_name = name + COMPILED_SUFFIX if compiled else name
            factories[provider_name] = partial(_model_provider, spec, norm, x, labels, train, compiled, context)
    return factories


def _model_provider(spec: ModelSpec, norm: str, x: torch.Tensor, labels: torch.Tensor, train: bool, compiled: bool,
                    context: BuildContext) -> Provider:  # fmt: skip
    torch.manual_seed(context.seed)  # every norm starts from its own seeded initialisation
    model = spec.build(norm).to(device=context.device, dtype=spec.dtype).train(train)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A fresh compile per provider: no graph of another model or case is reused.
    forward = compile_fresh(model, context) if compiled else model
    if not train:
        return Provider(run=partial(_eval_forward, forward, x), comparable=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=MODEL_LEARNING_RATE, momentum=MODEL_MOMENTUM)
    return Provider(run=partial(_training_step, forward, optimizer, x, labels), comparable=False)


def _training_step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                   x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(forward(x).float(), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---- host time per layer call ------------------------------------------------------------------------

def layer_host_case(shape: LayerShape = LayerShape(8, 8, 4, 3), batch: int = 2) -> Case:
    return Case(
        family="layer_host",
        label=f"N{batch} {shape.label}",
        params={"input_shape": list(shape.input_shape(batch)), "weight_shape": list(shape.weight_shape()),
                "padding": shape.kernel // 2},
        build=partial(_build_layer_host, shape, batch),
        target=Target("equinorm layer call <= Conv2d + BatchNorm2d calls (its host time over the conv's <= a "
                      "BatchNorm2d call's)", min_speedup_over_baselines=(("conv2d_batchnorm", 1.0),),
                      providers=("equinorm",)),
        provider_set=HOST_PROVIDERS,
        ratio_baselines=("conv2d", "conv2d_batchnorm"),
    )  # fmt: skip


def _build_layer_host(shape: LayerShape, batch: int, context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    x = activation(shape.input_shape(batch), context, requires_grad=True)
    grad_out = _memory_format(torch.randn(batch, shape.out_channels, shape.size, shape.size, device=context.device),
                              context)  # fmt: skip
    conv = partial(nn.Conv2d, shape.in_channels, shape.out_channels, shape.kernel, padding=shape.kernel // 2)
    layers: dict[str, Callable[[], nn.Module]] = {
        "conv2d": conv,
        "batchnorm2d": lambda: nn.BatchNorm2d(shape.in_channels),
        "conv2d_batchnorm": lambda: nn.Sequential(conv(bias=False), nn.BatchNorm2d(shape.out_channels)),
        "equinorm": partial(EquiNormConv2d, shape.in_channels, shape.out_channels, shape.kernel,
                            padding=shape.kernel // 2),
    }  # fmt: skip
    prepare = partial(_prepared_module, context=context, train=True)

    def provider(make: Callable[[], nn.Module], name: str) -> Provider:
        module = prepare(make())
        gradient = torch.randn_like(x) if name == "batchnorm2d" else grad_out
        return Provider(run=_layer_run(module, x=x, grad_out=gradient), comparable=False)

    return {name: partial(provider, make, name) for name, make in layers.items()}


# ---- ENorm ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """A network ENorm rescales: a name for the tables and how to build it."""

    name: str
    build: Callable[[], nn.Module]
    description: str


def mlp_network(in_features: int = 784, hidden: int = 512, blocks: int = 4) -> Network:
    return Network(f"mlp {hidden}x{blocks}", partial(residual_mlp, in_features, hidden, blocks),
                   f"residual MLP, {in_features} inputs, {blocks} blocks of two {hidden}-wide Linears, no norm")  # fmt: skip


def resnet18_network(width: int = 64) -> Network:
    name = "resnet18" if width == 64 else f"resnet18 width {width}"
    return Network(name, partial(ImageNetResNet18, width), f"ImageNet ResNet-18 layout, base width {width}, no norm layers")


def enorm_case(network: Network, *, balance: bool, tol: float = 1e-3, max_cycles: int = 1000,
               target: Target | None = None) -> Case:  # fmt: skip
    with torch.device("meta"):  # only the parameter count is needed here: no memory, no initialisation
        parameters = parameter_count(network.build())
    params = {"network": network.description, "parameters": parameters, "p": 2.0, "c": 1.0,
              "schedule": "sequential", "optimizer": None}  # fmt: skip
    if balance:
        params.update(tol=tol, max_cycles=max_cycles)
    bytes_moved = None if balance else 2 * parameters * FLOAT32_BYTES
    return Case(
        family="enorm_balance" if balance else "enorm_cycle",
        label=network.name,
        params=params,
        build=partial(_build_enorm, network, balance, tol, max_cycles),
        bytes_moved=bytes_moved,
        target=target,
        provider_set=ENORM_PROVIDERS,
    )


def _build_enorm(network: Network, balance: bool, tol: float, max_cycles: int, context: BuildContext) -> dict[str, ProviderFactory]:
    _seed(context)
    model = network.build().to(context.device)
    initial = [parameter.detach().clone() for parameter in model.parameters()]

    def provider(backend: str) -> Provider:
        copied = copy.deepcopy(model)
        normalizer = ENorm(copied, backend=backend)
        parameters = list(copied.parameters())
        run = partial(_balance, normalizer, tol, max_cycles) if balance else normalizer.step
        return Provider(
            run=run,
            outputs=lambda _: tuple(parameter.detach() for parameter in parameters),
            restore=partial(_copy_into, parameters, initial),
            restore_every_run=balance,
            details=(lambda cycles: {"cycles": cycles, "converged": cycles < max_cycles}) if balance else None,
        )

    factories: dict[str, ProviderFactory] = {name: partial(provider, name) for name in context.fused_backends}
    factories[REFERENCE] = partial(provider, REFERENCE)
    if not balance:
        factories[PARAMETER_PASS] = partial(_parameter_pass, model)
    return factories


def _parameter_pass(model: nn.Module) -> Provider:
    values = [parameter.detach() for parameter in copy.deepcopy(model).parameters()]
    return Provider(run=partial(torch._foreach_mul_, values, 1.0), outputs=lambda _: tuple(values), comparable=False)


def _balance(normalizer: ENorm, tol: float, max_cycles: int) -> int:
    with warnings.catch_warnings():  # not converging is reported through the cycle count
        warnings.simplefilter("ignore", RuntimeWarning)
        return normalizer.balance(tol, max_cycles)


@torch.no_grad()
def _copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


# ---- the case lists ---------------------------------------------------------------------------------

STATS_WEIGHT_TARGET = Target("fused >= 5x the reference eager and >= 2x torch.compile of the reference",
                             min_speedup_over_reference=5.0, min_speedup_over_compiled=2.0)  # fmt: skip
BANDWIDTH_TARGET = Target("fused >= 80% of the read-bandwidth ceiling", min_fraction_of_read_ceiling=0.8)
# Per-tap statistics read x once, as channel means do; what they add is O(C x spatial) work on the samples' sum.
TAP_MEAN_TARGET = Target("fused tap_mean within 1.3x of the fused channel_mean of the same input",
                         min_speedup_over_baselines=((CHANNEL_MEAN, 1 / 1.3),))
ENORM_CYCLE_TARGET = Target("fused >= 20x the reference loop", min_speedup_over_reference=20.0)
# The statistics + weight transform settings the CPU targets are stated for.
STATS_WEIGHT_TARGETS = (
    (RESNET_LAYER_SHAPES[1], 8),
    (RESNET_LAYER_SHAPES[2], 8),
    (RESNET_LAYER_SHAPES[3], 8),
    (RESNET_LAYER_SHAPES[0], 32),
)
BANDWIDTH_TARGET_MIN_BYTES = 64 * MIB
LARGE_STATISTICS_INPUTS = ((32, 128, 64, 64), (128, 128, 64, 64))  # 64 MiB, 256 MiB
READ_CEILING_MIB = 256
PRESETS = ("tiny", "quick", "full")
MODEL_BATCH_SIZES = (32, 128)
MODEL_ROUNDS = {"quick": 3, "full": 10}  # interleaved rounds: a training step is long, the machine's drift slow
# tap_mean's goal is a ratio of two calls of tens of microseconds, where the machine's speed drifts
# within a second: more, shorter rounds (the same time per provider) pair the two more closely.
TAP_MEAN_ROUNDS = 12


def model_specs(device_type: str) -> tuple[ModelSpec, ...]:
    """The networks of the model cases: CifarResNet-20 on CPU; ResNet-18 and -50 (ImageNet layout,
    bf16, channels_last) on CUDA."""
    if device_type == "cuda":
        return (imagenet_resnet_spec(18), imagenet_resnet_spec(50))
    return (cifar_resnet_spec(),)


# The ResNet convolutions with a spatial kernel (tap_mean of a 1x1 conv is channel_mean).
TAP_MEAN_SHAPES = tuple(shape for shape in RESNET_LAYER_SHAPES if shape.kernel > 1)


def _channel_mean_with_target(shape: Sequence[int], min_bytes: int = BANDWIDTH_TARGET_MIN_BYTES) -> Case:
    big_enough = math.prod(shape) * FLOAT32_BYTES >= min_bytes
    return channel_mean_case(shape, BANDWIDTH_TARGET if big_enough else None)


def _stats_weight_with_target(shape: LayerShape, batch: int) -> Case:
    return stats_weight_case(shape, batch, STATS_WEIGHT_TARGET if (shape, batch) in STATS_WEIGHT_TARGETS else None)


def full_cases(device_type: str = "cpu") -> list[Case]:
    """Every family at the ResNet layer shapes and batch sizes 1, 8, 32, 128; the model cases at
    batch sizes 32 and 128."""
    shapes, batches = RESNET_LAYER_SHAPES, BATCH_SIZES
    cases = [read_ceiling_case(READ_CEILING_MIB)]
    inputs = dict.fromkeys(s.input_shape(b) for s in shapes for b in batches)  # two shapes share 512ch 7x7
    cases += [_channel_mean_with_target(shape) for shape in inputs]
    cases += [_channel_mean_with_target(shape) for shape in LARGE_STATISTICS_INPUTS]
    cases += [tap_mean_case(s, b, stride, TAP_MEAN_TARGET, TAP_MEAN_ROUNDS)
              for s in TAP_MEAN_SHAPES for b in batches for stride in (1, 2)]  # fmt: skip
    cases += [weight_case(family, shape) for family in WEIGHT_FAMILIES for shape in shapes]
    cases += [_stats_weight_with_target(s, b) for s in shapes for b in batches]
    cases += [layer_case(s, b, train) for train in (True, False) for s in shapes for b in batches]
    networks = (mlp_network(), resnet18_network())
    cases += [enorm_case(n, balance=False, target=_enorm_target(n)) for n in networks]
    cases += [enorm_case(n, balance=True, tol=1e-3) for n in networks]
    cases += [layer_host_case()]
    cases += [model_case(spec, batch, train, rounds=MODEL_ROUNDS["full"])
              for train in (True, False) for spec in model_specs(device_type) for batch in MODEL_BATCH_SIZES]  # fmt: skip
    return cases


def quick_cases(device_type: str = "cpu") -> list[Case]:
    """Every target case, and every family at a few sizes (batch 8, two layer shapes; the first
    model at batch 32, eager only: compiling four models would take longer than the rest of the run)."""
    layer_shapes = (RESNET_LAYER_SHAPES[1], RESNET_LAYER_SHAPES[3])
    cases = [read_ceiling_case(READ_CEILING_MIB)]
    cases += [_channel_mean_with_target(RESNET_LAYER_SHAPES[0].input_shape(32))]
    cases += [_channel_mean_with_target(shape) for shape in LARGE_STATISTICS_INPUTS]
    cases += [tap_mean_case(TAP_MEAN_SHAPES[0], 32, stride, TAP_MEAN_TARGET) for stride in (1, 2)]
    cases += [weight_case(family, RESNET_LAYER_SHAPES[2]) for family in WEIGHT_FAMILIES]
    cases += [stats_weight_case(shape, batch, STATS_WEIGHT_TARGET) for shape, batch in STATS_WEIGHT_TARGETS]
    cases += [layer_case(s, 8, train) for train in (True, False) for s in layer_shapes]
    cases += [enorm_case(n, balance=False, target=_enorm_target(n)) for n in (mlp_network(), resnet18_network())]
    cases += [enorm_case(mlp_network(hidden=256, blocks=2), balance=True, tol=1e-2)]
    cases += [layer_host_case()]
    first_model = model_specs(device_type)[0]
    cases += [model_case(first_model, MODEL_BATCH_SIZES[0], train, rounds=MODEL_ROUNDS["quick"], compiled=False)
              for train in (True, False)]  # fmt: skip
    return cases


def tiny_cases(device_type: str = "cpu") -> list[Case]:
    """Every family at sizes that run in milliseconds (smoke tests); targets kept to exercise the report.
    The model cases train both kinds of network (CUDA's ImageNet layout in bf16 and channels_last too) at tiny widths."""
    shapes = (LayerShape(4, 6, 5, 3), LayerShape(8, 16, 3, 1))
    cases = [read_ceiling_case(1)]
    cases += [_channel_mean_with_target((2, 4, 5, 5), min_bytes=0)]
    cases += [tap_mean_case(LayerShape(4, 4, 5, 3), 2, stride) for stride in (1, 2)]
    cases += [weight_case(family, shape) for family in WEIGHT_FAMILIES for shape in shapes]
    cases += [stats_weight_case(shape, 2, STATS_WEIGHT_TARGET) for shape in shapes]
    cases += [layer_case(LayerShape(8, 8, 6, 3), 2, train) for train in (True, False)]
    networks = (mlp_network(in_features=12, hidden=8, blocks=1), resnet18_network(width=2))
    cases += [enorm_case(n, balance=False, target=ENORM_CYCLE_TARGET) for n in networks]
    cases += [enorm_case(n, balance=True, tol=1e-3, max_cycles=50) for n in networks]
    cases += [layer_host_case(LayerShape(4, 4, 3, 3), 2)]
    cases += [model_case(cifar_resnet_spec(depth=8, width=4, size=8), 2, train) for train in (True, False)]
    cases += [model_case(imagenet_resnet_spec(18, width=2, size=32, num_classes=10), 2, True)]
    return cases


def _enorm_target(network: Network) -> Target | None:
    return ENORM_CYCLE_TARGET if network.name == "resnet18" else None


def cases_for(preset: str, families: Collection[str] | None = None, device_type: str = "cpu") -> list[Case]:
    """The cases of ``preset`` ("tiny", "quick" or "full"), only those of ``families`` when given;
    ``device_type`` picks the model cases' networks (see :func:`model_specs`)."""
    builders = {"tiny": tiny_cases, "quick": quick_cases, "full": full_cases}
    if preset not in builders:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    unknown = set(families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
    cases = builders[preset](device_type)
    return [case for case in cases if families is None or case.family in families]
