"""Builds kernel_runner: csrc/cuda/*.cu compiled by g++ as C++ with cuda_emulation.h pre-included,
linked with kernel_runner.cpp, in one of three flavours (plain, ASan + UBSan, TSan); and
launch_plan_driver, which prints the kernels' launch plans (csrc/cuda/launch_plans.h) as JSON.

Objects and binaries are cached under build/cuda_emulation (git-ignored), named by a hash of
everything that goes into them: compiler, flags, the source and every header it can include. A
variant may replace a kernel source with other text (a copy with a planted bug); only that object
is then compiled again.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
LAYER = HERE / "cuda_emulation.h"
RUNNER_SOURCE = HERE / "kernel_runner.cpp"
PLAN_DRIVER_SOURCE = HERE / "launch_plan_driver.cpp"
PLANS_HEADER = CSRC / "cuda" / "launch_plans.h"
KERNEL_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
CACHE = ROOT / "build" / "cuda_emulation"
CACHE_KEEP_S = 7 * 24 * 3600
COMPILE_TIMEOUT_S = 600

# As torch.utils.cpp_extension compiles the kernels: no implicit half/bfloat16 conversions.
TORCH_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)
FLAVOURS = {
    "plain": ("-O2",),
    "asan": ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
    "tsan": ("-O1", "-g", "-fsanitize=thread"),
}
# The first report ends the run with a non-zero exit code.
SANITIZER_ENVIRONMENT = {
    "ASAN_OPTIONS": "detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1",
}


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Toolchain:
    compiler: str
    cuda_include: Path
    identity: str  # the compiler's version line, part of every cache key


@dataclass(frozen=True)
class Variant:
    flavour: str
    replaced: tuple[tuple[str, str], ...] = ()  # (kernel file name, source text used instead)


def _cuda_include() -> Path | None:
    homes = [Path(os.environ[name]) for name in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(name)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(Path(nvcc).resolve().parent.parent)
    homes.append(Path("/usr/local/cuda"))
    for home in homes:
        for include in [home / "include", *sorted(home.glob("targets/*/include"))]:
            if (include / "cuda_fp16.h").is_file() and (include / "cuda_runtime.h").is_file():
                return include
    return None


def find_toolchain() -> tuple[Toolchain | None, str]:
    """g++ and the CUDA headers, or None and why they cannot be used here."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None, "g++ not found on PATH"
    include = _cuda_include()
    if include is None:
        return None, "no CUDA headers (cuda_runtime.h, cuda_fp16.h) in $CUDA_HOME, $CUDA_PATH, nvcc's or /usr/local/cuda"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()
    return Toolchain(compiler, include, version[0] if version else compiler), ""


def _digest(*parts: str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode())
        hasher.update(b"\0")
    return hasher.hexdigest()[:20]


def _headers_text() -> str:
    headers = sorted([*(CSRC / "cuda").glob("*.cuh"), *(CSRC / "cuda").glob("*.h"), *(CSRC / "shared").glob("*.h")])
    return "".join(f"{path.name}\n{path.read_text()}" for path in headers)


@dataclass(frozen=True)
class _Object:
    source: Path
    command: tuple[str, ...]
    path: Path


def _kernel_object(toolchain: Toolchain, flavour: str, name: str, text: str | None, headers: str) -> _Object:
    """The object of csrc/cuda/<name>, or of `text` standing in for it (kept in the cache for its reports)."""
    flags = FLAVOURS[flavour]
    source = CSRC / "cuda" / name
    key = _digest(toolchain.identity, *flags, LAYER.read_text(), headers, text or source.read_text())
    if text is not None:
        source = CACHE / "sources" / f"{Path(name).stem}-{key}.cu"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(text)
    command = (
        toolchain.compiler, "-std=c++17", *flags, "-x", "c++", "-include", str(LAYER), "-I", str(CSRC),
        "-isystem", str(toolchain.cuda_include), *TORCH_DEFINES, "-c", str(source),
    )
    return _Object(source, command, CACHE / "objects" / f"{flavour}-{Path(name).stem}-{key}.o")


def _runner_object(toolchain: Toolchain, flavour: str, headers: str) -> _Object:
    flags = FLAVOURS[flavour]
    key = _digest(toolchain.identity, *flags, headers, RUNNER_SOURCE.read_text())
    command = (
        toolchain.compiler, "-std=c++17", *flags, "-I", str(CSRC), "-isystem", str(toolchain.cuda_include),
        "-c", str(RUNNER_SOURCE),
    )
    return _Object(RUNNER_SOURCE, command, CACHE / "objects" / f"{flavour}-kernel_runner-{key}.o")


def _run(command: list[str], output: Path) -> None:
    """Runs a compiler command writing to `output`, through a temporary name so no half file is ever cached."""
    partial = output.with_name(f"{output.name}.{os.getpid()}.partial")
    try:
        result = subprocess.run(
            [*command, "-o", str(partial)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        raise BuildError(f"$ {' '.join(command)}\ntimed out after {COMPILE_TIMEOUT_S} s") from error
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"$ {' '.join(command)}\nexit code {result.returncode}\n{result.stderr}{result.stdout}")
    os.replace(partial, output)


def _objects(toolchain: Toolchain, variant: Variant, headers: str) -> list[_Object]:
    replaced = dict(variant.replaced)
    unknown = set(replaced) - {source.name for source in KERNEL_SOURCES}
    if unknown:
        raise BuildError(f"no kernel source named {sorted(unknown)} in csrc/cuda")
    kernels = [
        _kernel_object(toolchain, variant.flavour, source.name, replaced.get(source.name), headers)
        for source in KERNEL_SOURCES
    ]
    return [*kernels, _runner_object(toolchain, variant.flavour, headers)]


def build(toolchain: Toolchain, variants: list[Variant]) -> dict[Variant, Path]:
    """The kernel_runner of every variant, compiling what the cache lacks in parallel."""
    headers = _headers_text()
    objects = {variant: _objects(toolchain, variant, headers) for variant in variants}
    missing = {o.path: o for parts in objects.values() for o in parts if not o.path.exists()}
    (CACHE / "objects").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for job in [pool.submit(_run, list(o.command), o.path) for o in missing.values()]:
            job.result()
    runners = {}
    for variant, parts in objects.items():
        key = _digest(*(o.path.name for o in parts))
        runner = CACHE / "bin" / f"kernel_runner-{variant.flavour}-{key}"
        if not runner.exists():
            runner.parent.mkdir(parents=True, exist_ok=True)
            _run([toolchain.compiler, *FLAVOURS[variant.flavour], *(str(o.path) for o in parts)], runner)
        runners[variant] = runner
    _prune({path for parts in objects.values() for o in parts for path in (o.path, o.source)} | set(runners.values()))
    return runners


def _prune(used: set[Path]) -> None:
    """Marks `used` as fresh and deletes what no build has used for a week (earlier versions of the sources)."""
    for path in used:
        if path.is_relative_to(CACHE):
            os.utime(path)
    stale_before = time.time() - CACHE_KEEP_S
    for directory in ("objects", "bin", "sources"):
        for path in (CACHE / directory).glob("*"):
            with contextlib.suppress(FileNotFoundError):  # another session may prune at the same time
                if path.stat().st_mtime < stale_before:
                    path.unlink()


def build_plan_driver() -> Path:
    """launch_plan_driver: the plans of csrc/cuda/launch_plans.h (plain C++, no CUDA header needed) as JSON."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise BuildError("g++ not found on PATH")
    flags = ("-std=c++17", "-O1", "-Wall", "-Werror")
    key = _digest(compiler, *flags, PLANS_HEADER.read_text(), PLAN_DRIVER_SOURCE.read_text())
    driver = CACHE / "bin" / f"launch_plan_driver-{key}"
    if not driver.exists():
        driver.parent.mkdir(parents=True, exist_ok=True)
        _run([compiler, *flags, "-I", str(CSRC), str(PLAN_DRIVER_SOURCE)], driver)
    _prune({driver})
    return driver


def planted(source_name: str, original: str, replacement: str) -> tuple[str, str]:
    """(source name, text) of csrc/cuda/<source_name> with `original`, found exactly once, replaced."""
    text = (CSRC / "cuda" / source_name).read_text()
    if text.count(original) != 1:
        raise BuildError(f"the text a planted bug replaces is not found exactly once in {source_name}:\n{original}")
    return source_name, text.replace(original, replacement)


def run_runner(runner: Path, manifest: Path, output_directory: Path, timeout_s: float) -> subprocess.CompletedProcess:
    output_directory.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **SANITIZER_ENVIRONMENT}
    return subprocess.run(
        [str(runner), str(manifest), str(output_directory)], capture_output=True, text=True, timeout=timeout_s,
        env=environment,
    )
