"""Running one case: build its providers, check each against the reference, then time it.

The check comes first and doubles as the first (compiling, lazily initialising) call. A provider
that raises, in its construction, its check or its timing, is recorded as failed with the error and
the case goes on with the others; a comparable provider whose outputs differ from the reference's
is timed but flagged, so a wrong result can never pass as a fast one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cases import (
    COMPILED_REFERENCE,
    COMPILED_SUFFIX,
    REFERENCE,
    BuildContext,
    Case,
    Provider,
    ProviderFactory,
)
from .timing import (
    Timing,
    TimingSettings,
    measure,
    measure_samples,
    summarise,
    synchronize,
)

# Largest relative difference max|a - b| / max|b| (per output tensor) that still counts as agreeing:
# fp32 kernels and the reference sum in different orders.
AGREEMENT_TOLERANCE = 1e-3


@dataclass
class ProviderResult:
    """What happened to one provider of one case."""

    name: str
    comparable: bool = True
    timing: Timing | None = None
    error: str | None = None
    max_relative_error: float | None = None
    details: dict[str, object] = field(default_factory=dict)

    @property
    def agrees_with_reference(self) -> bool | None:
        """None when there is nothing to compare (not comparable, the reference itself, or failed)."""
        if self.max_relative_error is None:
            return None
        return self.max_relative_error <= AGREEMENT_TOLERANCE

    @property
    def median(self) -> float | None:
        return None if self.timing is None else self.timing.median


@dataclass
class CaseResult:
    """Every provider of one case, in display order."""

    case: Case
    providers: dict[str, ProviderResult]

    def median(self, provider: str) -> float | None:
        result = self.providers.get(provider)
        return None if result is None else result.median

    def speedup(self, provider: str, baseline: str = REFERENCE) -> float | None:
        """baseline median / provider median (above 1: the provider is faster)."""
        mine, theirs = self.median(provider), self.median(baseline)
        if mine is None or theirs is None or mine <= 0:
            return None
        return theirs / mine

    def ratio_to(self, provider: str, baseline: str) -> float | None:
        """The speedup over ``baseline`` in the provider's own mode: a compiled provider ("<name>_compiled")
        over the baseline's compiled form where the case has it, an eager one over the eager baseline."""
        if provider.endswith(COMPILED_SUFFIX) and baseline + COMPILED_SUFFIX in self.providers:
            baseline += COMPILED_SUFFIX
        if provider == baseline:
            return None
        return self.speedup(provider, baseline)

    def gbps(self, provider: str) -> float | None:
        median = self.median(provider)
        if self.case.bytes_moved is None or median is None or median <= 0:
            return None
        return self.case.bytes_moved / median / 1e9


def relative_error(outputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The largest max|a - b| / max|b| over the output tensors (inf when shapes or counts differ)."""
    if len(outputs) != len(expected):
        return math.inf
    worst = 0.0
    for actual, wanted in zip(outputs, expected):
        if actual.shape != wanted.shape:
            return math.inf
        actual, wanted = actual.detach().double(), wanted.detach().double()
        scale = float(wanted.abs().max()) if wanted.numel() else 0.0
        difference = float((actual - wanted).abs().max()) if wanted.numel() else 0.0
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst if math.isfinite(worst) else math.inf


def describe_error(error: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def run_case(case: Case, context: BuildContext, settings: TimingSettings | None) -> CaseResult:
    """Build and check every provider of ``case``, then (unless ``settings`` is None) time them."""
    factories = case.build(context)
    # The reference runs first so the others can be compared with it.
    order = sorted(factories, key=lambda name: name != REFERENCE)
    results: dict[str, ProviderResult] = {}
    checked: dict[str, Provider] = {}
    expected: tuple[torch.Tensor, ...] | None = None
    for name in order:
        result, provider, outputs = _check_provider(name, factories[name], expected, context)
        if name == REFERENCE and outputs is not None:
            expected = outputs
        results[name] = result
        if provider is not None:
            checked[name] = provider
    if settings is not None:
        if case.rounds is not None:
            settings = dataclasses.replace(settings, rounds=case.rounds)
        _time_providers(checked, results, context.device, settings)
    return CaseResult(case, {name: results[name] for name in factories_order(order, results)})


def factories_order(order: Sequence[str], results: dict[str, ProviderResult]) -> list[str]:
    """Display order: fused backends, the reference, its compiled form, then the baselines."""
    def rank(name: str) -> int:
        return {REFERENCE: 1, COMPILED_REFERENCE: 2}.get(name, 0 if results[name].comparable else 3)

    return sorted(order, key=rank)


def _check_provider(
    name: str, factory: ProviderFactory, expected: tuple[torch.Tensor, ...] | None, context: BuildContext
) -> tuple[ProviderResult, Provider | None, tuple[torch.Tensor, ...] | None]:
    """Build and call one provider once: its result so far, the provider (None if it failed) and
    (for the reference) its outputs, cloned."""
    result = ProviderResult(name)
    try:
        provider: Provider = factory()
        result.comparable = provider.comparable
        outputs, value = first_outputs(provider, context.device)
        if provider.details is not None:
            result.details = provider.details(value)
        if name != REFERENCE and provider.comparable and expected is not None:
            result.max_relative_error = relative_error(outputs, expected)
    except Exception as error:  # one broken provider must not end the run: record it
        result.error = describe_error(error)
        return result, None, None
    return result, provider, outputs if name == REFERENCE else None


def _time_providers(
    providers: dict[str, Provider], results: dict[str, ProviderResult], device: torch.device, settings: TimingSettings
) -> None:
    """Time every checked provider. On CPU in ``settings.rounds`` interleaved rounds whose samples
    are pooled, so a slow stretch of a shared machine does not land on one provider only."""
    rounds = settings.rounds if device.type == "cpu" else 1
    samples: dict[str, list[float]] = {name: [] for name in providers}
    methods: dict[str, str] = {}
    for _ in range(rounds):
        for name, provider in providers.items():
            if results[name].error is not None:
                continue
            restore = provider.restore if provider.restore_every_run else None
            try:
                if rounds == 1:
                    results[name].timing = measure(provider.run, device, settings, restore=restore)
                    continue
                seconds, methods[name] = measure_samples(provider.run, device, settings.per_round(), restore=restore)
                samples[name] += seconds
            except Exception as error:  # recorded like a failed check; the others go on
                results[name].error = describe_error(error)
    for name, seconds in samples.items():
        if seconds and results[name].error is None:
            results[name].timing = summarise(seconds, f"{methods[name]}, {rounds} interleaved rounds")


def first_outputs(provider: Provider, device: torch.device) -> tuple[tuple[torch.Tensor, ...], object]:
    """One call from the provider's starting state: its outputs (cloned: later calls may overwrite them)
    and the raw value it returned."""
    if provider.restore is not None:
        provider.restore()
    value = provider.run()
    synchronize(device)
    outputs = tuple(tensor.detach().clone() for tensor in provider.outputs(value))
    return outputs, value
