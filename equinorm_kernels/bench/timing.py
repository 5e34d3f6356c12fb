"""Timing one callable: warm-up, then medians and p20/p80 over many samples.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (it sets the thread count for the
measurement and picks how many calls one block holds), repeated until enough blocks are in.
GPU: ``triton.testing.do_bench`` (CUDA events, L2 flush between calls) when triton imports, else
the same Timer, which synchronises the device around every block.
Calls too slow for blocks of several (and work that must start from a restored state each
repetition) are timed one call per sample, the restore untimed before it.
"""
from __future__ import annotations

import math
import timeit
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.timer import (
    timer as synchronized_clock,  # waits for the GPU, if any
)

# A provider slower than max_run_time still gets this many samples, for p20/p80.
MIN_SLOW_SAMPLES = 3


@dataclass(frozen=True)
class TimingSettings:
    """How long to measure one provider of one case.

    Attributes:
        min_run_time: seconds of measured calls to collect at least (per provider).
        min_samples: samples (blocks) to collect at least, so p20/p80 mean something.
        max_run_time: seconds after which a slow provider stops collecting samples.
        warmup_calls: untimed calls before measuring (the first call of a compiled function compiles).
        rounds: CPU: the providers of a case are timed in this many interleaved rounds, so a drift of
            the machine's speed during the case reaches every provider alike.
    """

    min_run_time: float = 0.5
    min_samples: int = 7
    max_run_time: float = 20.0
    warmup_calls: int = 2
    rounds: int = 1

    def per_round(self) -> TimingSettings:
        """The budget of one of ``rounds`` interleaved rounds (the samples of all rounds are pooled)."""
        return TimingSettings(self.min_run_time / self.rounds, math.ceil(self.min_samples / self.rounds),
                              self.max_run_time / self.rounds, self.warmup_calls, 1)  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the 20th/80th percentiles over ``samples`` samples."""

    median: float
    p20: float
    p80: float
    samples: int
    method: str

    def to_dict(self) -> dict[str, object]:
        return {"median_s": self.median, "p20_s": self.p20, "p80_s": self.p80, "samples": self.samples,
                "method": self.method}  # fmt: skip


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``fraction`` in [0, 1]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(seconds_per_call: Sequence[float], method: str) -> Timing:
    """The :class:`Timing` of a list of per-call times."""
    return Timing(
        median=percentile(seconds_per_call, 0.5),
        p20=percentile(seconds_per_call, 0.2),
        p80=percentile(seconds_per_call, 0.8),
        samples=len(seconds_per_call),
        method=method,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def triton_do_bench() -> Callable[..., object] | None:
    """``triton.testing.do_bench`` when triton is importable, else None."""
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken: fall back to the Timer
        return None
    return do_bench


def warm_up(run: Callable[[], object], device: torch.device, calls: int) -> None:
    for _ in range(calls):
        run()
    synchronize(device)


def measure(
    run: Callable[[], object],
    device: torch.device,
    settings: TimingSettings,
    *,
    restore: Callable[[], None] | None = None,
) -> Timing:
    """Time ``run`` on ``device``; with ``restore``, every timed call starts right after an untimed restore.

    ``run`` must already have been called once (the correctness check does that), so compilation
    and lazy initialisation are not timed.
    """
    do_bench = triton_do_bench() if device.type == "cuda" and restore is None else None
    if do_bench is None:
        return summarise(*measure_samples(run, device, settings, restore=restore))
    if _is_slow(run, settings):  # the probe call was the warm-up: no second probe
        return summarise(*_measure_single_calls(run, None, settings))
    warm_up(run, device, settings.warmup_calls)
    return _measure_with_do_bench(do_bench, run, settings)


def measure_samples(
    run: Callable[[], object],
    device: torch.device,
    settings: TimingSettings,
    *,
    restore: Callable[[], None] | None = None,
) -> tuple[list[float], str]:
    """Seconds per call of ``run`` (host clock, device synchronised), and how they were taken."""
    if restore is not None or _is_slow(run, settings):
        # One call per sample already fills the time budget; the calls so far were warm-up enough.
        return _measure_single_calls(run, restore, settings)
    warm_up(run, device, settings.warmup_calls)
    return _measure_blocked(run, torch.get_num_threads(), settings)


def _is_slow(run: Callable[[], object], settings: TimingSettings) -> bool:
    """Times one call, not kept: a warm-up that also tells slow calls from fast ones."""
    single_call = timeit.Timer(run, timer=synchronized_clock).timeit(1)
    return single_call * settings.min_samples >= settings.min_run_time


def _measure_blocked(run: Callable[[], object], threads: int, settings: TimingSettings) -> tuple[list[float], str]:
    """blocked_autorange until ``min_samples`` blocks and ``min_run_time`` seconds are in."""
    timer = Timer(stmt="run()", globals={"run": run}, num_threads=threads)
    seconds_per_call: list[float] = []
    spent = 0.0
    while len(seconds_per_call) < settings.min_samples or spent < settings.min_run_time:
        measurement = timer.blocked_autorange(min_run_time=settings.min_run_time)
        seconds_per_call.extend(measurement.times)
        spent += sum(measurement.raw_times)
        if spent > settings.max_run_time:
            break
    return seconds_per_call, "torch.utils.benchmark.Timer.blocked_autorange"


def _measure_single_calls(
    run: Callable[[], object], restore: Callable[[], None] | None, settings: TimingSettings
) -> tuple[list[float], str]:
    """One call per sample, the restore (if any) untimed before it.

    Python's timeit with torch's synchronising clock: Timer.timeit would add two warm-up calls to
    every sample, which for slow calls (and restored state) costs more than the sample itself.
    """
    timer = timeit.Timer(run, setup=restore or "pass", timer=synchronized_clock)
    seconds_per_call: list[float] = []
    while len(seconds_per_call) < settings.min_samples or sum(seconds_per_call) < settings.min_run_time:
        seconds_per_call.append(timer.timeit(1))
        if sum(seconds_per_call) > settings.max_run_time and len(seconds_per_call) >= MIN_SLOW_SAMPLES:
            break
    return seconds_per_call, "one call per sample (timeit, device synchronised)"


def _measure_with_do_bench(do_bench: Callable[..., object], run: Callable[[], object], settings: TimingSettings) -> Timing:
    """CUDA events via triton.testing.do_bench; it returns milliseconds for the asked quantiles."""
    repetition_ms = max(settings.min_run_time * 1000.0, 100.0)
    median_ms, p20_ms, p80_ms = do_bench(run, warmup=25, rep=repetition_ms, quantiles=[0.5, 0.2, 0.8])
    # do_bench does not say how many calls it timed; an estimate from its time budget.
    samples = max(1, int(repetition_ms / max(median_ms, 1e-6)))
    return Timing(median_ms / 1e3, p20_ms / 1e3, p80_ms / 1e3, samples, "triton.testing.do_bench (CUDA events)")
