"""``schedule="release"``: the ENorm cycle exactly as published with the paper (Stock et al., ICLR 2019).

- The chain W_0 .. W_{n-1} is every parameter whose own name contains "weight", in registration
  order, except those of BatchNorm modules. No residual support: consecutive weights must chain
  (W_k reads the output channels of W_{k-1}; a Linear after a convolution may read S features
  per channel, as after a flatten).
- The model is *convolutional* when any chain weight has more than 2 dims; norms then use q = 2
  whatever p is. Fully connected models use q = p.
- Pair k = 1 .. n-2 balances W_{k-1}'s rows against W_k's columns with
  d_j = sqrt(||W_k[:, j]||_q / (c ||W_{k-1}[j, :]||_q)). The pair feeding the last matrix is never
  balanced, so W_{n-1} never changes and W_{n-2} keeps its rows.
- Jacobi order: every coefficient of a cycle is computed from the weights before the cycle,
  then all are applied.
- Biases are neither counted nor rescaled (so a model with biases changes its function).
- Optimizer state is rescaled only for convolutional models (first and second moments; gradients
  are left alone).
- Where the published cycle would divide by zero, a zero row or column keeps d = 1, so weights stay finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..reference.enorm import (
    enorm_coefficients,
    enorm_column_energy,
    enorm_row_energy,
    enorm_scale_columns_,
    enorm_scale_rows_,
)
from .graph import equinorm_layer_type
from .optimizer_state import StateRescaler
from .plan import ChannelGroup, Columns, Layer


@dataclass(frozen=True)
class ReleaseChain:
    """The weight chain, whether it counts as convolutional, and the balanced pairs."""

    layers: tuple[Layer, ...]
    convolutional: bool
    pairs: tuple[ChannelGroup, ...]  # pair k - 1: producer W_{k-1}, consumer W_k, for k = 1 .. n-2


def _refuse_equinorm_layers(model: nn.Module) -> None:
    equinorm_layer = equinorm_layer_type()
    if equinorm_layer is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, equinorm_layer):
            raise ValueError(
                f"module '{name}' ({type(module).__name__}) is an EquiNorm layer: its output does not scale with "
                "its weight rows, so ENorm cannot rescale around it; use ENorm on a model without EquiNorm layers"
            )


def _chain_weights(model: nn.Module) -> list[Layer]:
    layers = []
    for name, param in model.named_parameters():  # registration order
        module_path, _, attribute = name.rpartition(".")
        if "weight" not in attribute or isinstance(model.get_submodule(module_path), _BatchNorm):
            continue
        if param.dim() < 2:
            raise ValueError(
                f"weight '{name}' has shape {tuple(param.shape)}; schedule='release' chains weight matrices "
                "and convolution kernels only (at least 2 dims)"
            )
        layer_name = module_path if attribute == "weight" and module_path else name
        layers.append(Layer(layer_name, "conv" if param.dim() > 2 else "linear", param))
    return layers


def _link(previous: Layer, layer: Layer) -> Columns:
    channels, width = previous.out_channels, layer.weight.shape[1]
    if width == channels:
        return Columns(layer)
    if layer.kind == "linear" and previous.kind == "conv" and width % channels == 0:
        return Columns(layer, width // channels)
    raise ValueError(
        f"schedule='release' needs consecutive weights to chain, but '{previous.name}' has {channels} output "
        f"channels and the next weight '{layer.name}' (shape {tuple(layer.weight.shape)}) reads {width}"
    )


def discover_release_chain(model: nn.Module) -> ReleaseChain:
    """Build the release-mode chain of ``model``; raise ValueError if its weights do not chain."""
    _refuse_equinorm_layers(model)
    layers = _chain_weights(model)
    links = [_link(previous, layer) for previous, layer in zip(layers, layers[1:])]
    # links[k - 1] joins W_{k-1} to W_k; the last link (into W_{n-1}) is never balanced.
    pairs = tuple(ChannelGroup(layer.out_channels, (layer,), (link,)) for layer, link in zip(layers, links[:-1]))
    return ReleaseChain(tuple(layers), any(layer.weight.dim() > 2 for layer in layers), pairs)


@torch.no_grad()
def release_cycle(chain: ReleaseChain, p: float, c: float, state: StateRescaler) -> torch.Tensor | None:
    """One Jacobi cycle; returns max |d - 1| over the cycle (None when there is no pair)."""
    q = 2.0 if chain.convolutional else p
    coefficients = [_pair_coefficients(pair, q, c) for pair in chain.pairs]
    for pair, d in zip(chain.pairs, coefficients):
        _apply_pair(pair, d, state if chain.convolutional else None)
    if not coefficients:
        return None
    return torch.stack([(d - 1).abs().max().to(coefficients[0].device) for d in coefficients]).max()


def _pair_coefficients(pair: ChannelGroup, q: float, c: float) -> torch.Tensor:
    (producer,), (columns,) = pair.producers, pair.consumers
    rows = enorm_row_energy(producer.weight, q)
    cols = enorm_column_energy(columns.layer.weight, q, columns_per_channel=columns.columns_per_channel)
    return enorm_coefficients(rows, cols, q, c)


def _apply_pair(pair: ChannelGroup, d: torch.Tensor, state: StateRescaler | None) -> None:
    (producer,), (columns,) = pair.producers, pair.consumers
    scale_columns = partial(enorm_scale_columns_, columns_per_channel=columns.columns_per_channel)
    enorm_scale_rows_(producer.weight, d)
    scale_columns(columns.layer.weight, 1.0 / d)
    if state is not None:
        state.follow(producer.weight, enorm_scale_rows_, d)
        state.follow(columns.layer.weight, scale_columns, 1.0 / d)
