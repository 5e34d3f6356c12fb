"""Pure-PyTorch reference implementations: readable, differentiable by autograd, and the
specification the fused kernels are validated against."""
from .enorm import (
    enorm_balance_pair_,
    enorm_coefficients,
    enorm_column_energy,
    enorm_row_energy,
    enorm_scale_columns_,
    enorm_scale_rows_,
)
from .equinorm import channel_mean, equinorm_weight
from .tap_statistics import tap_mean

__all__ = [
    "channel_mean",
    "enorm_balance_pair_",
    "enorm_coefficients",
    "enorm_column_energy",
    "enorm_row_energy",
    "enorm_scale_columns_",
    "enorm_scale_rows_",
    "equinorm_weight",
    "tap_mean",
]
