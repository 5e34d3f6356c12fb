"""Turning case results into tables (text and markdown), the JSON record and PNG plots.

Speedups are ratios of medians: the baseline's median time over the provider's (above 1: faster
than the baseline). GB/s is the case's bytes moved over the median time; % of ceiling divides it
by the read ceiling: torch.sum of the case's own input, timed within the case, where the case has
it (channel_mean), else the run's "read_ceiling" case.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .._cli import finite_or_null
from .cases import COMPILED_REFERENCE, FAMILIES, READ, REFERENCE, Case, Target
from .runner import CaseResult, ProviderResult

TABLE_HEADERS = ("case", "provider", "median", "p20 - p80", "x ref", "x compiled", "GB/s", "% ceiling", "check")
TARGET_HEADERS = ("target case", "provider", "median", "measured", "goal", "met")


# ---- numbers ----------------------------------------------------------------------------------------

def read_ceiling_gbps(results: Iterable[CaseResult]) -> float | None:
    """The plain-read bandwidth of this run (the largest read_ceiling case), None when not measured."""
    ceilings = [r.gbps(READ) for r in results if r.case.family == "read_ceiling"]
    ceilings = [value for value in ceilings if value is not None]
    return max(ceilings) if ceilings else None


def case_ceiling(result: CaseResult, ceiling: float | None) -> float | None:
    """The read bandwidth a case is measured against: its own plain read of the same input when
    it has one (timed minutes closer than the run's ceiling: drift of a shared machine's bandwidth
    cancels), else the run's ceiling."""
    own = result.gbps(READ) if result.case.family != "read_ceiling" else None
    return own or ceiling


def fraction_of_ceiling(result: CaseResult, provider: str, ceiling: float | None) -> float | None:
    gbps, reference = result.gbps(provider), case_ceiling(result, ceiling)
    if gbps is None or not reference:
        return None
    return gbps / reference


@dataclass(frozen=True)
class TargetCheck:
    """One goal of a target case, for one fused provider."""

    case_id: str
    provider: str
    median: float | None
    metric: str  # "speedup over reference", "speedup over compiled reference", "fraction of read ceiling"
    measured: float | None
    goal: float
    # Why the time does not count (a failure, or a result that differs from the reference), else None.
    invalid_because: str | None = None

    @property
    def met(self) -> bool | None:
        """Never met by a provider whose result is wrong; None when nothing was measured."""
        if self.invalid_because is not None:
            return False
        return None if self.measured is None else self.measured >= self.goal

    def to_dict(self) -> dict[str, object]:
        return {"case": self.case_id, "provider": self.provider, "median_s": self.median, "metric": self.metric,
                "measured": self.measured, "goal": self.goal, "met": self.met,
                "invalid_because": self.invalid_because}  # fmt: skip


def fused_providers(result: CaseResult) -> list[str]:
    """The providers of a case that are fused backends (comparable, neither reference form)."""
    return [
        name for name, provider in result.providers.items()
        if provider.comparable and name not in (REFERENCE, COMPILED_REFERENCE)
    ]  # fmt: skip


def target_checks(results: Iterable[CaseResult], ceiling: float | None) -> list[TargetCheck]:
    """Every stated goal of every target case, for every fused provider (or the providers it names)."""
    checks = []
    for result in results:
        target = result.case.target
        if target is None:
            continue
        named = target.providers
        providers = fused_providers(result) if named is None else [name for name in named if name in result.providers]
        for provider in providers:
            checks += _checks_of(result, provider, target, ceiling)
    return checks


def _invalid_because(provider: ProviderResult) -> str | None:
    if provider.error is not None:
        return "failed"
    if provider.agrees_with_reference is False:
        return "result differs from the reference"
    return None


def _checks_of(result: CaseResult, provider: str, target: Target, ceiling: float | None) -> list[TargetCheck]:
    median = result.median(provider)
    invalid_because = _invalid_because(result.providers[provider])
    goals = (
        ("speedup over reference", target.min_speedup_over_reference, result.speedup(provider, REFERENCE)),
        ("speedup over compiled reference", target.min_speedup_over_compiled, result.speedup(provider, COMPILED_REFERENCE)),
        ("fraction of read ceiling", target.min_fraction_of_read_ceiling, fraction_of_ceiling(result, provider, ceiling)),
    )
    goals += tuple((f"speedup over {baseline}", goal, result.ratio_to(provider, baseline))
                   for baseline, goal in target.min_speedup_over_baselines)  # fmt: skip
    return [TargetCheck(result.case.id, provider, median, metric, measured, goal, invalid_because)
            for metric, goal, measured in goals if goal is not None]  # fmt: skip


# ---- formatting ------------------------------------------------------------------------------------

def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _number(value: float | None, suffix: str = "", digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}{suffix}"


def _check_text(provider: ProviderResult) -> str:
    if provider.error is not None:
        return f"FAILED: {provider.error}"
    if provider.agrees_with_reference is None:
        return "" if provider.comparable else "n/a"
    if provider.agrees_with_reference:
        return "ok"
    return f"MISMATCH (rel. err. {provider.max_relative_error:.2g})"


def _details_text(provider: ProviderResult) -> str:
    return ", ".join(f"{key} {value}" for key, value in provider.details.items())


def provider_row(result: CaseResult, name: str, ceiling: float | None) -> list[str]:
    provider = result.providers[name]
    timing = provider.timing
    spread = "-" if timing is None else f"{format_seconds(timing.p20)} - {format_seconds(timing.p80)}"
    percent = fraction_of_ceiling(result, name, ceiling)
    check = "; ".join(part for part in (_check_text(provider), _details_text(provider)) if part)
    return [
        result.case.label,
        name,
        format_seconds(provider.median),
        spread,
        _number(result.speedup(name, REFERENCE) if name != REFERENCE else None, "x"),
        _number(result.speedup(name, COMPILED_REFERENCE) if name != COMPILED_REFERENCE else None, "x"),
        _number(result.gbps(name)),
        _number(None if percent is None else 100 * percent, "%"),
        check,
    ]


def baseline_row(result: CaseResult, name: str) -> list[str]:
    """A row of a case compared with its own baselines (the model and host-time cases)."""
    provider = result.providers[name]
    timing = provider.timing
    spread = "-" if timing is None else f"{format_seconds(timing.p20)} - {format_seconds(timing.p80)}"
    ratios = [_number(result.ratio_to(name, baseline), "x") for baseline in result.case.ratio_baselines]
    return [result.case.label, name, format_seconds(provider.median), spread, *ratios, _check_text(provider)]


def family_headers(results: Sequence[CaseResult], family: str) -> tuple[str, ...]:
    """The columns of a family's table: the ratio columns name the family's baselines where it has its own."""
    baselines = next((r.case.ratio_baselines for r in results if r.case.family == family), None)
    if baselines is None:
        return TABLE_HEADERS
    return ("case", "provider", "median", "p20 - p80", *(f"x {baseline}" for baseline in baselines), "check")


def family_rows(results: Sequence[CaseResult], family: str, ceiling: float | None) -> list[list[str]]:
    rows = []
    for result in results:
        if result.case.family == family:
            row = provider_row if result.case.ratio_baselines is None else (lambda r, n, _: baseline_row(r, n))
            rows += [row(result, name, ceiling) for name in result.providers]
    return rows


def target_rows(checks: Sequence[TargetCheck]) -> list[list[str]]:
    rows = []
    for check in checks:
        as_percent = check.metric == "fraction of read ceiling"
        scale, suffix = (100.0, "%") if as_percent else (1.0, "x")
        measured = None if check.measured is None else scale * check.measured
        met = {True: "yes", False: "NO", None: "?"}[check.met]
        if check.invalid_because is not None:
            met = f"NO ({check.invalid_because})"
        goal = f">= {_number(scale * check.goal, suffix)} ({check.metric})"
        rows.append([check.case_id, check.provider, format_seconds(check.median), _number(measured, suffix), goal, met])
    return rows


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a rule under the headers."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (headers, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def families_in(results: Sequence[CaseResult]) -> list[str]:
    present = {result.case.family for result in results}
    return [family for family in FAMILIES if family in present]


def report_sections(results: Sequence[CaseResult], ceiling: float | None) -> list[tuple[str, str, Sequence[str], list[list[str]]]]:
    """(title, explanation, headers, rows) of the targets table, then one table per family."""
    sections = []
    checks = target_checks(results, ceiling)
    if checks:
        sections.append(("targets", "the stated goals, read off the cases below", TARGET_HEADERS, target_rows(checks)))
    for family in families_in(results):
        sections.append((family, FAMILIES[family], family_headers(results, family), family_rows(results, family, ceiling)))
    return sections


Section = tuple[str, str, Sequence[str], list[list[str]]]


def text_report(results: Sequence[CaseResult], ceiling: float | None, header: str, extra_sections: Sequence[Section] = ()) -> str:
    parts = [header]
    for title, explanation, headers, rows in [*report_sections(results, ceiling), *extra_sections]:
        parts.append(f"== {title}: {explanation}\n{text_table(headers, rows)}")
    return "\n\n".join(parts)


def markdown_report(results: Sequence[CaseResult], ceiling: float | None, title: str, header_lines: Sequence[str],
                    plots: Sequence[Path] = (), plots_relative_to: Path | None = None,
                    extra_sections: Sequence[Section] = ()) -> str:  # fmt: skip
    parts = [f"# {title}", "\n".join(f"- {line}" for line in header_lines)]
    for name, explanation, headers, rows in [*report_sections(results, ceiling), *extra_sections]:
        parts.append(f"## {name}\n\n{explanation}.\n\n{markdown_table(headers, rows)}")
    if plots:
        links = [_relative(path, plots_relative_to) for path in plots]
        parts.append("## Plots\n\n" + "\n\n".join(f"![{Path(link).stem}]({link})" for link in links))
    return "\n\n".join(parts) + "\n"


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


# ---- JSON ----------------------------------------------------------------------------------------

def provider_record(result: CaseResult, name: str, ceiling: float | None) -> dict[str, object]:
    provider = result.providers[name]
    record: dict[str, object] = {
        "median_s": None, "p20_s": None, "p80_s": None, "samples": 0, "method": None,
        **(provider.timing.to_dict() if provider.timing is not None else {}),
    }  # fmt: skip
    percent = fraction_of_ceiling(result, name, ceiling)
    record.update(
        ratio_to_reference=result.speedup(name, REFERENCE),
        ratio_to_compiled_reference=result.speedup(name, COMPILED_REFERENCE),
        gbps=result.gbps(name),
        percent_of_read_ceiling=None if percent is None else 100 * percent,
        comparable=provider.comparable,
        agrees_with_reference=provider.agrees_with_reference,
        max_relative_error=provider.max_relative_error,
        error=provider.error,
        details=provider.details,
    )
    if result.case.ratio_baselines is not None:  # speedups over the case's own baselines, same mode
        record["ratios"] = {baseline: result.ratio_to(name, baseline) for baseline in result.case.ratio_baselines}
    return record


def case_record(result: CaseResult, ceiling: float | None) -> dict[str, object]:
    case: Case = result.case
    target = None if case.target is None else {
        "description": case.target.description,
        "min_speedup_over_reference": case.target.min_speedup_over_reference,
        "min_speedup_over_compiled_reference": case.target.min_speedup_over_compiled,
        "min_fraction_of_read_ceiling": case.target.min_fraction_of_read_ceiling,
        "min_speedup_over_baselines": dict(case.target.min_speedup_over_baselines),
        "providers": None if case.target.providers is None else list(case.target.providers),
    }  # fmt: skip
    return {
        "id": case.id,
        "family": case.family,
        "label": case.label,
        "params": dict(case.params),
        "bytes_moved": case.bytes_moved,
        "target": target,
        "ratio_baselines": None if case.ratio_baselines is None else list(case.ratio_baselines),
        "providers": {name: provider_record(result, name, ceiling) for name in result.providers},
    }


def json_record(results: Sequence[CaseResult], ceiling: float | None, environment: dict[str, object],
                settings: dict[str, object], wall_seconds: float,
                extra_sections: Sequence[Section] = ()) -> dict[str, object]:  # fmt: skip
    """Everything a run produced: environment, settings, the ceiling, targets, every case and the extra tables."""
    return finite_or_null({
        "tables": [{"title": title, "explanation": explanation, "headers": list(headers), "rows": rows}
                   for title, explanation, headers, rows in extra_sections],
        "environment": environment,
        "settings": settings,
        "families": {family: FAMILIES[family] for family in families_in(results)},
        "read_ceiling_gbps": ceiling,
        "targets": [check.to_dict() for check in target_checks(results, ceiling)],
        "cases": [case_record(result, ceiling) for result in results],
        "wall_seconds": wall_seconds,
    })  # fmt: skip


def write_json(path: Path, record: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


# ---- plots ----------------------------------------------------------------------------------------

def write_plots(results: Sequence[CaseResult], ceiling: float | None, directory: Path, title_suffix: str) -> list[Path]:
    """One speedup-over-reference bar chart per family, and a bandwidth chart for the statistics pass."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for family in families_in(results):
        family_results = [r for r in results if r.case.family == family]
        if family == "read_ceiling" or any(r.case.ratio_baselines is not None for r in family_results):
            continue  # no reference to plot speedups over: the tables carry these families
        path = directory / f"{family}.png"
        if _plot_speedups(family_results, family, path, title_suffix):
            written.append(path)
        if family == "channel_mean":
            path = directory / "channel_mean_bandwidth.png"
            _plot_bandwidth(family_results, ceiling, path, title_suffix)
            written.append(path)
    return written


def _plot_speedups(results: Sequence[CaseResult], family: str, path: Path, title_suffix: str) -> bool:
    """Grouped bars: one group per case, one bar per provider, height = reference median / provider median."""
    import matplotlib.pyplot as plt

    providers = [name for name in _provider_names(results) if name != REFERENCE]
    if not providers:
        return False
    labels = [result.case.label for result in results]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(providers)) ** 0.5 + 2), 4.8))
    width = 0.8 / len(providers)
    any_wrong = False
    for index, name in enumerate(providers):
        heights = [result.speedup(name, REFERENCE) or 0.0 for result in results]
        positions = [case + (index - (len(providers) - 1) / 2) * width for case in range(len(labels))]
        bars = axes.bar(positions, heights, width, label=name)
        for bar, result in zip(bars, results):
            provider = result.providers.get(name)
            if provider is not None and provider.agrees_with_reference is False:
                bar.set_hatch("xx")  # a wrong result: its speed means nothing
                any_wrong = True
    axes.axhline(1.0, color="black", linewidth=0.8)
    goals = {r.case.target.min_speedup_over_reference for r in results if r.case.target is not None}
    for goal in sorted(goal for goal in goals if goal is not None):
        axes.axhline(goal, color="gray", linestyle="--", linewidth=1, label=f"target {goal:g}x (target cases)")
    axes.set_yscale("log")
    axes.set_ylabel("speedup over the reference (eager), x")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    warning = "\nhatched bars: the result differs from the reference" if any_wrong else ""
    axes.set_title(f"{family}: speedup over the reference {title_suffix}{warning}", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _plot_bandwidth(results: Sequence[CaseResult], ceiling: float | None, path: Path, title_suffix: str) -> None:
    """GB/s of every provider per input size, with the read ceiling and 80% of it as lines."""
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda result: result.case.bytes_moved or 0)
    sizes = [(result.case.bytes_moved or 0) / 2**20 for result in ordered]
    figure, axes = plt.subplots(figsize=(7.0, 4.8))
    for name in _provider_names(ordered):
        points = [(size, result.gbps(name)) for size, result in zip(sizes, ordered) if result.gbps(name) is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=name)
    if ceiling:
        axes.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"read ceiling {ceiling:.3g} GB/s")
        axes.axhline(0.8 * ceiling, color="gray", linestyle=":", linewidth=1, label="80% of the ceiling")
    axes.set_xscale("log")
    axes.set_xlabel("input size, MiB (fp32)")
    axes.set_ylabel("GB/s (input bytes / median time)")
    axes.set_title(f"channel statistics bandwidth {title_suffix}", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _provider_names(results: Sequence[CaseResult]) -> list[str]:
    """Providers in order of first appearance, only those with a measured time somewhere."""
    names: dict[str, None] = {}
    for result in results:
        for name, provider in result.providers.items():
            if provider.timing is not None:
                names.setdefault(name)
    return list(names)
