"""equinorm-kernels: weight-space normalization for PyTorch (EquiNorm, ENorm) with fused kernels.

Public API:
    channel_mean, equinorm_weight            functional EquiNorm (backend="auto" picks the fastest)
    equinorm_forward                         both fused: the layers' training path
    tap_mean                                 per-tap input means of a convolution (padding, stride, dilation)
    EquiNormConv1d/2d/3d, EquiNormLinear     drop-in layers
    convert                                  swap Conv/Linear -> BatchNorm pairs for EquiNorm layers
    convert_sync_equinorm                    statistics over a process group (data-parallel training)
    ConversionReport                         what convert(..., return_report=True) did, per layer
    ENorm                                    equi-normalization of a network between SGD steps
    reference                                the pure-PyTorch specification
    available_backends, build_info
    set_value_checks, check_values           data checks: at the call, or on the device (CUDA) and reported later
"""
from ._extension import build_info
from ._checks import set_value_checks
from ._value_checks import check_values
from .backends import available_backends
from . import reference
from . import ops  # noqa: F401  (registers the compiled and Triton backends)
from .functional import channel_mean, equinorm_forward, equinorm_weight, tap_mean
from .layers import ChannelAffine, EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear
from .convert import ConversionReport, convert
from .distributed import convert_sync_equinorm
from .enorm import ENorm

__version__ = "0.1.0"

__all__ = [
    "ChannelAffine",
    "ConversionReport",
    "ENorm",
    "EquiNormConv1d",
    "EquiNormConv2d",
    "EquiNormConv3d",
    "EquiNormLinear",
    "available_backends",
    "build_info",
    "channel_mean",
    "check_values",
    "convert",
    "convert_sync_equinorm",
    "equinorm_forward",
    "equinorm_weight",
    "reference",
    "set_value_checks",
    "tap_mean",
]
