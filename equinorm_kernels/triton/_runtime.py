"""What the Triton kernels of both op families share: how they run, how their launch
configurations are tuned, and how their launchers become ``torch.ops.equinorm_kernels.triton_*`` ops.

How the kernels run is fixed when this module is imported, because ``@triton.jit`` reads
``TRITON_INTERPRET`` when it decorates a function: compiled for CUDA tensors normally, or run by
Triton's interpreter (NumPy on the host, CPU tensors accepted) when ``TRITON_INTERPRET=1`` was set
before ``equinorm_kernels`` was first imported.

Conventions of the kernels:
- No kernel takes a float argument. How a Python float reaches a kernel depends on the launch path
  (Triton's launcher honours a ``tl.float64`` annotation, Inductor's code for a traced
  ``triton_op`` passes float32 whatever the annotation, the interpreter passes the Python float),
  so a float is passed as the int64 holding its float64 bits (:func:`float64_bits`) and decoded in
  the kernel (:func:`float64_from_bits`), and a count as an int.
- An int argument may arrive as a compile-time constant (Triton's launcher, and Inductor, make an
  int equal to 1 one; the interpreter never does): kernels widen ints with ``tl.cast(n, tl.int64)``,
  which takes constants too, not with ``n.to(tl.int64)``. Products of an index and a stride into a
  tensor that may hold 2**31 or more elements are computed in int64.
- Builtins (``tl.full``) rather than library functions (``tl.zeros``), and one ``tl.sum`` over a
  whole tile rather than one per axis: under the interpreter every call of a ``@triton.jit``
  function costs about half a millisecond, which the test suites pay thousands of times.
"""
from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import torch
import triton
import triton.language as tl
from triton import knobs

# True when every kernel below is an interpreted function instead of a compiled one.
INTERPRETED: bool = bool(knobs.runtime.interpret)

# Every kernel launches with its default (first) configuration unless EQUINORM_KERNELS_TRITON_AUTOTUNE=1
# is set before the first import. The configuration decides the summation order, and autotuning
# picks by timing, so it may pick differently from one process to the next: results are
# bit-identical across runs only without it.
AUTOTUNE_ENV = "EQUINORM_KERNELS_TRITON_AUTOTUNE"
AUTOTUNE: bool = not INTERPRETED and os.environ.get(AUTOTUNE_ENV, "0").strip() == "1"

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


# Every configuration each autotuned kernel may launch with (when AUTOTUNE is set), by kernel
# function name: compile_check compiles them all, whatever this process's setting.
TUNING_CONFIGS: dict[str, list[triton.Config]] = {}


def autotune(configs: list[triton.Config], *, key: list[str]) -> Callable:
    """``triton.autotune`` over ``configs`` with EQUINORM_KERNELS_TRITON_AUTOTUNE=1, else over
    ``configs[0]`` alone (no benchmarking; always under the interpreter).

    Only for kernels that overwrite their outputs: tuning runs a kernel several times.
    """
    tune = triton.autotune(configs=configs if AUTOTUNE else configs[:1], key=key)

    def decorate(kernel):
        TUNING_CONFIGS[kernel.fn.__name__] = list(configs)
        return tune(kernel)

    return decorate


# What a size with no example value (an unbacked symbol) is planned as: a mid-sized batch.
_UNKNOWN_SIZE_HINT = 64


def size_hint(size: int | torch.SymInt) -> int:
    """``size`` as a plain int for a launch plan, without guarding on it: a symbolic size (a batch
    size under ``torch.compile(dynamic=True)``) gives its example value. A plan built from hints
    must stay correct for every value of the size (the launchers derive grids from the size itself)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else _UNKNOWN_SIZE_HINT
    return int(size)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 operands, float32 for float16/bfloat16/float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(condition: bool, message: str) -> None:
    """The ops' argument checks raise RuntimeError, as TORCH_CHECK does in the compiled ops."""
    if not condition:
        raise RuntimeError(message)


_host_tensors_stand_in = False


@contextlib.contextmanager
def host_tensors_standing_in_for_cuda() -> Iterator[None]:
    """Lets the launchers take CPU tensors with compiled kernels, for a caller that intercepts
    every kernel launch and only looks at its arguments (compile_check): nothing may run."""
    global _host_tensors_stand_in
    previous, _host_tensors_stand_in = _host_tensors_stand_in, True
    try:
        yield
    finally:
        _host_tensors_stand_in = previous


def check_device(tensor: torch.Tensor, name: str) -> None:
    """The compiled kernels need CUDA tensors; the interpreter also takes CPU tensors."""
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and (INTERPRETED or _host_tensors_stand_in)):
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


def float64_bits(value: float) -> int:
    """The bits of ``value`` as a float64, as a signed int64: how launchers pass a float."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def float64_from_bits(bits, dtype: tl.constexpr):
    """The float :func:`float64_bits` encoded, rounded to ``dtype``.

    ``bits`` arrives as an int64, as an int32 or a constant (small non-negative values, compiled),
    or as a uint32 (values in [2**31, 2**32), interpreted): widening to uint64 keeps the bits of each."""
    return tl.cast(bits, tl.uint64).to(tl.float64, bitcast=True).to(dtype)

