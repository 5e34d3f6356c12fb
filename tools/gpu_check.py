"""Everything a GPU machine should check, in one command that finishes in under 9 minutes.

    python tools/gpu_check.py OUT_DIR [--dry-run]        (make gpu-check OUT=OUT_DIR)

Steps, each with a time budget, run in order whatever the previous ones gave (a failed build
leaves the later steps to report the missing extension):

    build      the extension with CUDA for sm_90, MAX_JOBS=16, in place
    tests      the whole suite natively (CUDA and Triton backends, torch.compile, CUDA graphs), JUnit XML
    sanitizer  compute-sanitizer memcheck, then racecheck, on tests/test_cuda_kernel_set.py
    bench      equinorm-bench --quick on the GPU, JSON and markdown

Everything it writes goes into OUT_DIR, at most eight files: summary.txt (device, versions,
commit, each step's status and time), build.log, tests.log, tests.xml, sanitizer.log, bench.log,
bench.json, bench.md. Exit status 0 only when every step passed. ``--dry-run`` prints the plan and
checks it (budgets, files) without running anything.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 530  # under 9 minutes with the summary written
MAX_FILES = 8
KERNEL_SET = "tests/test_cuda_kernel_set.py"


@dataclass
class Step:
    name: str
    commands: list[list[str]]  # run one after another into the same log; the step fails if any does
    budget_s: float
    log: str
    environment: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # files the commands write into the output folder themselves


@dataclass
class Outcome:
    name: str
    status: str  # "passed", "failed (exit N)", "timed out after N s", "not run (...)"
    seconds: float


def plan(out_dir: Path, python: str = sys.executable) -> list[Step]:
    """The steps of a GPU check writing into ``out_dir``."""
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") is not None else []
    sanitizer = ["compute-sanitizer", "--error-exitcode", "97", "--print-limit", "20"]
    return [
        Step("build", [[python, "setup.py", "build_ext", "--inplace"]], 150, "build.log",
             {"MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0", "EQUINORM_KERNELS_CUDA": "1"}),
        # The CPU execution of the .cu files and their nvcc compile are CI's (and the build's) work.
        Step("tests", [[*pytest, *workers, "tests", "--ignore=tests/test_cuda_emulation.py",
                        "--ignore=tests/test_cuda_sources.py", f"--junitxml={out_dir / 'tests.xml'}"]],
             170, "tests.log", outputs=("tests.xml",)),
        # The caching allocator hides out-of-bounds accesses inside its blocks from memcheck.
        Step("sanitizer", [[*sanitizer, "--tool", tool, *pytest, KERNEL_SET] for tool in ("memcheck", "racecheck")],
             130, "sanitizer.log", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        Step("bench", [[python, "-m", "equinorm_kernels.bench", "--quick", "--device", "cuda",
                        "--json", str(out_dir / "bench.json"), "--markdown", str(out_dir / "bench.md")]],
             80, "bench.log", outputs=("bench.json", "bench.md")),
    ]


def check_plan(steps: list[Step]) -> list[str]:
    """What is wrong with a plan: over budget, too many files, a missing test file."""
    problems = []
    total = sum(step.budget_s for step in steps)
    if total > TOTAL_BUDGET_S:
        problems.append(f"budgets add up to {total} s, over {TOTAL_BUDGET_S} s")
    files = ["summary.txt"] + [name for step in steps for name in (step.log, *step.outputs)]
    if len(files) > MAX_FILES or len(set(files)) != len(files):
        problems.append(f"{len(files)} output files {files}: at most {MAX_FILES}, all distinct")
    if not (ROOT / KERNEL_SET).is_file():
        problems.append(f"{KERNEL_SET} is missing")
    return problems


def run_step(step: Step, out_dir: Path, deadline: float) -> Outcome:
    """Runs a step's commands into its log, killing them when its budget or the deadline runs out."""
    start = time.monotonic()
    stop_at = min(start + step.budget_s, deadline)
    environment = {**os.environ, **step.environment, "PYTHONUNBUFFERED": "1"}
    with open(out_dir / step.log, "w") as log:
        for command in step.commands:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                return Outcome(step.name, f"timed out after {time.monotonic() - start:.0f} s", time.monotonic() - start)
            process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # with every process it started (compilers, workers)
                process.wait()
                log.write(f"\n[killed: the step's budget of {step.budget_s:.0f} s ran out]\n")
                return Outcome(step.name, f"timed out after {time.monotonic() - start:.0f} s", time.monotonic() - start)
            if code != 0:
                return Outcome(step.name, f"failed (exit {code})", time.monotonic() - start)
    return Outcome(step.name, "passed", time.monotonic() - start)


def environment_lines(python: str = sys.executable) -> list[str]:
    """Device, versions and commit, read in a child process (the build may not have run yet)."""
    probe = (
        "import torch, sys\n"
        "name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'\n"
        "try:\n    import triton; tv = triton.__version__\nexcept ImportError:\n    tv = 'none'\n"
        "print(f'device: {name}'); print(f'torch: {torch.__version__} (CUDA {torch.version.cuda})')\n"
        "print(f'triton: {tv}'); print(f'python: {sys.version.split()[0]}')\n"
    )
    lines = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False).stdout.splitlines()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    local = " (with local changes)" if changed.stdout.strip() else ""
    return lines + [f"commit: {commit.stdout.strip() or 'unknown'}{local}"]


def write_summary(out_dir: Path, header: list[str], outcomes: list[Outcome]) -> None:
    rows = [f"{o.name:<10} {o.status:<28} {o.seconds:6.1f} s" for o in outcomes]
    (out_dir / "summary.txt").write_text("\n".join(header + [""] + rows) + "\n")


def run(out_dir: Path, steps: list[Step], header: list[str], budget_s: float = TOTAL_BUDGET_S) -> int:
    """Runs every step (each within its budget and the overall one); 0 when all passed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    outcomes = []
    for step in steps:
        outcome = run_step(step, out_dir, deadline)
        outcomes.append(outcome)
        print(f"gpu-check: {outcome.name}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)
        write_summary(out_dir, header, outcomes)  # kept current, in case the machine goes away
    return 0 if all(o.status == "passed" for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the logs and results (created)")
    parser.add_argument("--dry-run", action="store_true", help="print and check the plan, run nothing")
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    steps = plan(out_dir)
    problems = check_plan(steps)
    if args.dry_run:
        for step in steps:
            settings = " ".join(f"{k}={v}" for k, v in step.environment.items())
            print(f"{step.name} (budget {step.budget_s:.0f} s, log {step.log}){': ' + settings if settings else ''}")
            for command in step.commands:
                print(f"    {' '.join(command)}")
        print("\n".join(f"problem: {p}" for p in problems) or "plan ok")
        return 1 if problems else 0
    if problems:
        print("\n".join(f"gpu-check: {p}" for p in problems), file=sys.stderr)
        return 2
    return run(out_dir, steps, environment_lines())


if __name__ == "__main__":
    sys.exit(main())
