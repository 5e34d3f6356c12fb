"""Builds the compiled extension ``equinorm_kernels._C``.

C++ sources under csrc/ are always compiled. CUDA sources under csrc/cuda/ are compiled only when
torch is a CUDA build and a CUDA toolkit is found; otherwise the build says so and goes on with the
CPU parts. Environment variables:

  EQUINORM_KERNELS_CPP=0      build no extension at all (pure-PyTorch reference backend only)
  EQUINORM_KERNELS_CUDA=0|1   force the CUDA sources off, or on (an error if they cannot be built)
  CUDA_HOME / CUDA_PATH       the CUDA toolkit (default: the toolkit of the nvcc on PATH, through
                              links and wrapper scripts, else /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "8.0;9.0+PTX": machine code
                              for sm_80 and sm_90, and PTX that newer GPUs compile when loading it)
  MAX_JOBS                    parallel compile jobs (ninja's default otherwise)
  EQUINORM_KERNELS_DEBUG=1    compile with -O0 -g
  EQUINORM_KERNELS_SANITIZE=address,undefined (or =1 for both, or one of them)
                              compile and link the C++ CPU kernels with -fsanitize=<list> -O1 -g
                              -fno-omit-frame-pointer -fno-sanitize-recover=all; CUDA stays off
                              (an error with EQUINORM_KERNELS_CUDA=1). With address, Python must load
                              the ASan runtime first: LD_PRELOAD="$(g++ -print-file-name=libasan.so)
                              $(g++ -print-file-name=libstdc++.so)"; tools/sanitized_cpu_tests.py
                              builds a copy this way and runs the kernel tests on it

The C++ standard is torch's choice (C++17 up to torch 2.13, C++20 from 2.14), for the C++ and the
nvcc compiles alike; the sources are written for both.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from build_tools.cuda_toolkit import Toolkit, ToolkitError, find_toolkit  # noqa: E402

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# The torch releases this package is built and tested against (pyproject.toml declares the same).
SUPPORTED_TORCH = ((2, 11), (2, 14))


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cuda_decision(torch_module) -> tuple[Toolkit | None, str]:
    """The toolkit to compile the CUDA sources with, or None and why not."""
    forced = _flag("EQUINORM_KERNELS_CUDA")
    if forced is False:
        return None, "EQUINORM_KERNELS_CUDA=0"
    if torch_module.version.cuda is None:
        why_not = f"torch {torch_module.__version__} is not a CUDA build"
    else:
        try:
            toolkit = find_toolkit()
        except ToolkitError as error:
            sys.exit(f"equinorm-kernels: {error}")
        if toolkit is not None:
            return toolkit, ""
        why_not = "no CUDA toolkit found (set CUDA_HOME to the toolkit's root directory)"
    if forced:
        sys.exit(f"equinorm-kernels: EQUINORM_KERNELS_CUDA=1 but {why_not}")
    return None, why_not


# ---- Sanitizer build (EQUINORM_KERNELS_SANITIZE) ------------------------------------------------

SANITIZERS = ("address", "undefined")


def _sanitizers() -> str:
    """The -fsanitize= list EQUINORM_KERNELS_SANITIZE asks for, "" for none."""
    value = os.environ.get("EQUINORM_KERNELS_SANITIZE", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return ""
    if value in ("1", "true", "yes", "on"):
        return ",".join(SANITIZERS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SANITIZERS]
    if unknown or not names:
        sys.exit(
            f"equinorm-kernels: EQUINORM_KERNELS_SANITIZE={value!r}: expected 1 or a comma-separated "
            f"list of {', '.join(SANITIZERS)}"
        )
    return ",".join(names)


def _sanitized_cuda_decision(sanitizers: str) -> tuple[None, str]:
    """No CUDA sources in a sanitizer build: the host sanitizers see nothing of the device code
    (tests/test_cuda_emulation.py runs the .cu kernels on the CPU under them instead)."""
    if _flag("EQUINORM_KERNELS_CUDA"):
        sys.exit("equinorm-kernels: EQUINORM_KERNELS_SANITIZE builds the CPU kernels only; unset EQUINORM_KERNELS_CUDA=1")
    return None, f"EQUINORM_KERNELS_SANITIZE={sanitizers}"


# -------------------------------------------------------------------------------------------------


def _warn_if_untested(torch_module) -> None:
    version = tuple(int(part) for part in torch_module.__version__.split("+")[0].split(".")[:2])
    low, high = SUPPORTED_TORCH
    if not low <= version <= high:
        print(
            f"equinorm-kernels: warning: torch {torch_module.__version__} is outside the tested range "
            f"{'.'.join(map(str, low))} to {'.'.join(map(str, high))}"
        )


def _extensions() -> tuple[list, dict]:
    if _flag("EQUINORM_KERNELS_CPP") is False:
        print("equinorm-kernels: EQUINORM_KERNELS_CPP=0, building no compiled extension")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    _warn_if_untested(torch)
    sanitizers = _sanitizers()
    toolkit, why_not = _sanitized_cuda_decision(sanitizers) if sanitizers else _cuda_decision(torch)
    debug = bool(_flag("EQUINORM_KERNELS_DEBUG"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    link_flags = []
    if sanitizers:
        sanitizer_flags = [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
        cxx_flags = (["-O0", "-g"] if debug else ["-O1", "-g"]) + sanitizer_flags
        link_flags = sanitizer_flags
    # -fno-trapping-math: lets the compiler turn the kernels' sign tests into branch-free selects
    # (results are unchanged; only floating-point exception flags, which nothing reads, could differ).
    cxx_flags += [_openmp_flag(torch), "-fno-trapping-math"]
    macros = [("EQUINORM_TORCH_VERSION", f'"{torch.__version__}"')]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    if toolkit is not None:
        # torch.utils.cpp_extension reads its CUDA_HOME global when it locates nvcc, the headers
        # and the libraries: point it at the toolkit found here, not at its own guess.
        cpp_extension.CUDA_HOME = toolkit.home
        os.environ["CUDA_HOME"] = toolkit.home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        summary = (
            f"CPU kernels and CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list} "
            f"(toolkit {toolkit.home}, found through {toolkit.how_found})"
        )
        macros += [("EQUINORM_WITH_CUDA", "1"), ("EQUINORM_CUDA_ARCH_LIST", f'"{arch_list}"')]
        # No --use_fast_math: its flush-to-zero and approximate division and powf would make the
        # kernels disagree with the CPU ones (a denormal channel mean read as 0), and these
        # memory-bound kernels gain nothing from it.
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3"]
        ext = cpp_extension.CUDAExtension(
            "equinorm_kernels._C",
            sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        print(f"equinorm-kernels: skipping compilation of CUDA extensions ({why_not}); building CPU kernels only")
        summary = f"CPU kernels only ({why_not})"
        ext = cpp_extension.CppExtension(
            "equinorm_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    jobs = os.environ.get("MAX_JOBS", "").strip() or "ninja's default"
    print(f"equinorm-kernels: building equinorm_kernels._C against torch {torch.__version__}: {summary}; jobs: {jobs}")
    return [ext], {"build_ext": _reporting_build_ext(cpp_extension.BuildExtension, summary)}


def _reporting_build_ext(base: type, summary: str) -> type:
    """BuildExtension that says what it built once the build succeeded."""

    class BuildExtensionWithReport(base.with_options(use_ninja=True)):
        def run(self) -> None:
            super().run()
            print(f"equinorm-kernels: built equinorm_kernels._C: {summary}")

    return BuildExtensionWithReport


def _openmp_flag(torch) -> str:
    """-fopenmp where torch runs at::parallel_for on OpenMP, else -fopenmp-simd.

    ATen's OpenMP parallel_for is a header template compiled into the extension: without -fopenmp
    its `omp parallel` is ignored and every kernel runs on one thread. Only the compile step gets
    the flag: the OpenMP calls then bind to the runtime torch already loads, never to a second one.
    -fopenmp-simd alone still vectorises the kernels' `omp simd` loops.
    """
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return "-fopenmp"
    return "-fopenmp-simd"


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
