"""Arguments of ``tap_mean``: validated and brought to the form every backend takes.

A convolution's spatial arguments (kernel_size, stride, padding, dilation, padding_mode) are
accepted as ``nn.Conv1d/2d/3d`` accepts them, and become one :class:`TapGeometry`: per spatial
dim the kernel size, stride, dilation and the padding before and after (``padding="same"`` pads
odd totals one more after than before, as nn.Conv does).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import _checks

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
STATISTICS = ("mean", "abs_mean")


@dataclass(frozen=True)
class TapGeometry:
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # (before, after) per spatial dim, flattened: 2 * dims values
    dilation: tuple[int, ...]
    padding_mode: str
    absolute: bool  # statistic == "abs_mean"
    # The ops' geometry argument (geometry_spec), written once per geometry.
    spec: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        spec = geometry_spec(self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode)
        object.__setattr__(self, "spec", spec)

    def padding_pairs(self) -> list[tuple[int, int]]:
        return [(self.padding[2 * i], self.padding[2 * i + 1]) for i in range(len(self.kernel_size))]


def geometry_spec(kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], padding_mode: str) -> str:
    """The tap_mean ops' ``geometry`` argument: the convolution's geometry as one string,
    "kernel_size=3,3 stride=1,1 padding=1,1,1,1 dilation=1,1 padding_mode=zeros" (padding a
    (before, after) pair per dim; csrc/tap_geometry.h reads it). One string converts from Python
    to C++ in a fraction of the time that four int lists take."""

    def ints(values: Sequence[int]) -> str:
        return ",".join(str(int(v)) for v in values)

    return (f"kernel_size={ints(kernel_size)} stride={ints(stride)} padding={ints(padding)} "
            f"dilation={ints(dilation)} padding_mode={padding_mode}")


@functools.lru_cache(maxsize=256)
def parse_geometry_spec(spec: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], str]:
    """(kernel_size, stride, padding, dilation, padding_mode) of a :func:`geometry_spec` string."""
    names = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
    fields = spec.split(" ")
    if len(fields) != len(names) or any(not f.startswith(name + "=") for f, name in zip(fields, names)):
        raise ValueError(f"geometry must read 'kernel_size=<ints> stride=<ints> padding=<ints> dilation=<ints> "
                         f"padding_mode=<mode>' (ints comma-separated), got {spec!r}")
    values = [f.split("=", 1)[1] for f in fields]
    try:
        lists = [tuple(int(v) for v in value.split(",")) for value in values[:4]]
    except ValueError:
        raise ValueError(f"geometry must give comma-separated ints for kernel_size, stride, padding and dilation, "
                         f"got {spec!r}") from None
    return lists[0], lists[1], lists[2], lists[3], values[4]


def output_size(length: int, kernel: int, stride: int, before: int, after: int, dilation: int) -> int:
    """Output positions of a convolution along one dim (nn.Conv's formula)."""
    return (length + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _int_tuple(value: object, name: str, dims: int, *, low: int) -> tuple[int, ...]:
    if type(value) is int:  # the common case, checked without the generic path below
        if value < low:
            raise ValueError(f"{name} must be >= {low} in every spatial dim, got {value}")
        return (value,) * dims
    values = value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != dims
        or not all(type(v) is int or (isinstance(v, int) and not isinstance(v, bool)) for v in values)
    ):
        raise ValueError(f"{name} must be an int or a tuple of {dims} ints (one per spatial dim), got {value!r}")
    if min(values) < low:
        raise ValueError(f"{name} must be >= {low} in every spatial dim, got {tuple(values)}")
    return tuple(int(v) for v in values)


def _padding(value: object, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    dims = len(kernel)
    if isinstance(value, str):
        if value == "valid":
            return (0,) * (2 * dims)
        if value != "same":
            raise ValueError(f"padding must be an int, a tuple of {dims} ints, 'same' or 'valid', got {value!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' needs stride 1 (as nn.Conv), got stride {stride}")
        pairs = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pairs += [total // 2, total - total // 2]
        return tuple(pairs)
    per_dim = _int_tuple(value, "padding", dims, low=0)
    return tuple(p for p in per_dim for _ in range(2))


def check_tap_mean_args(
    x: object,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    padding_mode: object,
    stats_fraction: object,
    statistic: object,
) -> tuple[TapGeometry, float]:
    """Validate tap_mean's arguments against x; returns the geometry and stats_fraction as a float."""
    # Exact ints and strings: cached under one signature (see _PLAIN_SIGNATURE).
    plain = (
        type(kernel_size) is int and type(stride) is int and type(dilation) is int and type(padding) in (int, str)
        and type(padding_mode) is str and type(statistic) is str
    )  # fmt: skip
    if (
        plain and type(stats_fraction) is float and 0.0 < stats_fraction <= 1.0 and isinstance(x, torch.Tensor)
        and not torch.compiler.is_compiling()
    ):
        # The common call (a layer's, or ints and strings): what the checks below accept, tested at
        # once, with the geometry's own checks cached. Anything else goes through them, and they
        # name the culprit.
        shape = x.shape
        if 3 <= len(shape) <= 5 and x.dtype in _checks.FLOAT_DTYPES and shape[0] and shape[1] and x.numel():
            args = (shape[2:], kernel_size, stride, padding, dilation, padding_mode, statistic)
            return _cached_geometry(_PLAIN_SIGNATURE, args), stats_fraction
    x = _checks.check_tensor(x, "x", dims="(N, C, *spatial) with 1 to 3 spatial dims", min_dim=3, max_dim=5)
    stats_fraction = _checks.check_channel_mean_extent(x, stats_fraction)
    # torch.Size is a tuple: a cache key as it is.
    args = (x.shape[2:], kernel_size, stride, padding, dilation, padding_mode, statistic)
    if not torch.compiler.is_compiling():
        # A layer passes the same arguments on every call: their checks are done once. Arguments
        # that cannot be hashed (lists) are checked every time.
        if plain:
            return _cached_geometry(_PLAIN_SIGNATURE, args), stats_fraction  # keyed at once
        key = (tuple(map(_signature, args)), args)
        try:
            hash(key)
        except TypeError:
            return _geometry(*args), stats_fraction
        return _cached_geometry(*key), stats_fraction
    return _geometry(*args), stats_fraction


# The cache key's signature for arguments whose types are exact ints and strings: those never
# compare equal to another type's values (3.0, True), so one marker stands for all of them.
_PLAIN_SIGNATURE = "int-and-str"


def _signature(value: object) -> object:
    """The types of an argument, also inside a tuple: the cache must tell 3 from 3.0 and True from 1."""
    return tuple(map(type, value)) if type(value) is tuple else type(value)


@functools.lru_cache(maxsize=256)
def _cached_geometry(signature: tuple, args: tuple) -> TapGeometry:
    return _geometry(*args)


def _geometry(
    spatial: tuple[int, ...],
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    padding_mode: object,
    statistic: object,
) -> TapGeometry:
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    dims = len(spatial)
    kernel = _int_tuple(kernel_size, "kernel_size", dims, low=1)
    stride_ = _int_tuple(stride, "stride", dims, low=1)
    dilation_ = _int_tuple(dilation, "dilation", dims, low=1)
    pads = _padding(padding, kernel, stride_, dilation_)
    geometry = TapGeometry(kernel, stride_, pads, dilation_, padding_mode, statistic == "abs_mean")
    for dim, (length, (before, after)) in enumerate(zip(spatial, geometry.padding_pairs())):
        if padding_mode == "reflect" and max(before, after) >= length:
            raise ValueError(
                f"padding {(before, after)} of spatial dim {dim} must be smaller than its size {length} "
                f"for padding_mode='reflect'"
            )
        if padding_mode == "circular" and max(before, after) > length:
            raise ValueError(
                f"padding {(before, after)} of spatial dim {dim} must be at most its size {length} "
                f"for padding_mode='circular'"
            )
        span = dilation_[dim] * (kernel[dim] - 1) + 1
        if length + before + after < span:
            raise ValueError(
                f"kernel_size {kernel} (dilation {dilation_}) spans {span} positions in spatial dim {dim}, "
                f"more than the padded input's {length + before + after} (size {length}, padding {(before, after)})"
            )
    return geometry


def tap_output_shape(spatial: Sequence[int], geometry: TapGeometry) -> list[int]:
    """Output positions per spatial dim of the convolution the taps belong to."""
    return [
        output_size(length, k, s, before, after, d)
        for length, k, s, (before, after), d in zip(
            spatial, geometry.kernel_size, geometry.stride, geometry.padding_pairs(), geometry.dilation
        )
    ]


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
