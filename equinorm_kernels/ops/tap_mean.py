"""tap_mean's fused ops: fake kernels, the autograd wrapper, and the backend function built on them.

The compiled ops (``torch.ops.equinorm_kernels.tap_mean`` and ``tap_mean_backward``, schemas in
csrc/ops.cpp) and their Triton counterparts (prefixed ``triton_``) are plain, non-differentiable
ops; :class:`_TapMean` gives them autograd:

    forward   x -> (C, *kernel) per-tap means, and per channel whether x[:rows] has a value < 0
    backward  (C, *kernel) -> a (C, *spatial) plane, broadcast (never materialised) over the
              samples that fed the means; for abs_mean it is multiplied by sign(x) (sign(0) = +1)
              only where a channel had a negative value, so a non-negative input costs no pass
              over x; the flags are read on the host without waiting for the device
              (:class:`~equinorm_kernels.ops.equinorm.NegativeFlags`). With ``create_graph=True``
              the backward is the reference's autograd.

The specification is :mod:`equinorm_kernels.reference.tap_statistics`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .. import _checks, _tap_geometry
from .._tap_geometry import TapGeometry
from .._transformable import apply, transformable
from .equinorm import NegativeFlags, builds_graph


def fake_tap_mean(x, rows, geometry, absolute):
    kernel_size = _tap_geometry.parse_geometry_spec(geometry)[0]
    mean = x.new_empty((x.shape[1], *kernel_size), dtype=_tap_geometry.accumulation_dtype(x))
    return mean, x.new_empty((x.shape[1],), dtype=torch.bool)


def fake_tap_mean_backward(grad, spatial, rows, geometry):
    return grad.new_empty((grad.shape[0], *spatial))


def register_fake_kernels(prefix: str = "") -> None:
    """Register the fake kernels of ``equinorm_kernels::<prefix>tap_mean`` and its backward."""
    torch.library.register_fake(f"equinorm_kernels::{prefix}tap_mean", fake_tap_mean)
    torch.library.register_fake(f"equinorm_kernels::{prefix}tap_mean_backward", fake_tap_mean_backward)


# implementation name ("compiled", "triton") -> (tap_mean op, tap_mean_backward op)
_OPS: dict[str, tuple[Callable, Callable]] = {}


def register_ops(name: str, forward: Callable, backward: Callable) -> None:
    _OPS[name] = (forward, backward)


@functools.lru_cache(maxsize=256)
def _geometry(spec: str, absolute: bool) -> TapGeometry:
    return TapGeometry(*_tap_geometry.parse_geometry_spec(spec), absolute)


@transformable
class _TapMean(torch.autograd.Function):
    # The geometry travels as its spec string (TapGeometry.spec) and `absolute`: torch.compile
    # traces them as constants, and every argument of apply costs host time.
    @staticmethod
    def compute(x, stats_fraction: float, spec: str, absolute: bool, implementation: str):
        rows = _checks.stats_rows(x.shape[0], stats_fraction)
        return _OPS[implementation][0](x, rows, spec, absolute)  # (mean, negative)

    @staticmethod
    def save(ctx, inputs, output) -> None:
        x, stats_fraction, spec, absolute, implementation = inputs
        negative = output[1]
        # x itself, not its shape: sizes kept on ctx would be symbols of the forward's graph under
        # torch.compile(dynamic=True), which the backward's graph cannot use.
        ctx.save_for_backward(x, negative)
        ctx.spec, ctx.absolute = spec, absolute
        ctx.stats_fraction, ctx.implementation = float(stats_fraction), implementation
        ctx.negative_flags = NegativeFlags(negative) if absolute and x.requires_grad else None
        ctx.mark_non_differentiable(negative)
        ctx.set_materialize_grads(False)  # no zero gradient built for the flags

    @staticmethod
    def backward(ctx, grad, _grad_negative):
        if grad is None:  # the means did not reach the loss
            return None, None, None, None, None
        x, negative = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            from ..reference.tap_statistics import tap_mean_unchecked

            # torch.func.vjp rather than a leaf that requires grad: it also runs inside torch.func
            # transforms (whose backward always builds a graph). Through x the means are linear
            # (abs_mean: piecewise), so nothing of second order is lost by detaching it.
            geometry = _geometry(ctx.spec, ctx.absolute)
            _, vjp = torch.func.vjp(lambda value: tap_mean_unchecked(value, ctx.stats_fraction, geometry), x.detach())
            (grad_x,) = vjp(grad)
            return grad_x, None, None, None, None
        rows = _checks.stats_rows(x.shape[0], ctx.stats_fraction)
        plane = _OPS[ctx.implementation][1](grad.contiguous(), list(x.shape[2:]), rows, ctx.spec)
        return _grad_input(plane, x, negative, ctx.stats_fraction, ctx.negative_flags), None, None, None, None


def _grad_input(plane: torch.Tensor, x: torch.Tensor, negative: torch.Tensor, stats_fraction: float,
                flags: NegativeFlags | None) -> torch.Tensor:
    """dL/dx from the (C, *spatial) plane: broadcast over the samples that fed the means (zero on
    the others), times sign(x) in the channels that had a negative value (abs_mean: ``flags``,
    the forward's flags, None for the mean)."""
    trailing = (1,) * (x.dim() - 2)
    per_element = plane.to(x.dtype).unsqueeze(0)
    if stats_fraction < 1.0:
        # A mask rather than a split at `rows`: no shape depends on it (torch.compile, dynamic=True).
        fed = torch.arange(x.shape[0], device=x.device) < _checks.stats_rows(x.shape[0], stats_fraction)
        per_element = per_element * fed.to(x.dtype).reshape((-1, 1, *trailing))
    per_element = per_element.expand(x.shape)
    if flags is None:
        return per_element
    # x is read only when some channel had a negative value, or when that is not known on the
    # host without waiting for the device (then the device flags pick the channels).
    host = flags.on_host()
    if host is None or any(host):
        flip = (x < 0) & negative.reshape((1, -1, *trailing))
        per_element = torch.where(flip, -per_element, per_element)
    return per_element


def fused_tap_mean(implementation: str) -> Callable[[torch.Tensor, float, TapGeometry], torch.Tensor]:
    def tap_mean(x: torch.Tensor, stats_fraction: float, geometry: TapGeometry) -> torch.Tensor:
        if builds_graph(x):
            return apply(_TapMean, x, stats_fraction, geometry.spec, geometry.absolute, implementation)[0]
        rows = _checks.stats_rows(x.shape[0], stats_fraction)
        return _OPS[implementation][0](x, rows, geometry.spec, geometry.absolute)[0]

    return tap_mean

