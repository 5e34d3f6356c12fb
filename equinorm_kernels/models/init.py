"""Initial values of the four schemes; :func:`initialise_` applies one to a built model.

standard
    He normal weights (std sqrt(2 / fan_out) for convs, sqrt(2 / fan_in) for Linears), zero
    biases; the head keeps nn.Linear's default initialisation.
skipinit
    As standard, and a zero classifier (weight and bias); every block's alpha starts at 0, so each
    block is relu(shortcut(x)) and the whole model outputs zeros.
fixup
    As standard; then every block's first layer is multiplied by L^(-1/(2m - 2)) (L residual
    blocks, m = 2 layers per branch, so L^(-1/2)), its second layer and the classifier are zero.
    Scalar biases start at 0, scales at 1.
risotto
    Looks-linear orthogonal weights and zero biases, derived below, with alpha = beta = 1/2.

The scalars (alpha, beta, Fixup's biases and scales) get their initial values when the blocks are
built (:mod:`equinorm_kernels.models.blocks`); this module sets the weight layers.

RISOTTO: perfect dynamical isometry with looks-linear weights
-------------------------------------------------------------
A representation of even width 2n holds a "z-space" vector u of width n as h = [relu(u); relu(-u)],
so u = h[:n] - h[n:]. A layer reading h with W = [[W0, -W0], [-W0, W0]] outputs
W h = [W0 (relu(u) - relu(-u)); -W0 (relu(u) - relu(-u))] = [W0 u; -W0 u], and the ReLU after it
gives the representation of W0 u: at init every layer acts on u as the linear map W0, ReLU
included. The stem reads the raw input x with [W0; -W0] and so starts the representation with
u = W0 x; the head reads it with [W0, -W0] and outputs W0 u.

A block with branch layers M1, M2 (in z-space) and a looks-linear skip S has the pre-activation
alpha [M2 M1 u; -M2 M1 u] + beta [S u; -S u], so it maps u to (alpha M2 M1 + beta S) u. We take
S = M2 M1 and alpha = beta = 1/2: branch and skip contribute equally and the block maps u to
M2 M1 u. Every W0 inside the blocks has orthonormal rows (no block layer has more outputs than
fan-in), so M2 M1 has orthonormal rows (it is orthogonal when square), and so does the product
over all blocks: the residual part z -> relu([z; -z]) -> blocks -> out, y = out[:, :n] - out[:, n:],
is linear with every singular value 1. Biases start at zero, since a bias that is not of the form
[c; -c] would break the looks-linear form.

Convolutions: a stride-1 3x3 conv is delta-orthogonal: only its centre tap is non-zero and holds
W0, so it applies W0 at every pixel (an orthogonal map), and zero padding only ever meets the zero
taps. A stride-2 conv cannot be delta-orthogonal here: it would read one pixel in four, and as the
stages double the width its z-space map would have rank n * pixels_out for 2n * pixels_out
outputs, half of its singular values zero. A stride-s conv therefore holds W0 on the s x s taps
from its centre (offsets 0 .. s-1 in each direction): W0 has orthonormal rows over the flattened
(in, s, s) fan-in, and the s x s patches that the output pixels read tile the input, so the z-space
map is block diagonal with row-orthonormal blocks. The skip of a stride-s block is an s x s conv
with stride s (``LayerFactory.projection(patch=True)``) that reads the same patches and holds
W0_2 @ W0_1 for every tap: the branch's z-space map, exactly. For stride 1 that skip is a 1x1
conv. The isometry is exact when H and W are even at every stride-2 stage (multiples of 4 for
CifarResNet); at odd sizes the last patch overhangs the border.

The stem's and the head's W0 have orthonormal rows or columns, whichever their shape allows. The
head is looks-linear, [W0, -W0] with a zero bias, so the whole network is linear at init and the
logits are W0 applied to the average-pooled z-output of the last block; a zero head would instead
block every gradient below it on the first step. Norm layers keep their defaults: BatchNorm
(weight 1, bias 0) maps the channel pair (v, -v) to (v', -v'), so the looks-linear form survives
it, but the isometry is exact only for norm "none"; EquiNorm rescales the weights and keeps
neither.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..layers import EquiNormLayer, balance_signs_
from .blocks import ResidualBlock, ResidualNetwork

FIXUP_LAYERS_PER_BRANCH = 2


# --- shared pieces ----------------------------------------------------------------------------
def weight_layers(module: nn.Module) -> list[nn.Module]:
    """The convs and Linears (EquiNorm ones included) inside ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, (_ConvNd, nn.Linear))]


def he_std(layer: nn.Module) -> float:
    """He normal std for a layer followed by a ReLU: fan_out for convs, fan_in for Linears."""
    weight = layer.weight
    if isinstance(layer, _ConvNd):
        fan = weight.shape[0] * math.prod(weight.shape[2:])
    else:
        fan = weight.shape[1]
    return math.sqrt(2.0 / fan)


def fixup_factor(num_blocks: int, layers_per_branch: int = FIXUP_LAYERS_PER_BRANCH) -> float:
    """L^(-1/(2m - 2)): Fixup's rescaling of every branch layer but the last."""
    return num_blocks ** (-1.0 / (2 * layers_per_branch - 2))


@torch.no_grad()
def set_weight_(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` into ``layer`` and zero its bias."""
    layer.weight.copy_(weight)
    if layer.bias is not None:
        layer.bias.zero_()


@torch.no_grad()
def he_normal_(layer: nn.Module) -> None:
    set_weight_(layer, torch.randn_like(layer.weight) * he_std(layer))
    if isinstance(layer, EquiNormLayer):
        balance_signs_(layer.weight)  # EquiNorm needs both signs in every output channel


@torch.no_grad()
def zero_(layer: nn.Module) -> None:
    set_weight_(layer, torch.zeros_like(layer.weight))


# --- the schemes ------------------------------------------------------------------------------
def init_standard_(model: ResidualNetwork) -> None:
    for layer in weight_layers(model.stem) + weight_layers(model.blocks):
        he_normal_(layer)


def init_skipinit_(model: ResidualNetwork) -> None:
    init_standard_(model)
    zero_(model.head)


@torch.no_grad()
def init_fixup_(model: ResidualNetwork) -> None:
    init_standard_(model)
    factor = fixup_factor(len(model.blocks))
    for block in model.blocks:
        block.layer1.weight.mul_(factor)
        zero_(block.layer2)
    zero_(model.head)


def init_risotto_(model: ResidualNetwork) -> None:
    stem = model.stem.layer
    stem_z = delta_kernel(stem, z_patch(stem, paired_input=False))
    set_weight_(stem, looks_linear(stem_z, paired_input=False))
    for block in model.blocks:
        init_risotto_block_(block)
    head = model.head
    head_z = orthogonal_matrix(head.out_features, head.in_features // 2)
    set_weight_(head, looks_linear(head_z, paired_output=False))


INITIALISERS: dict[str, Callable[[ResidualNetwork], None]] = {
    "standard": init_standard_,
    "skipinit": init_skipinit_,
    "fixup": init_fixup_,
    "risotto": init_risotto_,
}


def initialise_(model: ResidualNetwork, scheme: str) -> None:
    """Set the initial weights of ``model`` (built for ``scheme``) in place."""
    INITIALISERS[scheme](model)


# --- RISOTTO ----------------------------------------------------------------------------------
def orthogonal_matrix(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) float64, orthonormal rows (rows <= cols) or columns; uses the global RNG."""
    return nn.init.orthogonal_(torch.empty(rows, cols, dtype=torch.float64))


def looks_linear(z_kernel: torch.Tensor, *, paired_input: bool = True, paired_output: bool = True) -> torch.Tensor:
    """[[K, -K], [-K, K]] from a z-space kernel K of shape (out, in, *kernel_size).

    Without ``paired_input`` (a layer reading the raw input): [K; -K], shape (2 out, in, ...);
    without ``paired_output`` (the head): [K, -K], shape (out, 2 in, ...).
    """
    weight = torch.cat([z_kernel, -z_kernel], dim=1) if paired_input else z_kernel
    return torch.cat([weight, -weight], dim=0) if paired_output else weight


def patch_size(layer: nn.Module) -> tuple[int, ...]:
    """The taps a RISOTTO layer uses per spatial dim: its stride (1: the centre tap); () for a Linear."""
    return tuple(layer.stride) if isinstance(layer, _ConvNd) else ()


def z_patch(layer: nn.Module, *, paired_input: bool = True) -> torch.Tensor:
    """Orthogonal z-space weights of ``layer`` over its patch: (out/2, in[/2], *patch_size).

    Orthonormal rows (or columns) over the flattened (in, *patch) fan-in.
    """
    out_z = layer.weight.shape[0] // 2
    in_z = layer.weight.shape[1] // 2 if paired_input else layer.weight.shape[1]
    patch = patch_size(layer)
    return orthogonal_matrix(out_z, in_z * math.prod(patch)).reshape(out_z, in_z, *patch)


def delta_kernel(layer: nn.Module, patch: torch.Tensor) -> torch.Tensor:
    """Place a z-space patch on the taps from the centre of ``layer``'s kernel; zeros elsewhere."""
    if not isinstance(layer, _ConvNd):
        return patch
    kernel = torch.zeros(*patch.shape[:2], *layer.kernel_size, dtype=patch.dtype)
    starts = [size // 2 for size in layer.kernel_size]
    if any(start + p > size for start, p, size in zip(starts, patch.shape[2:], layer.kernel_size)):
        raise ValueError(f"a {tuple(patch.shape[2:])} patch does not fit from the centre of {layer}")
    window = tuple(slice(start, start + p) for start, p in zip(starts, patch.shape[2:]))
    kernel[(slice(None), slice(None), *window)] = patch
    return kernel


def init_risotto_block_(block: ResidualBlock) -> None:
    first = z_patch(block.layer1)
    second = z_patch(block.layer2)
    set_weight_(block.layer1, looks_linear(delta_kernel(block.layer1, first)))
    set_weight_(block.layer2, looks_linear(delta_kernel(block.layer2, second)))
    # The skip reads the same patch as layer1, so composing gives it the branch's z-space map.
    second_matrix = second.reshape(second.shape[0], second.shape[1])
    skip = torch.einsum("om,mi...->oi...", second_matrix, first)
    skip_layer = block.shortcut.layer
    if skip_layer.weight.shape != looks_linear(skip).shape:
        raise ValueError(f"RISOTTO skip {skip_layer} does not read layer1's patch {tuple(first.shape[2:])}")
    set_weight_(skip_layer, looks_linear(skip))
