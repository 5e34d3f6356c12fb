"""``equinorm-bench`` (or ``python -m equinorm_kernels.bench``): the microbenchmarks.

Runs every case on one device with every provider side by side, prints the tables (the targets
first), and optionally writes the JSON record (``--json``), a markdown report (``--markdown``) and
PNG plots (``--plot``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from .. import __version__, _checks, available_backends, build_info, set_value_checks
from .._cli import positive_float, positive_int
from ..backends import resolve_backend
from . import allocator
from .cases import FAMILIES, REFERENCE, BuildContext, Case, cases_for
from .communication import communication_section
from .report import (
    json_record,
    markdown_report,
    read_ceiling_gbps,
    text_report,
    write_json,
    write_plots,
)
from .runner import AGREEMENT_TOLERANCE, CaseResult, run_case
from .timing import TimingSettings, triton_do_bench

PROGRAM = "equinorm-bench"
TIMING_PRESETS = {
    "tiny": TimingSettings(min_run_time=0.0, min_samples=1, max_run_time=1.0, warmup_calls=0),
    "quick": TimingSettings(min_run_time=0.1, min_samples=5, max_run_time=0.5, warmup_calls=0, rounds=2),
    "full": TimingSettings(min_run_time=0.5, min_samples=7, max_run_time=5.0, warmup_calls=2, rounds=3),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    preset = "tiny" if args.smoke else "quick" if args.quick else "full"
    cases = cases_for(preset, args.families, device_type=listed_device_type(parser, args.device))
    if args.list:
        print("\n".join(f"{case.id}{'  [target]' if case.target else ''}" for case in cases))
        return 0
    device = resolve_device(parser, args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator_setting = allocator.keep_freed_memory() if args.allocator == "reuse" else None
    context = build_context(parser, device, args)
    settings = timing_settings(preset, args.min_run_time)
    with value_checks(args.value_checks):
        environment = environment_record(device, context)
        header = header_lines(environment, preset, settings, allocator_setting)
        print("\n".join(header), file=sys.stderr, flush=True)
        start = time.perf_counter()
        results = run_all(cases, context, settings)
        wall_seconds = time.perf_counter() - start
        record_settings = run_settings(preset, settings, context, arguments, allocator_setting)
    write_outputs(args, results, environment, record_settings, header, wall_seconds)
    return 0


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """The public functions' data checks on (their default policy) or off for the run, as they were afterwards."""
    before = _checks.value_check_mode()
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(before)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Microbenchmarks of the EquiNorm and ENorm kernels: every fused backend next to the "
        "pure-PyTorch reference, torch.compile of the reference and the usual conv + norm layers.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="the target cases and a few sizes (about 1.2 minutes on 2 CPU cores)")  # fmt: skip
    parser.add_argument("--device", help="cpu, cuda or cuda:N [cuda when available, else cpu]")
    parser.add_argument("--threads", type=positive_int, metavar="N", help=f"torch CPU threads [{torch.get_num_threads()}]")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                        help=f"only these case families, from: {', '.join(FAMILIES)}")  # fmt: skip
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="fused backends to time [every available one that serves the device outside testing]")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="4-D inputs and weights in channels_last")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    parser.add_argument("--value-checks", action="store_true",
                        help="keep the data checks (NaN/Inf, negative means) of the public functions on; "
                        "off by default, as torch.compile of the reference has none")  # fmt: skip
    parser.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                        help="reuse: keep host memory freed between repetitions in the process (glibc), so "
                        "output buffers do not page-fault anew every call; default: the C library's own "
                        "behaviour [reuse]")  # fmt: skip
    parser.add_argument("--min-run-time", type=positive_float, metavar="S",
                        help="seconds of measurement per provider at least [0.1 with --quick, else 0.5]")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the JSON record here")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write a markdown report here")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into this directory")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    # Tiny sizes and a single sample: checks the whole pipeline in seconds (used by the tests).
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    return parser


def listed_device_type(parser: argparse.ArgumentParser, name: str | None) -> str:
    """The device type whose cases run (the model cases differ): named ones are listed even where
    they cannot run, so ``--list --device cuda`` shows a GPU run's cases on any machine."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        parser.error(f"--device: not a device: {name!r}")


def resolve_device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: not a device: {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or on this machine")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: only cpu and cuda are benchmarked, got {name!r}")
    return device


def benchmarked_backends(device: torch.device) -> tuple[str, ...]:
    """The fused backends worth timing on ``device``: every available one but the reference, less those
    that serve the device for testing only (Triton's interpreter on CPU: timing it says nothing)."""
    return tuple(
        name for name in available_backends(device)
        if name != REFERENCE and resolve_backend(name, device).auto_serves(device)
    )  # fmt: skip


def build_context(parser: argparse.ArgumentParser, device: torch.device, args: argparse.Namespace) -> BuildContext:
    fused = benchmarked_backends(device)
    if args.backends is not None:
        usable = set(available_backends(device)) - {REFERENCE}
        unusable = [name for name in args.backends if name not in usable]
        if unusable:
            parser.error(f"--backends: {', '.join(unusable)} not available on {device}; available: {', '.join(sorted(usable)) or 'none'}")
        fused = tuple(dict.fromkeys(args.backends))
    return BuildContext(
        device=device,
        fused_backends=fused,
        compile_reference=not args.no_compile,
        compile_backend=args.compile_backend,
        channels_last=args.channels_last,
    )


def timing_settings(preset: str, min_run_time: float | None) -> TimingSettings:
    settings = TIMING_PRESETS[preset]
    if min_run_time is None:
        return settings
    return TimingSettings(min_run_time, settings.min_samples, max(settings.max_run_time, 4 * min_run_time),
                          settings.warmup_calls, settings.rounds)  # fmt: skip


def run_all(cases: Sequence[Case], context: BuildContext, settings: TimingSettings) -> list[CaseResult]:
    """Every case in turn, with a progress bar on stderr."""
    results = []
    for case in _progress(cases):
        results.append(run_case(case, context, settings))
    return results


def _progress(cases: Sequence[Case]) -> Iterable[Case]:
    """tqdm over the cases when it is installed, else one line per case."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(cases)
    bar = tqdm(cases, desc="cases", unit="case", file=sys.stderr, dynamic_ncols=True)
    return _with_postfix(bar)


def _with_postfix(bar: Iterable[Case]) -> Iterable[Case]:
    for case in bar:
        bar.set_postfix_str(case.id)
        yield case


def _plain_progress(cases: Sequence[Case]) -> Iterable[Case]:
    for index, case in enumerate(cases, start=1):
        print(f"[{index}/{len(cases)}] {case.id}", file=sys.stderr, flush=True)
        yield case


# ---- environment and settings ------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return getattr(triton, "__version__", "unknown")


def git_commit() -> str:
    """HEAD of the checkout this package is imported from, "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return completed.stdout.strip() if completed.returncode == 0 and completed.stdout.strip() else "unknown"


def git_has_local_changes() -> bool | None:
    root = Path(__file__).resolve().parents[2]
    try:
        command = ["git", "status", "--porcelain", "--untracked-files=no"]
        completed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(completed.stdout.strip()) if completed.returncode == 0 else None


def environment_record(device: torch.device, context: BuildContext) -> dict[str, object]:
    """What the numbers depend on: device, versions, commit, threads, time."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "fresh_page_us": round(allocator.fresh_page_microseconds(), 3),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "gpu_timer": "triton.testing.do_bench" if device.type == "cuda" and triton_do_bench() else None,
        "equinorm_kernels": __version__,
        "extension": build_info(),
        "fused_backends": list(context.fused_backends),
        "git_commit": git_commit(),
        "git_local_changes": git_has_local_changes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_settings(
    preset: str, settings: TimingSettings, context: BuildContext, arguments: Sequence[str], allocator_setting: str | None
) -> dict[str, object]:
    return {
        "command": shlex.join([PROGRAM, *arguments]),
        "preset": preset,
        "dtype": "float32",
        "memory_format": "channels_last" if context.channels_last else "contiguous (NCHW)",
        "compiled_reference": f"torch.compile(backend={context.compile_backend!r}, dynamic=False), compiled once per case"
        if context.compile_reference else None,
        "value_checks": _checks.value_checks_active(),
        "host_allocator": allocator_setting or "the C library's default",
        "timing": {"min_run_time_s": settings.min_run_time, "min_samples": settings.min_samples,
                   "max_run_time_s": settings.max_run_time, "warmup_calls": settings.warmup_calls,
                   "interleaved_rounds_cpu": settings.rounds},
        "agreement_tolerance": AGREEMENT_TOLERANCE,
        "speedup": "baseline median / provider median",
    }  # fmt: skip


def header_lines(
    environment: dict[str, object], preset: str, settings: TimingSettings, allocator_setting: str | None
) -> list[str]:
    fused = ", ".join(environment["fused_backends"]) or "none"
    device = f"{environment['device']} ({environment['device_name']}), {environment['threads']} torch threads"
    versions = f"torch {environment['torch']}, triton {environment['triton'] or 'not installed'}"
    timing = f">= {settings.min_samples} samples and >= {settings.min_run_time} s per provider"
    if settings.rounds > 1 and environment["device"] == "cpu":
        timing += f", in {settings.rounds} interleaved rounds"
    return [
        f"{PROGRAM} ({preset}): {device}, fused backends: {fused}",
        f"{versions}, commit {environment['git_commit']}, {environment['timestamp']}",
        f"timing: median [p20 - p80] per call, {timing}; speedups are ratios of medians",
        (f"host memory: {allocator_setting or 'the C library default'}; first touch of a fresh page "
         f"{environment['fresh_page_us']:.2f} us"),
    ]


# ---- outputs ---------------------------------------------------------------------------------------

def write_outputs(
    args: argparse.Namespace,
    results: Sequence[CaseResult],
    environment: dict[str, object],
    settings: dict[str, object],
    header: Sequence[str],
    wall_seconds: float,
) -> None:
    """Print the tables; write the JSON, markdown and plots that were asked for."""
    ceiling = read_ceiling_gbps(results)
    ceiling_line = f"read ceiling: {ceiling:.3g} GB/s" if ceiling else "read ceiling: not measured"
    lines = [*header, ceiling_line, f"wall time {wall_seconds:.0f} s"]
    extra = [communication_section()] if dist.is_available() and dist.is_gloo_available() else []
    print(text_report(results, ceiling, "\n".join(lines), extra))
    plots: list[Path] = []
    if args.plot is not None:
        suffix = f"({environment['device_name']}, {environment['threads']} threads)"
        plots = write_plots(results, ceiling, args.plot, suffix)
    if args.json is not None:
        write_json(args.json, json_record(results, ceiling, environment, settings, wall_seconds, extra))
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        text = markdown_report(results, ceiling, f"{PROGRAM} results", lines, plots, args.markdown.parent, extra)
        args.markdown.write_text(text)
    written = [str(path) for path in (args.json, args.markdown) if path is not None] + [str(p) for p in plots]
    if written:
        print(f"\nwrote {', '.join(written)}")
