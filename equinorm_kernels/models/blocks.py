"""Building blocks shared by :class:`CifarResNet` and :class:`ResidualMLP`.

A :class:`LayerFactory` makes a model's weight layers (3x3 convs or Linears, plain or EquiNorm) and
its norm layers; the residual blocks combine two weight layers and a shortcut in the way their
scheme prescribes:

    standard   relu(branch(x) + shortcut(x))
    skipinit   relu(shortcut(x) + alpha * branch(x))                       alpha init 0
    fixup      relu(b2b + scale * layer2(b2a + relu(b1b + layer1(x + b1a))) + shortcut(x + b1a))
    risotto    relu(alpha * branch(x) + beta * shortcut(x))                alpha = beta = 1/2

with branch(x) = norm2(layer2(relu(norm1(layer1(x))))). The shortcut is the identity, or a
projection (a 1x1 conv with the block's stride, or a Linear) followed by a norm when the shape
changes; RISOTTO blocks always project, with the patch geometry explained in
:mod:`equinorm_kernels.models.init`. The scalars start at the values above; the weight layers get
their initial values from that module.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import EquiNormConv2d, EquiNormLinear

NORMS = ("batch", "group", "equinorm", "none")
SCHEMES = ("standard", "skipinit", "fixup", "risotto")


# --- option checks ----------------------------------------------------------------------------
def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_options(norm: object, scheme: object, group_norm_groups: object) -> None:
    """Raise ValueError for an unknown norm or scheme, or a combination that cannot work."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    check_positive_int(group_norm_groups, "group_norm_groups")
    if scheme == "fixup" and norm != "none":
        raise ValueError(
            f"scheme='fixup' needs norm='none', got norm={norm!r}: Fixup is a normalization-free scheme "
            "(its initialisation and scalar biases take the place of the normalization), and under "
            "norm='equinorm' its zero-initialised layers would stay zero, since EquiNorm maps a zero "
            "weight to a zero weight with a zero gradient"
        )


def check_risotto_width(scheme: str, width: int, name: str) -> None:
    if scheme == "risotto" and width % 2:
        raise ValueError(
            f"scheme='risotto' needs an even {name} (every representation holds a vector z and its "
            f"negation, so the z-width is {name} / 2), got {name}={width}"
        )


def check_equinorm_options(norm: str, equinorm_options: object) -> dict:
    """The keyword options every EquiNorm layer gets (mode, stats_fraction, momentum, eps, backend,
    and per_tap for the conv layers)."""
    if equinorm_options is None:
        return {}
    if not isinstance(equinorm_options, dict):
        raise TypeError(f"equinorm_options must be a dict or None, got {type(equinorm_options).__name__}")
    if equinorm_options and norm != "equinorm":
        raise ValueError(f"equinorm_options are for norm='equinorm', got norm={norm!r}")
    allowed = {"mode", "momentum", "stats_fraction", "eps", "backend", "per_tap"}
    unknown = sorted(set(equinorm_options) - allowed)
    if unknown:
        raise ValueError(f"equinorm_options accepts {sorted(allowed)}, got unknown {unknown}")
    return dict(equinorm_options)


def layers_have_bias(norm: str, scheme: str) -> bool:
    """Per-channel biases where no norm follows: EquiNorm's bias is its affine; Fixup uses scalars."""
    return norm in ("none", "equinorm") and scheme != "fixup"


def group_count(channels: int, wanted: int) -> int:
    """The largest number of groups <= ``wanted`` that divides ``channels``."""
    groups = min(wanted, channels)
    while channels % groups:
        groups -= 1
    return groups


# --- layers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFactory:
    """Makes one model's weight and norm layers: 2-D convs (``conv=True``) or Linears.

    Conv layers take (N, C, H, W) inputs, Linear layers (N, C); ``width`` is C.
    """

    conv: bool
    norm: str
    bias: bool
    group_norm_groups: int
    equinorm_options: dict = field(default_factory=dict)

    def weight_layer(self, in_width: int, out_width: int, stride: int = 1) -> nn.Module:
        """A 3x3 conv (padding 1, ``stride``) or a Linear (``stride`` must be 1)."""
        if not self.conv:
            if stride != 1:
                raise ValueError(f"a Linear layer has no stride, got stride={stride}")
            return self._linear(in_width, out_width)
        if self.norm == "equinorm":
            return EquiNormConv2d(in_width, out_width, 3, stride=stride, padding=1, bias=self.bias, **self.equinorm_options)
        return nn.Conv2d(in_width, out_width, 3, stride=stride, padding=1, bias=self.bias)

    def projection(self, in_width: int, out_width: int, stride: int = 1, *, patch: bool = False) -> nn.Sequential:
        """Shortcut projection followed by a norm: a 1x1 conv with ``stride``, or a Linear.

        With ``patch``, the conv is ``stride`` x ``stride`` with that stride, after zero-padding
        ``stride - 1`` pixels on the bottom and right: it reads, for every output pixel, the
        stride x stride patch from the centre of a 3x3 conv's window, and its output size is the 3x3
        conv's, ceil(H / stride), for odd sizes too.
        """
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if not self.conv:
            parts["layer"] = self._linear(in_width, out_width)
        else:
            kernel = stride if patch else 1
            if kernel > 1:
                parts["pad"] = nn.ZeroPad2d((0, kernel - 1, 0, kernel - 1))
            if self.norm == "equinorm":
                parts["layer"] = EquiNormConv2d(
                    in_width, out_width, kernel, stride=stride, bias=self.bias, **self.equinorm_options
                )
            else:
                parts["layer"] = nn.Conv2d(in_width, out_width, kernel, stride=stride, bias=self.bias)
        parts["norm"] = self.norm_layer(out_width)
        return nn.Sequential(parts)

    def norm_layer(self, width: int) -> nn.Module:
        """The norm after a weight layer of ``width`` outputs; Identity for "equinorm" and "none"."""
        if self.norm == "batch":
            return nn.BatchNorm2d(width) if self.conv else nn.BatchNorm1d(width)
        if self.norm == "group":
            return nn.GroupNorm(group_count(width, self.group_norm_groups), width)
        return nn.Identity()

    def _linear(self, in_width: int, out_width: int) -> nn.Module:
        if self.norm == "equinorm":
            # A Linear has one tap per input: its per-tap means are the channel means.
            options = {name: value for name, value in self.equinorm_options.items() if name != "per_tap"}
            return EquiNormLinear(in_width, out_width, bias=self.bias, **options)
        return nn.Linear(in_width, out_width, bias=self.bias)


class ScalarBias(nn.Module):
    """Adds one learnable scalar, initialised to 0, to its input (any shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ScalarScale(nn.Module):
    """Multiplies its input (any shape) by one learnable scalar."""

    def __init__(self, initial: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(initial)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_stem(layers: LayerFactory, in_width: int, width: int, scheme: str) -> nn.Sequential:
    """weight layer -> norm (Fixup: a scalar bias) -> ReLU; its output is non-negative.

    Input (N, in_width, H, W) or (N, in_width); output (N, width, H, W) or (N, width).
    """
    parts: OrderedDict[str, nn.Module] = OrderedDict(layer=layers.weight_layer(in_width, width))
    if scheme == "fixup":
        parts["bias"] = ScalarBias()
    else:
        parts["norm"] = layers.norm_layer(width)
    parts["relu"] = nn.ReLU()
    return nn.Sequential(parts)


# --- residual blocks --------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """Two weight layers with their norms (the branch) and a shortcut; subclasses add them up.

    Input (N, in_width, H, W) or (N, in_width), non-negative (a ReLU output); output
    (N, out_width, ceil(H / stride), ceil(W / stride)) or (N, out_width), non-negative.
    """

    always_project = False  # a learnable skip even when the shape is unchanged
    patch_shortcut = False  # the skip reads layer1's centre patch (LayerFactory.projection(patch=True))

    def __init__(self, layers: LayerFactory, in_width: int, out_width: int, stride: int = 1) -> None:
        super().__init__()
        self.layer1 = layers.weight_layer(in_width, out_width, stride)
        self.norm1 = layers.norm_layer(out_width)
        self.layer2 = layers.weight_layer(out_width, out_width)
        self.norm2 = layers.norm_layer(out_width)
        changes_shape = stride != 1 or in_width != out_width
        self.shortcut: nn.Module = nn.Identity()
        if changes_shape or self.always_project:
            self.shortcut = layers.projection(in_width, out_width, stride, patch=self.patch_shortcut)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.layer2(F.relu(self.norm1(self.layer1(x)))))


class StandardBlock(ResidualBlock):
    """relu(branch(x) + shortcut(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class SkipInitBlock(ResidualBlock):
    """relu(shortcut(x) + alpha * branch(x)) with alpha initialised to 0."""

    def __init__(self, layers: LayerFactory, in_width: int, out_width: int, stride: int = 1) -> None:
        super().__init__(layers, in_width, out_width, stride)
        self.alpha = ScalarScale(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.alpha(self.branch(x)))


class FixupBlock(ResidualBlock):
    """Fixup's basic block: scalar biases before each weight layer and activation, a scalar scale.

    Built with norm "none" and no per-channel biases, so ``norm1``/``norm2`` are identities.
    """

    def __init__(self, layers: LayerFactory, in_width: int, out_width: int, stride: int = 1) -> None:
        super().__init__(layers, in_width, out_width, stride)
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = ScalarBias(), ScalarBias(), ScalarBias(), ScalarBias()
        self.scale = ScalarScale(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = self.bias1a(x)
        out = F.relu(self.bias1b(self.layer1(shifted)))
        out = self.bias2b(self.scale(self.layer2(self.bias2a(out))))
        return F.relu(out + self.shortcut(shifted))


class RisottoBlock(ResidualBlock):
    """relu(alpha * branch(x) + beta * shortcut(x)), alpha = beta = 1/2; the shortcut always projects."""

    always_project = True
    patch_shortcut = True

    def __init__(self, layers: LayerFactory, in_width: int, out_width: int, stride: int = 1) -> None:
        super().__init__(layers, in_width, out_width, stride)
        self.alpha = ScalarScale(0.5)
        self.beta = ScalarScale(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.alpha(self.branch(x)) + self.beta(self.shortcut(x)))


BLOCKS: dict[str, type[ResidualBlock]] = {
    "standard": StandardBlock,
    "skipinit": SkipInitBlock,
    "fixup": FixupBlock,
    "risotto": RisottoBlock,
}


# --- what the models share --------------------------------------------------------------------
class ResidualNetwork(nn.Module):
    """stem -> blocks -> (pooling) -> head, with the options ``norm`` and ``scheme``.

    Subclasses set ``stem`` (nn.Sequential whose ``layer`` is its weight layer), ``blocks``
    (nn.Sequential of :class:`ResidualBlock`), ``head_bias`` (Fixup's scalar bias before the head,
    otherwise Identity) and ``head`` (nn.Linear).
    """

    norm: str
    scheme: str
    stem: nn.Sequential
    blocks: nn.Sequential
    head_bias: nn.Module
    head: nn.Linear

    def _configure(
        self,
        *,
        conv: bool,
        width: int,
        width_name: str,
        norm: object,
        scheme: object,
        group_norm_groups: object,
        equinorm_options: object,
    ) -> LayerFactory:
        """Check and store the options both models share; the factory for the model's layers."""
        check_options(norm, scheme, group_norm_groups)
        check_risotto_width(scheme, width, width_name)
        options = check_equinorm_options(norm, equinorm_options)
        self.norm, self.scheme, self.group_norm_groups = norm, scheme, group_norm_groups
        return LayerFactory(
            conv=conv,
            norm=norm,
            bias=layers_have_bias(norm, scheme),
            group_norm_groups=group_norm_groups,
            equinorm_options=options,
        )

    def fixup_scalars(self) -> list[nn.Parameter]:
        """Fixup's scalar biases and scales (Fixup trains them with a 10x smaller learning rate).

        Empty for the other schemes.
        """
        if self.scheme != "fixup":
            return []
        scalar_modules = (m for m in self.modules() if isinstance(m, (ScalarBias, ScalarScale)))
        return [p for module in scalar_modules for p in module.parameters()]


def make_head_bias(scheme: str) -> nn.Module:
    return ScalarBias() if scheme == "fixup" else nn.Identity()
