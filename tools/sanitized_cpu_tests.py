"""The C++ CPU kernel tests against an AddressSanitizer + UndefinedBehaviorSanitizer build.

    python3 tools/sanitized_cpu_tests.py [--tree DIR] [--keep] [-- PYTEST_ARGS...]

Copies the repository (tracked and unignored files) into a temporary directory, builds
equinorm_kernels._C there with EQUINORM_KERNELS_SANITIZE=address,undefined (CPU kernels only,
-O1 -g), and runs the CPU kernel tests on it with the ASan runtime preloaded into Python. The
shared checkout and its editable install are never rebuilt. ``--tree DIR`` builds and tests DIR as
it is instead of a fresh copy (a modified copy of the sources, say). Exit status 0 only when the
build succeeded, the tests passed and no sanitizer report was written by any process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = [
    "tests/test_ops_equinorm.py",
    "tests/test_ops_enorm.py",
    "tests/test_cpp_properties.py",
    "tests/test_per_tap_means.py",
    "tests/test_tap_mean.py",
    "tests/test_extreme_scales.py",
    "tests/test_enorm_extreme_scales.py",
]
REPORT_PREFIX = "sanitizer-report"


def copy_repository(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():  # a tracked file deleted in the working tree is still listed
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def preloaded_runtimes() -> list[str]:
    """The ASan runtime the compiler links against, which must be the first library the process
    loads, then libstdc++: Python does not link it, and ASan finds the real __cxa_throw (which
    its interceptor calls when a kernel's TORCH_CHECK throws) only in libraries loaded before it
    starts."""
    compiler = os.environ.get("CXX", "g++")
    paths = []
    for library in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([compiler, f"-print-file-name={library}"], check=True, capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            sys.exit(f"sanitized_cpu_tests: {compiler} has no {library} (got {path!r}); install the compiler's runtime libraries")
        paths.append(path)
    return paths


def build(tree: Path) -> None:
    environment = {**os.environ, "EQUINORM_KERNELS_SANITIZE": "address,undefined"}
    environment.pop("EQUINORM_KERNELS_CUDA", None)  # the sanitizer build has no CUDA part
    environment.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=environment, check=True)


def sanitized_environment(reports: Path) -> dict[str, str]:
    # Reports go to files (one per process, subprocesses included; printed at the end), so a
    # report fails the run even where a test or pytest itself would swallow the process's exit status.
    # detect_leaks=0: CPython and torch keep allocations alive until exit by design.
    asan_options = ["detect_leaks=0", "halt_on_error=1", "abort_on_error=0", f"log_path={reports / REPORT_PREFIX}"]
    ubsan_options = ["print_stacktrace=1", "halt_on_error=1", f"log_path={reports / REPORT_PREFIX}"]
    environment = {
        **os.environ,
        "LD_PRELOAD": " ".join(filter(None, [*preloaded_runtimes(), os.environ.get("LD_PRELOAD", "")])),
        "ASAN_OPTIONS": ":".join(asan_options),
        "UBSAN_OPTIONS": ":".join(ubsan_options),
        # Set (to 0), tests/conftest.py leaves Triton's interpreter off, so the kernel tests run the
        # sanitized "cpp" backend only instead of also running the interpreted Triton kernels.
        "TRITON_INTERPRET": "0",
    }
    return environment


def check_loaded_build(tree: Path, environment: dict[str, str]) -> None:
    """Refuse to test anything but the sanitized extension of ``tree`` (not an installed one)."""
    probe = (
        "import equinorm_kernels, equinorm_kernels._extension as e; "
        "assert e.compiled is not None, e.load_error; print(e.compiled.__file__)"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=environment, capture_output=True, text=True)
    if loaded.returncode != 0 or not Path(loaded.stdout.strip()).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"sanitized_cpu_tests: the sanitized extension of {tree} is not the one loaded:\n{loaded.stdout}{loaded.stderr}")


def run_tests(tree: Path, pytest_args: list[str]) -> int:
    reports = Path(tempfile.mkdtemp(prefix="equinorm-sanitizer-reports-"))
    try:
        environment = sanitized_environment(reports)
        check_loaded_build(tree, environment)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS, *pytest_args]
        status = subprocess.run(command, cwd=tree, env=environment).returncode
        written = sorted(reports.glob(f"{REPORT_PREFIX}*"))
        for report in written:
            print(f"\n===== {report.name} =====\n{report.read_text(errors='replace')}", file=sys.stderr)
        if written:
            print(f"sanitized_cpu_tests: {len(written)} sanitizer report(s)", file=sys.stderr)
            return status or 1
        return status
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, help="build and test this copy of the sources as it is")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()

    if args.tree is not None and args.tree.resolve() == ROOT:
        sys.exit("sanitized_cpu_tests: --tree must be a copy: building here would replace the checkout's extension")
    tree = args.tree or Path(tempfile.mkdtemp(prefix="equinorm-sanitized-"))
    started = time.monotonic()
    try:
        if args.tree is None:
            copy_repository(tree)
        try:
            build(tree)
        except subprocess.CalledProcessError as error:
            print(f"sanitized_cpu_tests: the sanitizer build failed (exit status {error.returncode})", file=sys.stderr)
            return 1
        built = time.monotonic()
        print(f"sanitized_cpu_tests: built in {built - started:.0f} s in {tree}", flush=True)
        status = run_tests(tree, args.pytest_args)
        print(f"sanitized_cpu_tests: tests exited {status} after {time.monotonic() - built:.0f} s", flush=True)
        return status
    finally:
        if args.tree is None and not args.keep:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
