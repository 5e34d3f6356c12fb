"""The data checks of the public entry points (NaN/Inf operands, negative channel means), by policy.

``set_value_checks`` chooses how they run:

- ``"auto"`` (the default): tensors on the CPU are checked at the call, which raises. CUDA tensors
  are checked on the device: each call adds its operands' screens into a small flag vector
  (operations queued on the current stream, nothing copied to the host), a copy of the flags to
  pinned host memory travels behind the work, and a later call whose copy has landed raises for
  the problems it shows. Nothing ever waits for the GPU, so training steps keep the queue full and
  can be captured in CUDA graphs; :func:`check_values` reports at once (it synchronises).
- ``"sync"``: every device checked at the call (one host-device synchronisation per call on a GPU).
- ``"off"``: no checks.

None run inside ``torch.compile`` or ``torch.fx`` tracing, where data-dependent Python is not
allowed.
"""
from __future__ import annotations

import math

import torch

from . import _checks

# Device types whose checks are deferred under "auto" (tests add "cpu" to run the GPU policy on CPU tensors).
DEFERRED_DEVICE_TYPES = {"cuda"}

# The operands a deferred check screens, each a slot of the flag vector, and what a flagged slot means.
_PROBLEMS = {
    "x": "x had NaN or Inf values, or (for EquiNorm) a negative channel mean: for a signed input use "
    'statistic="abs_mean"',
    "mean": 'mean had NaN, Inf or negative values (for a signed input compute it with statistic="abs_mean")',
    "weight": "weight had NaN or Inf values",
    "gain": "gain had NaN or Inf values",
}
_SLOTS = tuple(_PROBLEMS)


def check_channel_mean(mean: torch.Tensor, sample: torch.Tensor) -> None:
    """channel_mean's check: the means of ``x`` are finite (any sign is a valid mean).

    ``sample``: the rows of x the means were taken over, to name the cause at the call.
    """
    if deferred(mean.device):
        _flags_of(mean.device).record({"x": mean})
    else:
        _checks.check_input_channel_means(sample, mean, "x")


def check_weight_operands(
    weight: torch.Tensor,
    mean: torch.Tensor,
    gain: torch.Tensor | None,
    *,
    sample: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    statistic: str = "mean",
) -> None:
    """equinorm_weight's (and the fused forward's) checks: finite weight and gain, finite
    non-negative means; ``sample``: the rows of x the means were computed from, if they were;
    ``out``: w'' already computed from them (the fused forward), which screens all three in one
    read; ``statistic``: how the means were taken ("abs_mean" means are never negative)."""
    if not deferred(weight.device):
        if out is not None:
            looks_valid = _checks.weight_transform_looks_valid(out, mean, means_may_be_negative=statistic != "abs_mean")
        else:
            looks_valid = _checks.weight_operands_look_valid(weight, mean, gain)
        if looks_valid:
            return
        if sample is not None:
            _checks.check_input_channel_means(sample, mean, "x")
        _checks.check_equinorm_weight_values(weight, mean, gain, means_of=None if sample is None else "x")
        return
    # sqrt turns a negative mean into NaN, so one finiteness screen covers both problems.
    screened = {"mean" if sample is None else "x": mean.detach().sqrt(), "weight": weight.detach()}
    if gain is not None:
        screened["gain"] = gain.detach()
    _flags_of(weight.device).record(screened)


def check_values(device: torch.device | str | None = None) -> None:
    """Report at once what the deferred checks have seen (on ``device``, or on every device).

    Waits for the device's queued work. Raises ValueError naming the operands that were bad in
    some call since the last report, and clears the record; returns None when all were good.
    """
    wanted = None if device is None else torch.device(device)
    for key, flags in list(_FLAGS.items()):
        if wanted is None or key == wanted or (wanted.index is None and key.type == wanted.type):
            flags.report_now()


def deferred(device: torch.device) -> bool:
    """Whether the checks of tensors on ``device`` run on the device and report later."""
    return deferred_for_type(device.type)


def deferred_for_type(device_type: str) -> bool:
    """:func:`deferred` for a device type."""
    return _checks.value_check_mode() == "auto" and device_type in DEFERRED_DEVICE_TYPES


class _DeviceFlags:
    """The flag vector of one device: 0 where every screened value so far was finite, NaN where not."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flags = torch.zeros(len(_SLOTS), dtype=torch.float32, device=device)
        self.slots = {name: self.flags[i] for i, name in enumerate(_SLOTS)}
        self.host = torch.zeros(len(_SLOTS), dtype=torch.float32, pin_memory=device.type == "cuda")
        # Marks the copy's arrival on the host (CPU copies land at once: no event).
        self.copy_landed = torch.cuda.Event() if device.type == "cuda" else None
        self.copy_in_flight = False

    def record(self, screened: dict[str, torch.Tensor]) -> None:
        # max |value| is NaN or Inf exactly when a value is (no overflow, unlike a sum), and
        # adding 0 * screen leaves a slot at 0 for finite screens and NaN otherwise, for good.
        # Detached: a screen of an operand that requires grad must not pull the flags into the graph.
        screens = torch._foreach_norm([tensor.detach() for tensor in screened.values()], math.inf)
        for name, screen in zip(screened, screens):
            self.slots[name].add_(screen, alpha=0)
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # event queries are illegal while capturing; a later eager call reports
        self._report_landed_copy()
        self._send_copy()

    def _report_landed_copy(self) -> None:
        if not self.copy_in_flight or (self.copy_landed is not None and not self.copy_landed.query()):
            return
        self.copy_in_flight = False
        # The host buffer is read as NumPy: no tensor op, so no synchronisation in any mode.
        self._raise_if_flagged(self.host.numpy())

    def _send_copy(self) -> None:
        if self.copy_in_flight:
            return
        self.host.copy_(self.flags, non_blocking=True)
        if self.copy_landed is not None:
            self.copy_landed.record(torch.cuda.current_stream(self.device))
        self.copy_in_flight = True

    def report_now(self) -> None:
        self.copy_in_flight = False
        self._raise_if_flagged(self.flags.cpu().numpy())

    def _raise_if_flagged(self, values) -> None:
        flagged = [_PROBLEMS[name] for name, value in zip(_SLOTS, values) if value != 0]
        if not flagged:
            return
        self.flags.zero_()
        raise ValueError(
            f"EquiNorm value checks on {self.device} (run on the device, reported here): in a call since the "
            f"last report, {'; '.join(flagged)}. ek.set_value_checks('sync') raises at the offending call "
            "instead (one host-device synchronisation per call)."
        )


_FLAGS: dict[torch.device, _DeviceFlags] = {}


def _flags_of(device: torch.device) -> _DeviceFlags:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    flags = _FLAGS.get(device)
    if flags is None:
        flags = _FLAGS[device] = _DeviceFlags(device)
    return flags
