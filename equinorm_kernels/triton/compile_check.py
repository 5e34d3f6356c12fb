"""Compile every Triton kernel of the package for a CUDA architecture, without a GPU.

    python -m equinorm_kernels.triton.compile_check [--arch 80 90] [--quick] [--only TEXT]

Triton compiles down to a cubin on any machine (it ships ptxas), so a CPU-only machine can catch
type errors, unsupported operations and register-allocation failures in the compiled (non-
interpreter) path. Each kernel is compiled for the argument types the launchers pass it: every
input dtype, both weight layouts' constexprs and each ENorm exponent and power. Needs Triton's
compiled mode: run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _runtime, enorm, equinorm

# Pointer element types per tensor dtype, and the accumulation type each implies.
_FLOAT_TYPES = {"fp16": "fp32", "bf16": "fp32", "fp32": "fp32", "fp64": "fp64"}


def _jit_function(kernel):
    """The JITFunction under an autotuner."""
    return getattr(kernel, "fn", kernel) if not isinstance(kernel, triton.runtime.JITFunction) else kernel


def _specialisations(quick: bool) -> Iterator[tuple[str, object, dict, dict]]:
    """(label, kernel, signature, constexprs) for every variant the launchers can request."""
    types = ("bf16", "fp64") if quick else tuple(_FLOAT_TYPES)
    for dtype in types:
        acc = _FLOAT_TYPES[dtype]
        yield (f"planar channel sums {dtype}", equinorm._planar_channel_sums_kernel,
               {"x_ptr": f"*{dtype}", "sums_ptr": f"*{acc}", "rows": "i32", "channels": "i32", "spatial": "i32",
                "rows_per_split": "i32", "count": "fp64", "FINAL": "constexpr", "BLOCK_S": "constexpr",
                "TILE": "constexpr"},
               {"FINAL": False, "BLOCK_S": 256, "TILE": 2048})
        yield (f"channels_last channel sums {dtype}", equinorm._channels_last_channel_sums_kernel,
               {"x_ptr": f"*{dtype}", "sums_ptr": f"*{acc}", "channels": "i32", "positions": "i32",
                "positions_per_split": "i32", "count": "fp64", "FINAL": "constexpr", "BLOCK_C": "constexpr",
                "TILE": "constexpr"},
               {"FINAL": True, "BLOCK_C": 64, "TILE": 2048})
        row_ints = {name: "i32" for name in
                    ("group_channels", "taps", "outputs_per_group", "channel_stride", "tap_stride")}
        yield (f"weight transform {dtype}", equinorm._equinorm_weight_kernel,
               {"weight_ptr": f"*{dtype}", "mean_ptr": f"*{acc}", "gain_ptr": f"*{acc}", "out_ptr": f"*{dtype}",
                "stats_ptr": f"*{acc}", **row_ints, "exact": "i32", "ratio": "fp64", "eps": "fp64",
                "tiny": "fp64", "BLOCK_C": "constexpr", "BLOCK_T": "constexpr"},
               {"BLOCK_C": 128, "BLOCK_T": 16})
        yield (f"weight backward {dtype}", equinorm._equinorm_backward_kernel,
               {"grad_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "mean_ptr": f"*{acc}", "gain_ptr": f"*{acc}",
                "stats_ptr": f"*{acc}", "grad_weight_ptr": f"*{dtype}", "grad_gain_ptr": f"*{acc}",
                "mean_terms_ptr": f"*{acc}", **row_ints, "BLOCK_C": "constexpr", "BLOCK_T": "constexpr"},
               {"BLOCK_C": 128, "BLOCK_T": 16})
        yield (f"channel energies {dtype}", enorm._channel_energy_kernel,
               {"values_ptr": f"*{dtype}", "energy_ptr": "*fp64", "channels": "i32", "channels_per_group": "i32",
                "outer_per_group": "i32", "inner": "i32", "outer_stride": "i32", "channel_stride": "i32",
                "inner_stride": "i32", "p": "fp64", "EXPONENT": "constexpr", "ACC_FP64": "constexpr",
                "BLOCK_J": "constexpr", "BLOCK_T": "constexpr"},
               {"EXPONENT": 0 if dtype == "fp32" else 2, "ACC_FP64": dtype == "fp64", "BLOCK_J": 128, "BLOCK_T": 16})
        yield (f"rescale {dtype}", enorm._rescale_kernel,
               {"values_ptr": f"*{dtype}", "d_ptr": "*fp64", "numel": "i32", "outer_stride": "i32",
                "channel_stride": "i32", "channels_per_group": "i32", "outer_per_group": "i32",
                "POWER": "constexpr", "COLUMNS": "constexpr", "ACC_FP64": "constexpr", "BLOCK": "constexpr"},
               {"POWER": -2, "COLUMNS": True, "ACC_FP64": dtype == "fp64", "BLOCK": enorm._RESCALE_BLOCK})
    for acc in ("fp32", "fp64"):
        yield (f"finish channel means {acc}", equinorm._finish_channel_means_kernel,
               {"sums_ptr": f"*{acc}", "mean_ptr": f"*{acc}", "channels": "i32", "splits": "i32", "count": "fp64",
                "BLOCK": "constexpr"},
               {"BLOCK": 1024})
        yield (f"sum of mean terms {acc}", equinorm._sum_mean_terms_kernel,
               {"mean_terms_ptr": f"*{acc}", "grad_mean_ptr": f"*{acc}", "channels": "i32", "group_channels": "i32",
                "outputs_per_group": "i32", "BLOCK": "constexpr"},
               {"BLOCK": 1024})
    yield ("coefficients", enorm._coefficients_kernel,
           {"energy_ptr": "*fp64", "d_ptr": "*fp64", "deviation_ptr": "*fp64", "channels": "i32", "row_slots": "i32",
            "column_slots": "i32", "p": "fp64", "log_c": "fp64", "BLOCK": "constexpr"},
           {"BLOCK": 1024})


def compile_all(archs: list[int], quick: bool = False, only: str = "", verbose: bool = True) -> int:
    """Compiles every specialisation (whose label contains ``only``) for every architecture;
    returns the number of failures."""
    if _runtime.INTERPRETED:
        raise RuntimeError("the kernels were defined for Triton's interpreter: run without TRITON_INTERPRET")
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for label, kernel, signature, constexprs in _specialisations(quick):
            if only not in label:
                continue
            start = time.perf_counter()
            try:
                triton.compile(ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs),
                               target=target)
                status = "ok"
            except Exception as error:  # report every failure, not only the first
                failures += 1
                status = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if verbose:
                print(f"sm_{arch}  {label:<36} {time.perf_counter() - start:6.2f} s  {status}", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--quick", action="store_true", help="only bfloat16 and float64 inputs")
    parser.add_argument("--only", default="", help="only the kernels whose label contains this text")
    args = parser.parse_args(argv)
    failures = compile_all(args.arch, quick=args.quick, only=args.only)
    print(f"triton {triton.__version__}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
