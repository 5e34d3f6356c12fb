"""Argument validation shared by every public entry point: clear errors that name the argument."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from numbers import Real

import torch
from torch.autograd import forward_ad

# float32 first: membership tests stop at the first equal dtype, and most inputs are float32.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MODES = ("single_pass", "exact")

# EquiNorm's ratio and ENorm's c reach the kernels' float32 arithmetic multiplied by factors the
# data sets (1 / P_d; the energy ratio C_i / R_i and its powers): giving an option half of float32's
# exponent range leaves the other half to the data, so their products neither overflow nor vanish.
SCALE_OPTION_RANGE = (2.0**-63, 2.0**63)

VALUE_CHECK_MODES = ("auto", "sync", "off")
_value_check_mode = "auto"


def set_value_checks(mode: bool | str = "auto") -> None:
    """How the data-dependent checks (NaN/Inf inputs, weights and gains; negative channel means) run.

    Args:
        mode: ``"auto"`` (the default; ``True`` means the same): CPU tensors are checked at the
            call, which raises; CUDA tensors are checked on the device without synchronising the
            host, and a later call (once its copy of the results has reached the host), or
            :func:`equinorm_kernels.check_values`, raises. ``"sync"``: every device checked at the
            call (one host-device synchronisation per call on a GPU). ``"off"`` (or ``False``): none.

    The checks never run inside ``torch.compile``/``torch.fx`` graphs, where data-dependent Python
    is not allowed, nor under ``torch.func.vmap``, which cannot read a value on the host; there
    (and when off) bad values are not reported but stay finite where the documented clamps apply.
    """
    global _value_check_mode
    if mode is True or mode is False:
        mode = "auto" if mode else "off"
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"mode must be one of {VALUE_CHECK_MODES} or a bool, got {mode!r}")
    _value_check_mode = mode


def value_check_mode() -> str:
    """The mode set by :func:`set_value_checks`: "auto", "sync" or "off"."""
    return _value_check_mode


def value_checks_active() -> bool:
    if _value_check_mode == "off":
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_scripting() or is_fx_tracing() or vmap_active())


def is_fx_tracing() -> bool:
    return _fx_tracing_probe()()


def vmap_active() -> bool:
    """Whether a torch.func.vmap is running (alone or around other transforms)."""
    if not func_transform_active():
        return False
    vmap = torch._C._functorch.TransformType.Vmap
    return any(interpreter.key() == vmap for interpreter in torch._C._functorch.get_interpreter_stack())


def forward_ad_active() -> bool:
    """Whether forward-mode AD runs (torch.func.jvp, jacfwd, hessian, or a
    torch.autograd.forward_ad dual level): its tangents pass only through PyTorch ops."""
    return forward_ad._current_level >= 0


def func_transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is running: its tensors are
    wrappers, which the C++ autograd and the host-side caches cannot take."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@functools.cache
def _fx_tracing_probe() -> Callable[[], bool]:
    """torch.fx's own test, looked up once (its name differs between torch versions)."""
    from torch.fx import _symbolic_trace

    return getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing


def stats_rows(batch: int, stats_fraction: float) -> int:
    """Samples that feed the statistics: the first ceil(stats_fraction * batch), at least one."""
    # A layer's fraction is a constant: as a plain float it keeps a symbolic batch size symbolic
    # under torch.compile(dynamic=True), where the float itself would be traced as a symbol.
    stats_fraction = float(stats_fraction)
    if stats_fraction == 1.0:
        return batch
    # The small slack keeps products like 0.14 * 50 = 7.000000000000001 from rounding up.
    return max(1, math.ceil(stats_fraction * batch - 1e-9))


def check_tensor(value: object, name: str, *, dims: str, min_dim: int, max_dim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() < min_dim or (max_dim is not None and value.dim() > max_dim):
        raise ValueError(f"{name} must have shape {dims}, got a {value.dim()}-D tensor of shape {tuple(value.shape)}")
    return value


def check_number(value: object, name: str, *, low: float, high: float = math.inf, low_inclusive: bool = False) -> float:
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces float options and shape-derived ratios as symbols:
        # testing their value would break the graph. Layers validate their options when built,
        # shape-derived values are positive by construction, and the ops check ratio and eps.
        return value
    if type(value) is float and math.isfinite(value) and (value >= low if low_inclusive else value > low) and value <= high:
        return value  # the common call, a float in range, answered without the checks below
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    if not (above and value <= high):
        bracket = "[" if low_inclusive else "("
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return value


def check_scale_option(value: object, name: str) -> float:
    """A positive factor of the kernels' float32 arithmetic (ratio, c), within SCALE_OPTION_RANGE."""
    low, high = SCALE_OPTION_RANGE
    try:
        return check_number(value, name, low=low, high=high, low_inclusive=True)
    except ValueError:
        raise ValueError(
            f"{name} must be in [2**-63, 2**63] = [{low:.6g}, {high:.6g}] so that results stay representable "
            f"in float32, got {float(value)!r}"
        ) from None


def check_same_device(reference: torch.Tensor, value: torch.Tensor, ref_name: str, name: str) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {reference.device}; put them on one device")


STATISTICS = ("mean", "abs_mean")


def check_statistic(statistic: object) -> str:
    if statistic not in STATISTICS:
        raise ValueError(
            f'statistic must be "mean" (non-negative inputs, the paper\'s) or "abs_mean" (the mean of |x|, any sign), '
            f"got {statistic!r}"
        )
    return statistic


def check_channel_mean_args(x: object, stats_fraction: object) -> float:
    x = check_tensor(x, "x", dims="(N, C, *spatial) or (N, C)", min_dim=2)
    return check_channel_mean_extent(x, stats_fraction)


def check_channel_mean_extent(x: torch.Tensor, stats_fraction: object) -> float:
    """check_channel_mean_args for an ``x`` already checked as a float tensor of 2 dims or more."""
    shape = x.shape
    if shape[0] == 0:
        raise ValueError("x has an empty batch (N = 0): channel means need at least one sample")
    if shape[1] == 0:
        raise ValueError("x has no channels (C = 0)")
    if x.numel() == 0:
        raise ValueError(f"x has an empty spatial extent {tuple(x.shape[2:])}: channel means need at least one element")
    return check_number(stats_fraction, "stats_fraction", low=0.0, high=1.0)


def check_equinorm_weight_args(
    weight: object, mean: object, ratio: object, groups: object, mode: object, gain: object, eps: object
) -> None:
    weight = check_tensor(weight, "weight", dims="(D, C/groups, *kernel) or (D, C)", min_dim=2)
    mean = check_tensor(mean, "mean", dims="(C,) or, per tap, (C, *kernel)", min_dim=1)
    check_same_device(weight, mean, "weight", "mean")
    check_weight_args(weight, mean.shape[0], "mean must have", ratio, groups, mode, gain, eps)
    if mean.dim() > 1:
        kernel = tuple(weight.shape[2:])
        if tuple(mean.shape[1:]) != kernel:
            raise ValueError(
                f"per-tap means must have shape (C, *kernel) = ({mean.shape[0]}, {', '.join(map(str, kernel))}) "
                f"for weight of shape {tuple(weight.shape)}, got mean of shape {tuple(mean.shape)}"
            )
        if float(ratio) != 1.0:
            raise ValueError(
                f"ratio must be 1 with per-tap means (they already account for padding and stride), got {ratio!r}"
            )


def check_equinorm_forward_args(
    x: object, stats_fraction: object, weight: object, ratio: object, groups: object, mode: object, gain: object, eps: object
) -> float:
    """Checks of the fused forward (x -> channel means -> weight); returns stats_fraction as a float."""
    stats_fraction = check_channel_mean_args(x, stats_fraction)
    weight = check_tensor(weight, "weight", dims="(D, C/groups, *kernel) or (D, C)", min_dim=2)
    check_same_device(weight, x, "weight", "x")
    check_weight_args(weight, x.shape[1], "x must have", ratio, groups, mode, gain, eps)
    return stats_fraction


def check_weight_args(
    weight: torch.Tensor, channels: int, channels_owner: str, ratio: object, groups: object, mode: object,
    gain: object, eps: object,
) -> None:
    """Checks of the weight and options against ``channels`` input channels (from mean or x)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    out_channels, group_channels = weight.shape[0], weight.shape[1]
    if out_channels == 0 or weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if out_channels % groups:
        raise ValueError(f"weight.shape[0] = {out_channels} output channels is not divisible by groups = {groups}")
    if channels != group_channels * groups:
        raise ValueError(
            f"{channels_owner} C = weight.shape[1] * groups = {group_channels * groups} channels "
            f"(one per input channel), got {channels}"
        )
    if math.prod(weight.shape[1:]) < 2:
        raise ValueError(
            "EquiNorm needs at least 2 weights per output channel (C/groups * kernel taps >= 2): with one weight "
            f"the mean-centred weight is identically zero; got weight of shape {tuple(weight.shape)}"
        )
    check_scale_option(ratio, "ratio")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gain is not None:
        gain = check_tensor(gain, "gain", dims=f"({out_channels},)", min_dim=1, max_dim=1)
        check_same_device(weight, gain, "weight", "gain")
        if gain.numel() != out_channels:
            raise ValueError(f"gain must have shape ({out_channels},) (one per output channel), got {tuple(gain.shape)}")
    check_number(eps, "eps", low=0.0)


def check_backend_name(backend: object) -> str:
    """Raise unless ``backend`` is "auto" or a registered backend name (usable or not on this machine)."""
    from .backends import _REGISTRY, AUTO_PREFERENCE

    known = sorted({"auto", *AUTO_PREFERENCE, *_REGISTRY})
    if not isinstance(backend, str) or backend not in known:
        raise ValueError(f"backend must be one of {known}, got {backend!r}")
    return backend


def _may_hold_non_finite(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor, True if ``tensor`` holds NaN or Inf (and, rarely, when it does not).

    A sum is NaN or Inf whenever a term is, so one read of the tensor screens it; an elementwise
    isfinite mask costs several times that on CPU. Finite values whose sum overflows also raise
    the flag: callers confirm with :func:`_non_finite_indices` before reporting.
    """
    return ~torch.isfinite(_screening_sum(tensor))


def _sum_is_finite(tensor: torch.Tensor) -> bool:
    """False if ``tensor`` holds NaN or Inf (and, rarely, when its finite values' sum overflows).

    The host-side form of :func:`_may_hold_non_finite`: one reduction and one read of the result,
    where an ``isfinite`` test of a tensor costs several ATen calls on CPU.
    """
    return math.isfinite(_screening_sum(tensor).item())


def _screening_sum(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        # float16 sums overflow at 65504; float32 accumulation keeps ordinary half tensors unflagged.
        return tensor.sum(dtype=torch.float32)
    return tensor.sum()


def weight_operands_look_valid(weight: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor | None) -> bool:
    """True when weight and gain are finite and the means finite and non-negative; a screen for the
    per-call checks: one read of the (C,) means, the weight and the gain, and one host read in all.

    False does not prove a problem (finite values whose sum overflows also give it): the caller then
    runs the detailed checks, which name the operand and position or pass.
    """
    # sqrt maps a negative mean to NaN, so one sum screens signs and finiteness together.
    screen = _screening_sum(mean.detach().sqrt()) + _screening_sum(weight)
    if gain is not None:
        screen = screen + _screening_sum(gain)
    return math.isfinite(screen.item())


def weight_transform_looks_valid(out: torch.Tensor, mean: torch.Tensor, means_may_be_negative: bool) -> bool:
    """The screen of :func:`weight_operands_look_valid` read from the fused forward's result
    ``out`` (w'') instead of its operands: a NaN or Inf in the weight, the gain or the means
    always reaches w'' (each row's shift sums mu_c * w_dc over the whole row, and the gain scales
    the row), so one read of w'' replaces reads of all three. Negative means leave w'' finite and
    are screened separately where the statistic allows them.
    """
    screen = _screening_sum(out)
    if means_may_be_negative:
        screen = screen + _screening_sum(mean.detach().sqrt())
    return math.isfinite(screen.item())


def _non_finite_indices(tensor: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(tensor.detach())).nonzero()


def _any_bad_mean(mean: torch.Tensor) -> torch.Tensor:
    mean = mean.detach()
    return (~torch.isfinite(mean) | (mean < 0)).any()


def check_finite_values(tensor: torch.Tensor, name: str, what: str) -> None:
    """Raise if ``tensor`` holds NaN or Inf (one synchronisation when it does not)."""
    if not bool(_may_hold_non_finite(tensor)):
        return
    bad = _non_finite_indices(tensor)
    if len(bad):
        raise ValueError(f"{name} contains NaN or Inf ({what}; first at index {tuple(int(i) for i in bad[0])})")


def check_input_channel_means(sample: torch.Tensor, mean: torch.Tensor, name: str = "x") -> None:
    """Raise if a channel mean of ``name`` is NaN or Inf, telling a bad input from an overflowing mean.

    ``sample``: the samples of ``name`` the means ``mean`` (C,) were taken over, (n, C, *spatial).
    """
    if _sum_is_finite(mean):
        return
    bad_channels = _non_finite_indices(mean)
    if not len(bad_channels):
        return
    bad_positions = _non_finite_indices(sample)
    if len(bad_positions):
        first = tuple(int(i) for i in bad_positions[0])
        raise ValueError(f"{name} contains NaN or Inf (its channel means are not finite; first at index {first})")
    channel = int(bad_channels[0, 0])
    raise ValueError(
        f"{name} is finite, but the mean of its input channel {channel} overflows "
        f"{str(mean.dtype).removeprefix('torch.')} (the dtype the means accumulate in): scale {name} down"
    )


def check_channel_means(mean: torch.Tensor, name: str = "mean") -> None:
    """EquiNorm's balance assumes non-negative inputs: raise on NaN/Inf or negative channel means."""
    if not bool(_any_bad_mean(mean)):
        return
    check_finite_values(mean, name, "a non-finite input gives non-finite channel means")
    first = tuple(int(i) for i in (mean.detach() < 0).nonzero()[0])  # (channel,) or (channel, *tap)
    where = f"input channel {first[0]}" + (f" at kernel tap {first[1:]}" if len(first) > 1 else "")
    raise ValueError(
        f"{name} must be non-negative: EquiNorm balances positive and negative weights against "
        f"non-negative inputs (ReLU outputs, or raw pixels in [0, 1] rather than standardised ones), "
        f"but {where} has mean {float(mean[first]):.4g}; for a signed input use "
        f'statistic="abs_mean" (the mean of |x|, never negative)'
    )


def check_equinorm_weight_values(
    weight: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor | None, *, means_of: str | None = None
) -> None:
    """Data checks of equinorm_weight's inputs with a single synchronisation when all is well.

    ``means_of``: the name of the input ``mean`` was just computed from (the fused forward's
    ``x``); non-finite means are then reported as that input's fault.
    """
    if weight_operands_look_valid(weight, mean, gain):
        return
    if means_of is not None:
        check_finite_values(mean, means_of, "its channel means are not finite")
    check_channel_means(mean)
    check_finite_values(weight, "weight", "the weight must be finite")
    if gain is not None:
        check_finite_values(gain, "gain", "the gain must be finite")
