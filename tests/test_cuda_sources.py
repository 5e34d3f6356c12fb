"""The CUDA sources build without a GPU: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90,
includes no torch header, and the torch glue (csrc/cuda/*.cpp) parses against torch's headers.

Runs on CPU-only machines; skipped only where nvcc (or, for the glue, a C++ compiler or the CUDA headers
c10/cuda needs) is missing. All compilers run at once in a module fixture, so the module costs about as long
as its slowest compile (about 30 s on 2 cores).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
GLUE_SOURCES = sorted(CUDA_DIR.glob("*.cpp"))
ARCHITECTURES = ("80", "90")
# What torch.utils.cpp_extension passes to nvcc for every extension (COMMON_NVCC_FLAGS), so that
# the kernels compile here as they do in the real build: no implicit half/bfloat16 conversions.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
COMPILE_TIMEOUT_S = 600
TORCH_HEADER = re.compile(r'^\s*#\s*include\s*[<"](?:torch|ATen|c10|caffe2)/[^>"]*[>"]', re.MULTILINE)
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _environment_roots() -> list[Path]:
    return [Path(os.environ[name]) for name in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(name)]


def _find_nvcc() -> str | None:
    for root in _environment_roots():
        if (root / "bin" / "nvcc").is_file():
            return str(root / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_include_dir(nvcc: str | None) -> Path | None:
    roots = _environment_roots()
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots.append(Path("/usr/local/cuda"))
    for root in roots:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(command, -1, error.stdout or "", f"timed out after {COMPILE_TIMEOUT_S} s")


def _nvcc_command(nvcc: str, source: Path, output: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    return [nvcc, "-c", "-o", str(output), "-std=c++17", "-I", str(CSRC), *TORCH_NVCC_FLAGS, *gencode, str(source)]


def _glue_setup(nvcc: str | None) -> tuple[list[str] | None, str]:
    """The g++ command prefix that parses the glue, or None and why it cannot run here."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        return None, "no C++ compiler found"
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError as error:  # pragma: no cover - torch is a test dependency
        return None, f"torch.utils.cpp_extension unavailable: {error}"
    torch_includes = [Path(p) for p in include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in torch_includes):
        return None, "this torch ships no c10/cuda headers"
    cuda_include = _cuda_include_dir(nvcc)
    if cuda_include is None:
        return None, "no CUDA toolkit headers (cuda_runtime_api.h) found; set CUDA_HOME"
    command = [compiler, "-fsyntax-only", "-std=c++17", "-I", str(CSRC)]
    # CPU builds of torch lack the generated c10/cuda/impl/cuda_cmake_macros.h; this macro makes
    # c10/cuda/CUDAMacros.h skip it (it only selects Windows DLL export attributes).
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in torch_includes):
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for include in [*torch_includes, cuda_include]:
        command += ["-isystem", str(include)]
    return command, ""


@pytest.fixture(scope="module")
def compile_results():
    """Compiles every CUDA source and parses every glue file concurrently; results keyed by file name."""
    nvcc = _find_nvcc()
    glue_command, glue_skip = _glue_setup(nvcc)
    jobs = {}
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        if nvcc is not None:
            for source in KERNEL_SOURCES:
                command = _nvcc_command(nvcc, source, Path(scratch) / f"{source.stem}.o")
                jobs[source.name] = pool.submit(_run, command)
        if glue_command is not None:
            for source in GLUE_SOURCES:
                jobs[source.name] = pool.submit(_run, [*glue_command, str(source)])
        results = {name: job.result() for name, job in jobs.items()}
    return {"nvcc": nvcc, "glue_skip": glue_skip, "results": results}


def _report(result: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(result.args)}\nexit code {result.returncode}\n{result.stderr}{result.stdout}"


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm80_and_sm90(source, compile_results):
    if compile_results["nvcc"] is None:
        pytest.skip("nvcc not found on PATH, in $CUDA_HOME/bin, $CUDA_PATH/bin or /usr/local/cuda/bin")
    result = compile_results["results"][source.name]
    assert result.returncode == 0, _report(result)


def _local_includes(path: Path) -> list[Path]:
    found = []
    for name in LOCAL_INCLUDE.findall(path.read_text()):
        for base in (path.parent, CSRC):
            candidate = base / name
            if candidate.is_file():
                found.append(candidate.resolve())
                break
    return found


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_cuda_source_includes_no_torch_header(source):
    # Follows the project's own includes too: a torch header reached through one would bring torch
    # into the nvcc translation unit just the same.
    seen, pending, offenders = set(), [source.resolve()], []
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for match in TORCH_HEADER.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
        pending.extend(_local_includes(path))
    assert not offenders, "CUDA sources must be pure CUDA (no torch/ATen/c10 headers):\n" + "\n".join(offenders)


def test_cuda_sources_exist():
    assert KERNEL_SOURCES, "no csrc/cuda/*.cu found"
    assert GLUE_SOURCES, "no csrc/cuda/*.cpp glue found"


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda p: p.name)
def test_cuda_glue_parses_against_torch_headers(source, compile_results):
    if compile_results["glue_skip"]:
        pytest.skip(compile_results["glue_skip"])
    result = compile_results["results"][source.name]
    assert result.returncode == 0, _report(result)
