"""Which implementation runs an op: a small registry of backends with one entry per implementation.

Each backend provides ``channel_mean(x, stats_fraction, statistic)``, ``equinorm_weight(weight,
mean, ratio, groups, mode, gain, eps)`` and ``equinorm_forward(x, stats_fraction, weight, ratio,
groups, mode, gain, eps, statistic) -> (weight'', mean)`` (both at once, fused where the backend can) with the semantics of
:mod:`equinorm_kernels.reference`, and optionally the ENorm cycle. Arguments reach a backend
already validated. ``"auto"`` takes the first available backend in ``AUTO_PREFERENCE`` that serves
the tensor's device, so the fused kernels win wherever they exist: on a GPU the CUDA extension,
else Triton. The choice never depends on timings unless asked for: with
``EQUINORM_KERNELS_GPU_BACKEND=fastest``, "auto" measures which of the two is faster for each call
signature (:class:`FastestBackend`), which makes the kernel that runs, and so its summation order,
depend on the run.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _checks, reference
from ._tap_geometry import TapGeometry
from .reference.tap_statistics import tap_mean_unchecked as _reference_tap_mean

# Fastest first; names not registered in this build are skipped.
AUTO_PREFERENCE = ("cuda", "triton", "cpp", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    # Device types served (torch.device.type), or None for every device.
    device_types: frozenset[str] | None
    # Whether the backend can run in this process (extension built, triton importable, ...).
    is_usable: Callable[[], bool]
    channel_mean: Callable[..., torch.Tensor]
    equinorm_weight: Callable[..., torch.Tensor]
    equinorm_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # One sequential ENorm cycle (equinorm_kernels.enorm.sequential's signature), None: the reference loop.
    enorm_cycle: Callable[..., torch.Tensor | None] | None = None
    # Device types "auto" may pick it for (None: all it serves); a backend can serve a device for
    # testing only, as Triton's interpreter serves CPU tensors.
    auto_device_types: frozenset[str] | None = None
    # tap_mean(x, stats_fraction, geometry: TapGeometry) -> (C, *kernel) per-tap means; None: the reference's.
    tap_mean: Callable[..., torch.Tensor] | None = None
    # equinorm_forward with the value screen run by the kernels where they can: (w'', mean, passed),
    # passed None where it did not run; None: the caller screens every call.
    equinorm_forward_screened: Callable[..., tuple[torch.Tensor, torch.Tensor, bool | None]] | None = None
    # A conv or Linear layer's whole training forward in one call (the equinorm_conv_train_forward
    # and equinorm_linear_train_forward ops of csrc/ops.cpp: w'', the running mean's update, the
    # layer's op), for eager calls; None: the layer makes those steps itself.
    conv_train_forward: Callable[..., tuple[torch.Tensor, bool]] | None = None
    linear_train_forward: Callable[..., tuple[torch.Tensor, bool]] | None = None

    def serves(self, device: torch.device) -> bool:
        in_scope = self.device_types is None or device.type in self.device_types
        return in_scope and self.is_usable()

    def auto_serves(self, device: torch.device) -> bool:
        in_scope = self.auto_device_types is None or device.type in self.auto_device_types
        return in_scope and self.serves(device)


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make a backend selectable by name (and by ``"auto"`` if its name is in AUTO_PREFERENCE)."""
    _REGISTRY[backend.name] = backend


def _as_device(device: torch.device | str | torch.Tensor) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device, a device string or a tensor, got {device!r}") from error


def available_backends(device: torch.device | str | torch.Tensor = "cpu") -> list[str]:
    """Names of the backends usable for tensors on ``device``, fastest first; always has "reference"."""
    device = _as_device(device)
    ordered = [name for name in AUTO_PREFERENCE if name in _REGISTRY]
    ordered += [name for name in _REGISTRY if name not in ordered]
    return [name for name in ordered if _REGISTRY[name].serves(device)]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that runs on ``device`` for the ``backend=`` argument ``name``: the reference
    while forward-mode AD runs (``torch.func.jvp``, ``jacfwd``, ``hessian``, or a
    ``torch.autograd.forward_ad`` dual level). Tangents pass only through PyTorch ops, and the
    fused ops would drop them; the reference is the same math in PyTorch ops."""
    backend = _named_backend(name, device)
    if _checks.forward_ad_active():
        return _REGISTRY["reference"]
    return backend


def _named_backend(name: str, device: torch.device) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        if device.type != "cuda":  # nothing is measured or forced off CUDA: the first that serves
            first = _first_auto_backend(device)
            if first is not None:
                return first
        candidates = [_REGISTRY[n] for n in available_backends(device) if _REGISTRY[n].auto_serves(device)]
        return _auto_backend(candidates, device)
    backend = _REGISTRY.get(name)
    if backend is None:
        known = ", ".join(repr(n) for n in ("auto", *_REGISTRY))
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    if not backend.serves(device):
        usable = ", ".join(repr(n) for n in available_backends(device))
        raise ValueError(f"backend {name!r} is not available for tensors on {device}; available there: {usable}")
    return backend


def _first_auto_backend(device: torch.device) -> Backend | None:
    """The backend "auto" takes on ``device`` when nothing is measured: the first in
    ``available_backends`` order that auto-serves it (the same choice, without building the list).

    Remembered per device type together with the registry it was chosen from (every layer call
    asks); any change to the registry, a registration or a test's patch, chooses again."""
    snapshot = tuple(_REGISTRY.values())
    remembered = _FIRST_AUTO.get(device.type)
    if remembered is not None and remembered[0] == snapshot:
        return remembered[1]
    chosen = None
    for name in (*AUTO_PREFERENCE, *_REGISTRY):
        backend = _REGISTRY.get(name)
        if backend is not None and backend.auto_serves(device):
            chosen = backend
            break
    _FIRST_AUTO[device.type] = (snapshot, chosen)
    return chosen


# device type -> (the registry's backends when chosen, the backend "auto" chose)
_FIRST_AUTO: dict[str, tuple[tuple[Backend, ...], Backend | None]] = {}

_CPU = torch.device("cpu")


def cpu_train_forward(name: str, field: str) -> Callable[..., tuple[torch.Tensor, bool]] | None:
    """The whole-layer training forward ``field`` ("conv_train_forward" or "linear_train_forward")
    of the backend that ``name`` resolves to for CPU tensors (None where it has none). Remembered
    per name and field together with the registry it was resolved from: every training call of a
    layer asks. None under forward-mode AD (see resolve_backend), and not remembered then."""
    if _checks.forward_ad_active():
        return None
    snapshot = tuple(_REGISTRY.values())
    remembered = _CPU_TRAIN_FORWARD.get((name, field))
    if remembered is not None and remembered[0] == snapshot:
        return remembered[1]
    run = getattr(resolve_backend(name, _CPU), field)
    _CPU_TRAIN_FORWARD[(name, field)] = (snapshot, run)
    return run


# (backend name, field) -> (the registry's backends when resolved, its whole-layer forward for CPU tensors)
_CPU_TRAIN_FORWARD: dict[tuple[str, str], tuple[tuple[Backend, ...], Callable[..., tuple[torch.Tensor, bool]] | None]] = {}


# ---- "auto" on a GPU: the faster of the CUDA extension and Triton, measured ----

# Backends "auto" chooses between on a CUDA device (the first present, or the fastest measured).
MEASURED_BACKENDS = ("cuda", "triton")
# Set to a name in MEASURED_BACKENDS to make "auto" use that backend, or to MEASURE_CHOICE to time them.
FORCE_ENV = "EQUINORM_KERNELS_GPU_BACKEND"
MEASURE_CHOICE = "fastest"


class CudaEventTimer:
    """Times the work a block enqueues on the current CUDA stream; reading it synchronises."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.current_stream(device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __enter__(self) -> CudaEventTimer:
        self.start.record(self.stream)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end.record(self.stream)

    def elapsed_ms(self) -> float:
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


def _signature(value: Any) -> Any:
    """What identifies a call for timing purposes: shapes, dtypes and strides of tensors, plain
    values as they are, and other objects (ENorm's channel groups) by identity."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, tuple(value.stride()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, TapGeometry):  # a new one every call, equal ones for equal convolutions
        return ("tap_geometry", _signature(dataclasses.astuple(value)))
    return ("object", id(value))


@dataclass
class _Trials:
    """The measurements of one call signature: timers per candidate, then the winner."""

    calls: int = 0
    timers: list[list[Any]] = field(default_factory=list)
    winner: int | None = None


class FastestBackend:
    """Runs every call on one of several backends with identical semantics, the fastest measured.

    Calls are told apart by op and signature (device, shapes, dtypes, strides, options). The first
    ``len(candidates) * (warmup + trials)`` calls with a new signature go round-robin over the
    candidates: each candidate's first ``warmup`` calls are not timed (they compile and autotune
    kernels), the next ``trials`` are timed with ``timer_factory`` (CUDA events by default). After
    the last of them the candidate with the smallest median time runs every later call with that
    signature, for the life of the process. Each call runs exactly once, on one candidate, so
    in-place ops (the ENorm cycle) and autograd behave as with a single backend; only the forward
    call is timed (its backward runs on the same backend). Inside ``torch.compile`` and while the
    current CUDA stream is being captured into a graph nothing is timed: a decided winner is
    used, else the first candidate.
    """

    def __init__(
        self,
        candidates: tuple[Backend, ...],
        *,
        warmup: int = 1,
        trials: int = 3,
        timer_factory: Callable[[torch.device], Any] = CudaEventTimer,
    ) -> None:
        if len(candidates) < 2:
            raise ValueError("FastestBackend needs at least two candidates")
        self.candidates = candidates
        self.warmup, self.trials = warmup, trials
        self.timer_factory = timer_factory
        self._trials: dict[Any, _Trials] = {}

    def winner(self, op: str, device: torch.device, *args: Any) -> str | None:
        """The backend chosen for this call signature, or None while it is being measured."""
        state = self._trials.get((op, device, _signature(args)))
        return None if state is None or state.winner is None else self.candidates[state.winner].name

    def run(self, op: str, device: torch.device, *args: Any) -> Any:
        """``getattr(backend, op)(*args)`` on the backend this call signature is given."""
        if torch.compiler.is_compiling() or _capturing(device):
            state = self._trials.get((op, device, _signature(args)))
            chosen = state.winner if state is not None and state.winner is not None else 0
            return getattr(self.candidates[chosen], op)(*args)
        state = self._trials.setdefault((op, device, _signature(args)), _Trials())
        if state.winner is not None:
            return getattr(self.candidates[state.winner], op)(*args)
        if not state.timers:
            state.timers = [[] for _ in self.candidates]
        index, round_ = state.calls % len(self.candidates), state.calls // len(self.candidates)
        state.calls += 1
        function = getattr(self.candidates[index], op)
        if round_ < self.warmup:
            result = function(*args)
        else:
            timer = self.timer_factory(device)
            with timer:
                result = function(*args)
            state.timers[index].append(timer)
        if state.calls == len(self.candidates) * (self.warmup + self.trials):
            medians = [statistics.median(t.elapsed_ms() for t in timers) for timers in state.timers]
            state.winner = medians.index(min(medians))
            state.timers = []
        return result

    def as_backend(self) -> Backend:
        """A Backend whose functions dispatch through :meth:`run`."""
        names = ",".join(b.name for b in self.candidates)
        cycles = [b for b in self.candidates if b.enorm_cycle is not None]

        def entry(op: str) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                return self.run(op, _device_of(args), *args)

            return call

        enorm_cycle = None
        if len(cycles) == len(self.candidates):
            enorm_cycle = entry("enorm_cycle")
        elif cycles:
            enorm_cycle = cycles[0].enorm_cycle
        return Backend(
            name=f"fastest({names})",
            device_types=frozenset({"cuda"}),
            is_usable=lambda: True,
            channel_mean=entry("channel_mean"),
            equinorm_weight=entry("equinorm_weight"),
            equinorm_forward=entry("equinorm_forward"),
            enorm_cycle=enorm_cycle,
            tap_mean=entry("tap_mean") if all(b.tap_mean is not None for b in self.candidates) else None,
        )


def _capturing(device: torch.device | None) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph (no timing then)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _device_of(args: tuple[Any, ...]) -> torch.device | None:
    """The device of the first tensor in ``args`` (ENorm's cycle: of its first producer weight)."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.device
    groups = args[0] if args and isinstance(args[0], tuple) else ()
    return groups[0].producers[0].weight.device if groups else None


# One measuring backend per set of candidates (Backend objects: re-registering one starts afresh).
_FASTEST: dict[tuple[Backend, ...], Backend] = {}


def _auto_backend(candidates: list[Backend], device: torch.device) -> Backend:
    """The first candidate; on CUDA the MEASURED_BACKEND named by FORCE_ENV, or with
    FORCE_ENV=fastest the measured choice between those present."""
    measured = tuple(b for b in candidates if b.name in MEASURED_BACKENDS)
    forced = os.environ.get(FORCE_ENV, "").strip()
    if device.type != "cuda" or len(measured) < 2 or not forced:
        return candidates[0]
    if forced != MEASURE_CHOICE:
        for backend in measured:
            if backend.name == forced:
                return backend
        names = ", ".join(repr(name) for name in (*(b.name for b in measured), MEASURE_CHOICE))
        raise ValueError(f"{FORCE_ENV}={forced!r} names no backend available on {device}; use one of {names}")
    if measured not in _FASTEST:
        _FASTEST[measured] = FastestBackend(measured).as_backend()
    return _FASTEST[measured]


def _reference_equinorm_forward(x, stats_fraction, weight, ratio, groups, mode, gain, eps, statistic="mean"):
    # The means feed the weight math in its float64 (dL/dmu can overflow float32 where dL/dx does not).
    wide_mean = reference.equinorm.channel_mean_unchecked(
        x, stats_fraction, statistic, dtype=reference.equinorm.WEIGHT_MATH_DTYPE
    )
    out = reference.equinorm.equinorm_weight_unchecked(weight, wide_mean, ratio, groups, mode, gain, eps)
    return out, wide_mean.to(reference.equinorm._accumulation_dtype(x))


register_backend(
    Backend(
        name="reference",
        device_types=None,
        is_usable=lambda: True,
        channel_mean=reference.equinorm.channel_mean_unchecked,
        equinorm_weight=reference.equinorm.equinorm_weight_unchecked,
        equinorm_forward=_reference_equinorm_forward,
        tap_mean=_reference_tap_mean,
    )
)
