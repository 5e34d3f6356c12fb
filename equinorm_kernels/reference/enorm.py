"""ENorm (equi-normalization) in plain PyTorch ops: the per-channel math, written once.

A ReLU network keeps its function when the rows of a layer (its weights for output channel i,
plus bias_i) are multiplied by d_i > 0 and the columns of the next layer that read channel i are
divided by d_i. ENorm picks the d_i that minimise the L_p energy sum |W|^p of the two sides:

    R_i = sum over producers of sum |row_i|^p  (+ |bias_i|^p when biases count)
    C_i = sum over consumers of sum |col_i|^p
    d_i = (C_i / (c^p R_i))^(1 / (2p))          rows *= d_i, biases *= d_i, columns /= d_i

after which ||col_i||_p = c ||row_i||_p. Weight layouts:

- rows: dim 0 of any weight: Linear (out, in), Conv (out, in/groups, *kernel), and the 1-D
  BatchNorm affine gamma (C,) with beta as its bias.
- columns: input channel j of a Linear (out, in), of a Conv (out, in/groups, *kernel) with
  ``groups`` (channel j is read by the out/groups output channels of its group), and of a Linear
  that follows a flatten of S spatial positions per channel (``columns_per_channel=S``: channel j
  owns the S consecutive columns j*S .. j*S+S-1).

Zero-energy rule: the minimum over d_i is not attained when R_i = 0 (a dead unit: zero row and
bias) or C_i = 0 (a channel nobody reads), since the energy then keeps falling as d_i goes to
infinity or zero. Such a channel keeps d_i = 1, so every weight stays finite.

Energies are computed in float64 for every weight dtype: |w|^p of a finite float32 weight leaves
float32's range (|w| > ~1.8e19 for p = 2) although the balanced weights are representable. The
rescales multiply in float64 too and round once to the tensor's dtype. The energy functions are
differentiable; the ``*_`` functions edit their tensor in place and never record gradients.
"""
from __future__ import annotations

import torch


ENERGY_DTYPE = torch.float64


def _abs_pow(tensor: torch.Tensor, p: float) -> torch.Tensor:
    return tensor.to(ENERGY_DTYPE).abs().pow(p)


def _column_blocks(weight: torch.Tensor, groups: int, columns_per_channel: int) -> tuple[int, int, int, int]:
    """Shape (groups, out/groups, channels per group, taps) that puts input channels on dim 2."""
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...) to have columns, got {tuple(weight.shape)}")
    out_channels, width = weight.shape[0], weight.shape[1]
    if groups < 1 or out_channels % groups:
        raise ValueError(f"groups = {groups} must be a positive divisor of weight.shape[0] = {out_channels}")
    if columns_per_channel < 1 or width % columns_per_channel:
        raise ValueError(
            f"columns_per_channel = {columns_per_channel} must be a positive divisor of weight.shape[1] = {width}"
        )
    if columns_per_channel > 1 and (groups > 1 or weight.dim() > 2):
        raise ValueError("columns_per_channel > 1 (a Linear after a flatten) needs a 2-D weight and groups = 1")
    return groups, out_channels // groups, width // columns_per_channel, -1


def enorm_row_energy(weight: torch.Tensor, p: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel energy sum |weight[i]|^p (+ |bias[i]|^p).

    Args:
        weight: (out, ...) any layer weight, or a 1-D BatchNorm gamma (C,).
        p: exponent (>= 1).
        bias: optional (out,) bias counted with its row.

    Returns:
        (out,) float64.
    """
    energy = _abs_pow(weight, p).reshape(weight.shape[0], -1).sum(dim=1)
    if bias is not None:
        energy = energy + _abs_pow(bias, p).to(energy.device)
    return energy


def enorm_column_energy(
    weight: torch.Tensor, p: float, *, groups: int = 1, columns_per_channel: int = 1
) -> torch.Tensor:
    """Per-input-channel energy sum |weight[:, j]|^p.

    Args:
        weight: Linear (out, in) or Conv (out, in/groups, *kernel).
        p: exponent (>= 1).
        groups: convolution groups; input channel j is read by the out/groups output channels of
            group j // (in/groups).
        columns_per_channel: S > 1 for a Linear after a flatten of S positions per channel.

    Returns:
        (in_channels,) float64, in_channels = in/groups * groups for a Conv and in / S for a Linear.
    """
    blocks = _abs_pow(weight, p).reshape(_column_blocks(weight, groups, columns_per_channel))
    return blocks.sum(dim=(1, 3)).reshape(-1)


def enorm_coefficients(row_energy: torch.Tensor, column_energy: torch.Tensor, p: float, c: float = 1.0) -> torch.Tensor:
    """d_i = (C_i / (c^p R_i))^(1/(2p)), and d_i = 1 where R_i = 0 or C_i = 0.

    Args:
        row_energy: (C,) R_i, energies of the producer rows.
        column_energy: (C,) C_i, energies of the consumer columns.
        p: exponent the energies were computed with.
        c: asymmetric scaling (> 0); the fixed point has ||col_i||_p = c ||row_i||_p.

    Returns:
        (C,) strictly positive, finite coefficients in the energies' dtype.
    """
    column_energy = column_energy.to(device=row_energy.device, dtype=row_energy.dtype)
    attained = (row_energy > 0) & (column_energy > 0) & torch.isfinite(row_energy) & torch.isfinite(column_energy)
    # Logs keep the ratio finite when one energy underflows and the other is large.
    log_ratio = torch.log(torch.where(attained, column_energy, 1.0)) - torch.log(torch.where(attained, row_energy, 1.0))
    d = torch.exp((log_ratio - p * torch.log(torch.as_tensor(c, dtype=log_ratio.dtype))) / (2 * p))
    return torch.where(attained, d, torch.ones_like(d))


def _multiply_rounding_once_(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """tensor *= factor computed in float64 (a factor of d^power can leave float32's range while the
    product does not), rounded once to tensor's dtype."""
    return tensor.copy_(tensor.to(ENERGY_DTYPE) * factor.to(ENERGY_DTYPE))


@torch.no_grad()
def enorm_scale_rows_(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: tensor[i] *= factor[i] for a weight (out, ...), a bias (out,) or a gamma (C,).

    Returns ``tensor``.
    """
    shape = (tensor.shape[0],) + (1,) * (tensor.dim() - 1)
    return _multiply_rounding_once_(tensor, factor.to(device=tensor.device).reshape(shape))


@torch.no_grad()
def enorm_scale_columns_(
    tensor: torch.Tensor, factor: torch.Tensor, *, groups: int = 1, columns_per_channel: int = 1
) -> torch.Tensor:
    """In place: every column that reads input channel j is multiplied by factor[j].

    Same layouts as :func:`enorm_column_energy`; ``factor`` has one entry per input channel.
    Returns ``tensor``.
    """
    blocks = _column_blocks(tensor, groups, columns_per_channel)
    factor = factor.to(device=tensor.device).reshape(blocks[0], 1, blocks[2], 1)
    if tensor.is_contiguous():
        _multiply_rounding_once_(tensor.view(blocks), factor)
    else:  # e.g. channels_last conv weights, which cannot be viewed as blocks
        _multiply_rounding_once_(
            tensor, factor.expand(blocks[:3] + (tensor[0, 0].numel() * columns_per_channel,)).reshape(tensor.shape)
        )
    return tensor


def enorm_balance_pair_(
    producer_weight: torch.Tensor,
    consumer_weight: torch.Tensor,
    *,
    p: float = 2.0,
    c: float = 1.0,
    producer_bias: torch.Tensor | None = None,
    include_bias: bool = True,
    groups: int = 1,
    columns_per_channel: int = 1,
) -> torch.Tensor:
    """Balance one producer/consumer pair in place and return the coefficients d.

    The producer's rows (and bias) are multiplied by d, the consumer's columns divided by d.
    ``producer_bias`` counts in R_i only when ``include_bias``; it is rescaled either way so the
    function is preserved. ``groups``/``columns_per_channel`` describe the consumer.

    Returns:
        (C,) coefficients, C = producer_weight.shape[0].
    """
    rows = enorm_row_energy(producer_weight, p, producer_bias if include_bias else None)
    columns = enorm_column_energy(consumer_weight, p, groups=groups, columns_per_channel=columns_per_channel)
    if rows.shape != columns.shape:
        raise ValueError(
            f"the producer has {rows.numel()} output channels but the consumer reads {columns.numel()} input channels"
        )
    d = enorm_coefficients(rows, columns, p, c)
    enorm_scale_rows_(producer_weight, d)
    if producer_bias is not None:
        enorm_scale_rows_(producer_bias, d)
    enorm_scale_columns_(consumer_weight, 1.0 / d, groups=groups, columns_per_channel=columns_per_channel)
    return d
