"""What the Triton kernels of both op families share: how they run, how their launch
configurations are tuned, and how their launchers become ``torch.ops.equinorm_kernels.triton_*`` ops.

How the kernels run is fixed when this module is imported, because ``@triton.jit`` reads
``TRITON_INTERPRET`` when it decorates a function: compiled for CUDA tensors normally, or run by
Triton's interpreter (NumPy on the host, CPU tensors accepted) when ``TRITON_INTERPRET=1`` was set
before ``equinorm_kernels`` was first imported.

Conventions of the kernels:
- Float arguments are declared ``tl.float64`` so that float64 kernels see them at full precision
  (Triton passes Python floats as float32 otherwise); kernels convert them with
  ``tl.full([], value, dtype)``, which also takes the Python floats the interpreter passes.
- Builtins (``tl.full``) rather than library functions (``tl.zeros``), and one ``tl.sum`` over a
  whole tile rather than one per axis: under the interpreter every call of a ``@triton.jit``
  function costs about half a millisecond, which the test suites pay thousands of times.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl
from triton import knobs

# True when every kernel below is an interpreted function instead of a compiled one.
INTERPRETED: bool = bool(knobs.runtime.interpret)

# EQUINORM_KERNELS_TRITON_AUTOTUNE=0 launches every kernel with its default configuration instead
# of autotuning. The configuration decides the summation order, so this also makes results
# reproducible across processes (autotuning may pick different configurations in different runs).
AUTOTUNE_ENV = "EQUINORM_KERNELS_TRITON_AUTOTUNE"
AUTOTUNE: bool = not INTERPRETED and os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"

OP_NAMESPACE = "equinorm_kernels"

if INTERPRETED:
    # The interpreter runs kernels directly on host memory; there is nothing to trace, and
    # torch.library.wrap_triton only accepts compiled kernels in some torch releases. (The name
    # stays wrap_triton: torch finds an op's kernels by looking for calls of that name.)
    def wrap_triton(kernel):
        """What torch.library.wrap_triton is for compiled kernels: here the kernel itself."""
        return kernel

else:
    from torch.library import wrap_triton  # noqa: F401 - re-exported for the launchers


def define_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable], object]:
    """Register a launcher as the op ``equinorm_kernels::<name>`` (schema inferred from its annotations).

    Compiled kernels use ``torch.library.triton_op``: the launcher doubles as the fake kernel and
    ``torch.compile`` traces through it down to the kernel launches. Interpreted kernels cannot
    run on fake tensors, so there the launcher becomes an opaque ``torch.library.custom_op``
    (same inferred schema) and the fake kernels are registered separately.
    """
    qualified = f"{OP_NAMESPACE}::{name}"
    mutates_args = tuple(mutates_args)

    def register(launcher: Callable) -> object:
        if INTERPRETED:
            return torch.library.custom_op(qualified, mutates_args=mutates_args)(launcher)
        return torch.library.triton_op(qualified, mutates_args=mutates_args)(launcher)

    return register


def autotune(configs: list[triton.Config], *, key: list[str]) -> Callable:
    """``triton.autotune`` over ``configs``, or over ``configs[0]`` alone (no benchmarking) under
    the interpreter or with EQUINORM_KERNELS_TRITON_AUTOTUNE=0.

    Only for kernels that overwrite their outputs: tuning runs a kernel several times.
    """
    return triton.autotune(configs=configs if AUTOTUNE else configs[:1], key=key)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 operands, float32 for float16/bfloat16/float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(condition: bool, message: str) -> None:
    """The ops' argument checks raise RuntimeError, as TORCH_CHECK does in the compiled ops."""
    if not condition:
        raise RuntimeError(message)


def check_device(tensor: torch.Tensor, name: str) -> None:
    """The compiled kernels need CUDA tensors; the interpreter also takes CPU tensors."""
    if tensor.device.type == "cuda" or (INTERPRETED and tensor.device.type == "cpu"):
        return
    hint = "" if INTERPRETED else " (CPU tensors run only under TRITON_INTERPRET=1, set before the first import)"
    raise RuntimeError(f"{name} is on {tensor.device}, but the Triton kernels need CUDA tensors{hint}")


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its current stream: make it the tensor's."""
    if INTERPRETED or tensor.device.type != "cuda" or not torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


# The interpreter converts float32 to bfloat16 by truncation, where the GPU rounds to nearest even.
_ROUND_BFLOAT16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def cast_rounded(value, dtype: tl.constexpr):
    """``value.to(dtype)`` rounded to nearest even on the GPU and under the interpreter alike."""
    if _ROUND_BFLOAT16_BY_HAND and dtype == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = value.to(dtype)
    return result
