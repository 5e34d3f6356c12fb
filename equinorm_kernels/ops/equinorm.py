"""EquiNorm's fused ops: fake kernels, the autograd wrappers, and the backends built on them.

The compiled kernels (``torch.ops.equinorm_kernels.*``, schemas in csrc/ops.cpp) and the Triton
kernels (the same signatures, prefixed ``triton_``) are plain, non-differentiable ops. Autograd
comes from the ``torch.autograd.Function`` wrappers below, whose forward and backward call those
ops, so eager mode, autograd and ``torch.compile`` all see the same registered ops:

    _EquiNormForward   x, weight, gain -> w'' (and the channel means)   one fused forward op
    _EquiNormWeight    weight, mean, gain -> w''                         the weight transform alone
    _ChannelMean       x -> mean
    backward of both weight wrappers: one ``equinorm_backward`` call; dL/dx is dL/dmu_c divided
    by the element count, broadcast (never materialised) over the samples that fed the means.
    With the "abs_mean" statistic it is multiplied by sign(x) (sign(0) = +1), read only in the
    channels the forward flagged as having a negative value (see _input_gradient).
    With ``create_graph=True`` the backward is the reference's autograd instead, so that
    second-order gradients are exact (the fused backward op is not differentiable).

Each wrapper is written as ``compute``, ``save`` and ``backward`` (see
:mod:`equinorm_kernels._transformable`), so that torch.func transforms take it too; its outputs
include the non-differentiable ones (stats, flags) that the backward needs.

The specification is :mod:`equinorm_kernels.reference.equinorm`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _checks
from ..reference.equinorm import WEIGHT_MATH_DTYPE, _accumulation_dtype
from .._transformable import apply, transformable

STATS_COLUMNS = 5  # shift, scale, positive mass, mean mass, used exact (csrc/shared/equinorm_math.h)


@dataclass(frozen=True)
class FusedOps:
    """The four EquiNorm ops of one implementation, with the signatures of csrc/ops.cpp."""

    channel_mean: Callable[..., torch.Tensor]
    equinorm_weight: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    equinorm_forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    equinorm_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # equinorm_forward with its autograd in C++ (csrc/autograd.cpp), for eager calls on CPU
    # tensors, (out, mean, passed the value screen); None where an implementation has none (Triton).
    equinorm_forward_autograd: Callable[..., tuple[torch.Tensor, torch.Tensor, bool]] | None = None


_OP_SETS: dict[str, FusedOps] = {}


def register_op_set(name: str, ops: FusedOps) -> None:
    """Make the ops of implementation ``name`` ("compiled", "triton") callable by the wrappers."""
    _OP_SETS[name] = ops


# ---- fake kernels: shapes, dtypes and layouts of the outputs, for torch.compile and meta tensors ----

def fake_channel_mean(x: torch.Tensor, rows: int, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    channels = x.shape[1]
    flags = channels if statistic == "abs_mean" else 0  # "mean" flags nothing
    return x.new_empty((channels,), dtype=_accumulation_dtype(x)), x.new_empty((flags,), dtype=torch.bool)


def _fake_like_weight(weight: torch.Tensor) -> torch.Tensor:
    # The kernels keep a channels_last weight's layout and write every other weight contiguous.
    if weight.dim() in (4, 5) and not weight.is_contiguous():
        layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        if weight.is_contiguous(memory_format=layout):
            return torch.empty_like(weight, memory_format=layout)
    return weight.new_empty(weight.shape)


def fake_equinorm_weight(weight, mean, gain, ratio, groups, mode, eps):
    stats = weight.new_empty((weight.shape[0], STATS_COLUMNS), dtype=WEIGHT_MATH_DTYPE)
    return _fake_like_weight(weight), stats


def fake_equinorm_forward(x, rows, weight, gain, ratio, groups, mode, eps, statistic):
    out, stats = fake_equinorm_weight(weight, None, gain, ratio, groups, mode, eps)
    mean, negative = fake_channel_mean(x, rows, statistic)
    return out, mean, stats, negative


def fake_equinorm_backward(grad_out, weight, mean, gain, stats, groups):
    return _fake_like_weight(weight), mean.new_empty(mean.shape, dtype=WEIGHT_MATH_DTYPE), torch.empty_like(gain)


def fake_equinorm_forward_autograd(x, rows, weight, gain, ratio, groups, mode, eps, statistic, screen=False):
    out, mean, _, _ = fake_equinorm_forward(x, rows, weight, gain, ratio, groups, mode, eps, statistic)
    return out, mean, True  # no values to screen: the checks never run on traced tensors


def register_autograd_op() -> None:
    """The Python parts of the compiled ``equinorm_forward_autograd``: its fake kernel, and the
    reference backward its C++ autograd calls for ``create_graph=True``."""
    torch.library.register_fake("equinorm_kernels::equinorm_forward_autograd", fake_equinorm_forward_autograd)
    torch.library.impl(
        "equinorm_kernels::equinorm_forward_reference_backward", "CompositeImplicitAutograd", reference_forward_backward
    )


def register_fake_kernels(prefix: str = "") -> None:
    """Register the fake kernels of the ops ``equinorm_kernels::<prefix><name>``."""
    for name, fake in (
        ("channel_mean", fake_channel_mean),
        ("equinorm_weight", fake_equinorm_weight),
        ("equinorm_forward", fake_equinorm_forward),
        ("equinorm_backward", fake_equinorm_backward),
    ):
        torch.library.register_fake(f"equinorm_kernels::{prefix}{name}", fake)


# ---- autograd wrappers ----

def _grad_input_from_mean(grad_mean: torch.Tensor, x: torch.Tensor, stats_fraction: float) -> torch.Tensor:
    """dL/dx of mu = mean(x[:rows]): a per-channel constant on the rows that fed the means and zero
    on the others, as an (N, C, 1, ...) tensor broadcast to x's shape (never materialised)."""
    return _compact_grad_input(grad_mean, x, stats_fraction).expand(x.shape)


def _compact_grad_input(grad_mean: torch.Tensor, x: torch.Tensor, stats_fraction: float) -> torch.Tensor:
    """_grad_input_from_mean before the broadcast: (1 or N, C, 1, ...)."""
    rows = _checks.stats_rows(x.shape[0], stats_fraction)
    trailing = (1,) * (x.dim() - 2)
    per_element = grad_mean / (rows * math.prod(x.shape[2:]))
    if per_element.dtype != x.dtype:
        per_element = per_element.to(x.dtype)
    per_element = per_element.reshape((1, x.shape[1], *trailing))
    if stats_fraction < 1.0:
        # A mask rather than a split at `rows`: no shape depends on it, so a symbolic batch size
        # under torch.compile(dynamic=True) needs no guard on where the split falls.
        fed = torch.arange(x.shape[0], device=x.device) < rows
        per_element = per_element * fed.to(x.dtype).reshape((-1, 1, *trailing))
    return per_element


class NegativeFlags:
    """The forward's per-channel "had a value < 0" flags (statistic "abs_mean"), readable on the
    host in the backward without waiting for the device.

    CPU flags are read directly. CUDA flags travel to pinned host memory behind the forward's work
    (no synchronisation); the backward uses them once the copy has landed, which it has unless the
    backward follows the forward at once, and otherwise treats every channel as flagged. Inside
    ``torch.compile`` or a CUDA graph capture nothing is copied (every channel counts as flagged).
    """

    def __init__(self, negative: torch.Tensor) -> None:
        self._host: torch.Tensor | None = None
        self._landed: torch.cuda.Event | None = None
        if negative.device.type == "cpu":
            self._host = negative
        elif negative.device.type == "cuda" and not torch.compiler.is_compiling():
            if not torch.cuda.is_current_stream_capturing():
                self._host = torch.empty(negative.shape, dtype=torch.bool, pin_memory=True)
                self._host.copy_(negative, non_blocking=True)
                self._landed = torch.cuda.Event()
                self._landed.record()

    def on_host(self) -> list[bool] | None:
        """The C flags, or None when not known without waiting. Read as a list: host memory, no
        tensor op (nothing that could look like a device read)."""
        if self._host is None or torch.compiler.is_compiling():
            return None
        if self._landed is not None and not self._landed.query():
            return None
        return self._host.tolist()


def _input_gradient(
    grad_mean: torch.Tensor, x: torch.Tensor, stats_fraction: float, flags: NegativeFlags | None
) -> torch.Tensor:
    """dL/dx of the channel statistic: the mean's (flags None), or for "abs_mean" the same times
    sign(x) with sign(0) = +1, so that on non-negative inputs it is the mean's exactly.

    x is read only in the channels flagged as having a negative value; when the flags are not known
    on the host (under torch.compile, or CUDA flags still in flight) every channel is read.
    """
    compact = _compact_grad_input(grad_mean, x, stats_fraction)
    per_element = compact.expand(x.shape)
    if flags is None:
        return per_element
    host = flags.on_host()
    if host is not None and not any(host):
        return per_element
    if host is None or all(host):
        # The constants broadcast inside where: one pass over x, nothing else at x's size.
        return torch.where(x < 0, -compact, compact)
    channels = torch.tensor([c for c, flagged in enumerate(host) if flagged])
    if x.device.type != "cpu":  # from pinned memory, so that the copy does not wait for the device
        channels = channels.pin_memory().to(x.device, non_blocking=True)
    signed = x.index_select(1, channels)
    constant = compact.index_select(1, channels)
    grad = per_element.clone()
    grad.index_copy_(1, channels, torch.where(signed < 0, -constant, constant))
    return grad


def _negative_flags(statistic: str, negative: torch.Tensor) -> NegativeFlags | None:
    return NegativeFlags(negative) if statistic == "abs_mean" else None


@transformable
class _ChannelMean(torch.autograd.Function):
    @staticmethod
    def compute(x: torch.Tensor, stats_fraction: float, statistic: str, implementation: str):
        rows = _checks.stats_rows(x.shape[0], stats_fraction)
        return _OP_SETS[implementation].channel_mean(x, rows, statistic)  # (mean, negative)

    @staticmethod
    def save(ctx, inputs, output) -> None:
        x, stats_fraction, statistic, _ = inputs
        # x itself, not its shape: sizes kept on ctx would be symbols of the forward's graph
        # under torch.compile(dynamic=True), which the backward's graph cannot use.
        ctx.save_for_backward(x)
        ctx.stats_fraction = float(stats_fraction)
        ctx.negative_flags = _negative_flags(statistic, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero gradient built for the flags

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, _grad_negative: None):
        if grad_mean is None:  # the mean did not reach the loss
            return None, None, None, None
        (x,) = ctx.saved_tensors
        return _input_gradient(grad_mean, x, ctx.stats_fraction, ctx.negative_flags), None, None, None


def _save_options(ctx, ratio: float, groups: int, mode: str, eps: float, implementation: str) -> None:
    ctx.ratio, ctx.groups, ctx.mode, ctx.eps, ctx.implementation = ratio, groups, mode, eps, implementation


def _differentiable_gradients(needs_input_grad, grad_out, out_of, operands) -> list[torch.Tensor | None]:
    """The gradients a backward returns, as a graph that autograd can differentiate again.

    For ``create_graph=True`` (gradient penalties, meta-learning): the fused backward op is not
    differentiable, so the weight transform is recomputed from ``operands`` with the reference's
    differentiable ops and its vector-Jacobian product taken by ``torch.func.vjp``; second-order
    gradients are then exact. ``out_of(*operands)`` is w''; operands whose gradient is not needed
    (``needs_input_grad`` False) give None. torch.func.vjp rather than torch.autograd.grad on the
    saved operands: the pullback of a ``torch.func.vjp`` runs this backward after its transform
    has ended, when the saved operands are no longer part of any graph.
    """
    positions = [i for i, need in enumerate(needs_input_grad[: len(operands)]) if need]

    def of_needed(*needed):
        values = list(operands)
        for i, value in zip(positions, needed):
            values[i] = value
        return out_of(*values)

    _, pullback = torch.func.vjp(of_needed, *(operands[i] for i in positions))
    grads = dict(zip(positions, pullback(grad_out)))
    return [grads.get(i) for i in range(len(operands))]


def _reference_weight(ctx) -> Callable[..., torch.Tensor]:
    from ..reference.equinorm import equinorm_weight_unchecked

    def weight_of(weight, mean, gain):
        return equinorm_weight_unchecked(weight, mean, ctx.ratio, ctx.groups, ctx.mode, gain, ctx.eps)

    return weight_of


@transformable
class _EquiNormWeight(torch.autograd.Function):
    @staticmethod
    def compute(weight, mean, gain, ratio: float, groups: int, mode: str, eps: float, implementation: str):
        return _OP_SETS[implementation].equinorm_weight(weight, mean, gain, ratio, groups, mode, eps)  # (out, stats)

    @staticmethod
    def save(ctx, inputs, output) -> None:
        weight, mean, gain, ratio, groups, mode, eps, implementation = inputs
        ctx.save_for_backward(weight, mean, gain, output[1])
        _save_options(ctx, ratio, groups, mode, eps, implementation)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero gradient built for the stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        if grad_out is None:  # w'' did not reach the loss
            return (None,) * 8
        weight, mean, gain, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            grads = _differentiable_gradients(ctx.needs_input_grad, grad_out, _reference_weight(ctx), (weight, mean, gain))
            return (*grads, None, None, None, None, None)
        ops = _OP_SETS[ctx.implementation]
        grad_weight, grad_mean, grad_gain = ops.equinorm_backward(grad_out, weight, mean, gain, stats, ctx.groups)
        return grad_weight, grad_mean.to(mean.dtype), grad_gain, None, None, None, None, None


def _forward_reference_gradients(grad_out, x, weight, mean, gain, rows, options, needs_input_grad):
    """The fused forward's gradients in (x, weight, gain) for ``create_graph=True``: autograd of the
    reference's w''(weight, means of x[:rows], gain), differentiable again. ``options``: (ratio,
    groups, mode, eps, statistic); x is None where it needs no gradient (the means are constants)."""
    from ..reference.equinorm import channel_mean_unchecked, equinorm_weight_unchecked

    ratio, groups, mode, eps, statistic = options

    def out_of(x, weight, gain):
        means = mean if x is None else channel_mean_unchecked(x[:rows], 1.0, statistic)
        return equinorm_weight_unchecked(weight, means, ratio, groups, mode, gain, eps)

    return _differentiable_gradients(needs_input_grad, grad_out, out_of, (x, weight, gain))


def reference_forward_backward(grad_out, x, weight, mean, gain, rows, ratio, groups, mode, eps, statistic,
                               output_mask) -> list[torch.Tensor]:
    """``equinorm_forward_reference_backward`` (registered as CompositeImplicitAutograd, so that its
    result stays differentiable): what the C++ autograd of ``equinorm_forward_autograd`` calls for
    ``create_graph=True``. Returns the gradients ``output_mask`` asks for, in (x, weight, gain)
    order; an operand the output does not depend on gets zeros."""
    options = (ratio, groups, mode, eps, statistic)
    grads = _forward_reference_gradients(grad_out, x, weight, mean, gain, rows, options, output_mask)
    operands = (x, weight, gain)
    return [torch.zeros_like(t) if g is None else g for t, g, need in zip(operands, grads, output_mask) if need]


@transformable
class _EquiNormForward(torch.autograd.Function):
    @staticmethod
    def compute(x, weight, gain, stats_fraction: float, ratio: float, groups: int, mode: str, eps: float,
                statistic: str, implementation: str):
        rows = _checks.stats_rows(x.shape[0], stats_fraction)
        # (out, mean, stats, negative)
        return _OP_SETS[implementation].equinorm_forward(x, rows, weight, gain, ratio, groups, mode, eps, statistic)

    @staticmethod
    def save(ctx, inputs, output) -> None:
        x, weight, gain, stats_fraction, ratio, groups, mode, eps, statistic, implementation = inputs
        _, mean, stats, negative = output
        # x (when it needs a gradient) rather than its shape: see _ChannelMean.
        ctx.save_for_backward(weight, mean, gain, stats, x if x.requires_grad else None)
        ctx.stats_fraction = float(stats_fraction)
        ctx.statistic = statistic
        ctx.negative_flags = _negative_flags(statistic, negative) if x.requires_grad else None
        _save_options(ctx, ratio, groups, mode, eps, implementation)
        ctx.mark_non_differentiable(mean, stats, negative)
        # The means are not differentiable: no zero gradient is built for them in every backward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_stats, _grad_negative):
        if grad_out is None:  # w'' did not reach the loss
            return (None,) * 10
        weight, mean, gain, stats, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            rows = None if x is None else _checks.stats_rows(x.shape[0], ctx.stats_fraction)
            options = (ctx.ratio, ctx.groups, ctx.mode, ctx.eps, ctx.statistic)
            grads = _forward_reference_gradients(grad_out, x, weight, mean, gain, rows, options, ctx.needs_input_grad)
            return (*grads, *([None] * 7))
        ops = _OP_SETS[ctx.implementation]
        grad_weight, grad_mean, grad_gain = ops.equinorm_backward(grad_out, weight, mean, gain, stats, ctx.groups)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_gradient(grad_mean, x, ctx.stats_fraction, ctx.negative_flags)
        return grad_x, grad_weight, grad_gain, None, None, None, None, None, None, None


# ---- the backend functions (semantics of reference.equinorm's *_unchecked functions) ----

def _kernel_operands(weight, gain, *others):
    """The weight in a dtype the kernels take, and the gain (ones when absent) in its accumulation dtype."""
    acc = _accumulation_dtype(weight, gain, *others)
    kernel_weight = weight if _accumulation_dtype(weight) == acc else weight.to(acc)
    if gain is None:
        kernel_gain = weight.new_ones(weight.shape[0], dtype=acc)
    else:  # .to only where it converts: even a no-op call costs a dispatch per layer call
        kernel_gain = gain if gain.dtype == acc else gain.to(acc)
    return kernel_weight, kernel_gain, acc


def builds_graph(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` must record an autograd node. Where it need not, the kernel is
    called without the autograd.Function around it (several microseconds of host time per call)."""
    return x.requires_grad and torch.is_grad_enabled()


def fused_channel_mean(implementation: str) -> Callable[[torch.Tensor, float, str], torch.Tensor]:
    def channel_mean(x: torch.Tensor, stats_fraction: float, statistic: str = "mean") -> torch.Tensor:
        if builds_graph(x):
            return apply(_ChannelMean, x, stats_fraction, statistic, implementation)[0]
        rows = _checks.stats_rows(x.shape[0], stats_fraction)
        return _OP_SETS[implementation].channel_mean(x, rows, statistic)[0]

    return channel_mean


def fused_equinorm_weight(implementation: str) -> Callable[..., torch.Tensor]:
    def equinorm_weight(weight, mean, ratio: float, groups: int, mode: str, gain, eps: float) -> torch.Tensor:
        kernel_weight, kernel_gain, acc = _kernel_operands(weight, gain, mean)
        out, _ = apply(_EquiNormWeight, kernel_weight, mean.to(acc), kernel_gain, ratio, groups, mode, eps, implementation)
        return out.to(weight.dtype)

    return equinorm_weight


def fused_equinorm_forward(implementation: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    screened = fused_equinorm_forward_screened(implementation)

    def equinorm_forward(x, stats_fraction: float, weight, ratio: float, groups: int, mode: str, gain, eps: float,
                         statistic: str = "mean"):
        out, mean, _ = screened(x, stats_fraction, weight, ratio, groups, mode, gain, eps, statistic, False)
        return out, mean

    return equinorm_forward


def fused_equinorm_forward_screened(
    implementation: str,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor, bool | None]]:
    """The fused forward with the layers' per-call value screen where the kernels run it on their
    own outputs (eager CPU calls): ``(out, mean, passed)``, passed None where it did not run (or was
    not asked for), so the caller screens."""
    unfused_mean, unfused_weight = fused_channel_mean(implementation), fused_equinorm_weight(implementation)

    def screened_forward(x, stats_fraction: float, weight, ratio: float, groups: int, mode: str, gain, eps: float,
                         statistic: str = "mean", screen: bool = True):
        kernel_weight, kernel_gain, acc = _kernel_operands(weight, gain)
        if _accumulation_dtype(x) != acc:  # the fused op wants one accumulation dtype for x and weight
            mean = unfused_mean(x, stats_fraction, statistic)
            return unfused_weight(weight, mean, ratio, groups, mode, gain, eps), mean, None
        ops = _OP_SETS[implementation]
        passed = None
        if (ops.equinorm_forward_autograd is not None and x.device.type == "cpu" and not torch.compiler.is_compiling()
                and not _checks.func_transform_active()):  # fmt: skip
            # Eager: the same kernels and gradient with the autograd glue in C++ (a layer call's
            # host time), and the value screen read from the outputs there. torch.compile traces
            # the Python wrapper, and torch.func transforms need it (they take no C++ autograd).
            rows = _checks.stats_rows(x.shape[0], stats_fraction)
            out, mean, passed = ops.equinorm_forward_autograd(
                x, rows, kernel_weight, kernel_gain, ratio, groups, mode, eps, statistic, screen
            )
            passed = passed if screen else None
        else:
            out, mean, _, _ = apply(
                _EquiNormForward, x, kernel_weight, kernel_gain, stats_fraction, ratio, groups, mode, eps, statistic,
                implementation,
            )
        if out.dtype != weight.dtype:  # a float64 gain widened the kernel: the screen must see the narrowed weight
            return out.to(weight.dtype), mean, None
        return out, mean, passed

    return screened_forward
