"""Builds the compiled extension ``equinorm_kernels._C``.

C++ sources under csrc/ are always compiled. CUDA sources under csrc/cuda/ are compiled only when
torch is a CUDA build and a CUDA toolkit is found; otherwise the build says so and goes on with the
CPU parts. Environment variables:

  EQUINORM_KERNELS_CPP=0      build no extension at all (pure-PyTorch reference backend only)
  EQUINORM_KERNELS_CUDA=0|1   force the CUDA sources off, or on (an error if they cannot be built)
  TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "8.0;9.0")
  EQUINORM_KERNELS_DEBUG=1    compile with -O0 -g
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cuda_decision(torch_module, cuda_home: str | None) -> tuple[bool, str]:
    forced = _flag("EQUINORM_KERNELS_CUDA")
    if forced is False:
        return False, "EQUINORM_KERNELS_CUDA=0"
    reasons = []
    if torch_module.version.cuda is None:
        reasons.append(f"torch {torch_module.__version__} is not a CUDA build")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons and forced:
        sys.exit("equinorm-kernels: EQUINORM_KERNELS_CUDA=1 but " + "; ".join(reasons))
    return not reasons, "; ".join(reasons)


def _extensions() -> tuple[list, dict]:
    if _flag("EQUINORM_KERNELS_CPP") is False:
        print("equinorm-kernels: EQUINORM_KERNELS_CPP=0, building no compiled extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda, why_not = _cuda_decision(torch, CUDA_HOME)
    debug = bool(_flag("EQUINORM_KERNELS_DEBUG"))
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math: lets the compiler turn the kernels' sign tests into branch-free selects
    # (results are unchanged; only floating-point exception flags, which nothing reads, could differ).
    cxx_flags += ["-std=c++17", _openmp_flag(torch), "-fno-trapping-math"]
    macros = [("EQUINORM_TORCH_VERSION", f'"{torch.__version__}"')]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"equinorm-kernels: building CUDA sources for TORCH_CUDA_ARCH_LIST={arch_list}")
        macros += [("EQUINORM_WITH_CUDA", "1"), ("EQUINORM_CUDA_ARCH_LIST", f'"{arch_list}"')]
        # No --use_fast_math: its flush-to-zero and approximate division and powf would make the
        # kernels disagree with the CPU ones (a denormal channel mean read as 0), and these
        # memory-bound kernels gain nothing from it.
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3"]
        ext = CUDAExtension(
            "equinorm_kernels._C",
            sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags + ["-std=c++17"]},
        )
    else:
        print(f"equinorm-kernels: skipping compilation of CUDA extensions ({why_not}); building CPU kernels only")
        ext = CppExtension(
            "equinorm_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
