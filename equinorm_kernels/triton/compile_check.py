"""Compile every Triton kernel of the package for CUDA architectures as a GPU run would, without one.

    python -m equinorm_kernels.triton.compile_check [--arch 80 90] [--quick] [--only TEXT] [--jobs N] [--all]

Compiled, Triton specialises a kernel on its arguments: an int equal to 1 becomes a compile-time
constant, ints and pointers that are multiples of 16 get a divisibility attribute, an int's type
follows its size and a pointer's its tensor's dtype. So a kernel can compile for some arguments and
fail for others, while the interpreter the test suite runs accepts them all. This check runs the
launchers (the ops) on CPU tensors of the shapes the test suite uses, in every dtype, with each
kernel launch intercepted; specialises each launch with Triton's own launcher code; and compiles
each distinct specialisation, with every autotuning configuration, for each architecture (Triton
ships ptxas, so no GPU is needed). Each compiled kernel is also checked for stride arguments
multiplied in 32 bits, which would wrap offsets past 2**31, and for its registers and spills (ptxas
-v on its PTX): a spill over SMALL_SPILL bytes fails unless TOLERATED_SPILLS names the kernel with
a reason, and one over SPILL_LIMIT always does. The summary prints each kernel's register range and largest spill per
architecture.

Needs Triton's compiled mode: run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
import triton
from torch import nn
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource, CompiledKernel, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from .._tap_geometry import geometry_spec
from . import _runtime, enorm, equinorm, launch_plans, tap_mean  # importing the kernel modules defines the ops
from ._row_sums import launch_row_sums

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
QUICK_DTYPES = (torch.bfloat16, torch.float64)

# Int arguments that scale an index into an offset, per kernel: each may be 2**31 or more once
# multiplied, so none may enter a 32-bit multiplication. (Offsets within one weight row stay
# int32: the launchers reject rows of 2**31 or more values.)
STRIDE_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "_planar_channel_sums_kernel": ("channels", "spatial"),
    "_channels_last_channel_sums_kernel": ("channels",),
    "_finish_channel_means_kernel": ("channels",),
    "_equinorm_weight_kernel": ("group_channels", "taps"),
    "_equinorm_backward_kernel": ("group_channels", "taps"),
    "_row_sums_kernel": ("rows", "width", "columns"),
    "_channel_energy_kernel": ("outer_stride", "channel_stride", "inner_stride"),
    "_coefficients_kernel": ("channels",),
    "_rescale_kernel": ("outer_stride", "channel_stride"),
    "_column_sums_kernel": ("width",),
    "_finish_columns_kernel": ("width",),
    "_tap_sums_kernel": ("channels", "plane"),
    "_tap_grad_kernel": ("plane",),
}


# ---------------------------------------------------------------------------------------------
# Launches and their specialisations
# ---------------------------------------------------------------------------------------------

@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel, its arguments and launch options."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    origin: str  # the sample call that made it first

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


_binders: dict[tuple[int, int], Callable] = {}


def _binder(kernel: JITFunction, backend: BaseBackend) -> Callable:
    """Triton's argument binder for ``kernel``: what its launcher runs to specialise a call."""
    key = (id(kernel), backend.target.arch)
    if key not in _binders:
        _binders[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    return _binders[key]


def backend_for(arch: int) -> BaseBackend:
    """Triton's CUDA backend for compute capability ``arch`` (80 for sm_80)."""
    return make_backend(GPUTarget("cuda", arch, 32))


def specialisation_key(launch: Launch, backend: BaseBackend) -> tuple:
    """What Triton's launcher caches a compiled kernel under: the specialisation of every argument
    (type and attribute, or constant value) and the launch options."""
    _, specialization, options = _binder(launch.kernel, backend)(*launch.args, **launch.kwargs)
    return (launch.name, tuple(specialization), tuple(sorted((k, repr(v)) for k, v in options.items())))


def compile_source(launch: Launch, backend: BaseBackend) -> tuple[ASTSource, dict]:
    """The source and options Triton's launcher would compile ``launch`` from."""
    bound, specialization, options = _binder(launch.kernel, backend)(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options)
    return ASTSource(launch.kernel, signature, constexprs, attrs), options.__dict__


def compile_launch(launch: Launch, arch: int) -> CompiledKernel:
    """``launch``'s kernel compiled for sm_``arch`` as it would be specialised on a GPU."""
    backend = backend_for(arch)
    source, options = compile_source(launch, backend)
    return triton.compile(source, target=backend.target, options=options)


def describe(launch: Launch, backend: BaseBackend) -> str:
    """The specialisation in short: pointer dtypes, constants (=), multiples of 16 (%16), options."""
    source, options = compile_source(launch, backend)
    parts = []
    for index, (name, kind) in enumerate(source.signature.items()):
        if kind == "constexpr":
            parts.append(f"{name}={source.constants[(index,)]}")
        elif kind.startswith("*"):
            parts.append(kind[1:])
        elif (index,) in source.attrs and source.attrs[(index,)]:
            parts.append(f"{name}%16")
    return " ".join(parts + [f"warps={options['num_warps']}"])


# ---------------------------------------------------------------------------------------------
# Intercepting the launchers' launches
# ---------------------------------------------------------------------------------------------

@dataclass
class LaunchRecorder:
    """Collects the distinct specialisations of the launches made while it is recording."""

    backend: BaseBackend = field(default_factory=lambda: backend_for(80))
    launches: dict[tuple, Launch] = field(default_factory=dict)  # the first launch of each specialisation
    case: str = ""  # set by sample()
    every_tuning: bool = False

    def record(self, kernel: JITFunction, *args, grid, warmup, **kwargs) -> None:
        for variant in _every_tuning(kernel, kwargs) if self.every_tuning else [kwargs]:
            launch = Launch(kernel, args, variant, self.case)
            self.launches.setdefault(specialisation_key(launch, self.backend), launch)

    @contextlib.contextmanager
    def recording(self) -> Iterator[LaunchRecorder]:
        """Kernel launches are recorded instead of run, and CPU tensors pass for CUDA ones."""
        recorder = self

        def run(kernel, *args, **kwargs):
            recorder.record(kernel, *args, **kwargs)

        def run_untuned(tuner, *args, **kwargs):  # tuning would time launches; sample() adds its configurations
            return tuner.fn.run(*args, **kwargs, **tuner.configs[0].all_kwargs())

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(JITFunction, "run", run))
            stack.enter_context(mock.patch.object(Autotuner, "run", run_untuned))
            stack.enter_context(_runtime.host_tensors_standing_in_for_cuda())
            yield self

    @contextlib.contextmanager
    def sample(self, case: str, every_tuning: bool = False) -> Iterator[None]:
        """Launches made inside are labelled ``case``; with ``every_tuning`` also under every
        autotuning configuration (the configurations vary tile sizes and warps, not argument types,
        so one sample call per kernel and dtype covers them)."""
        self.case, self.every_tuning = case, every_tuning
        try:
            yield
        except Exception as error:  # a launcher that fails here would fail on a GPU too
            raise RuntimeError(f"sample call {case!r} failed before any kernel ran: {error!r}") from error
        finally:
            self.every_tuning = False


def _every_tuning(kernel: JITFunction, kwargs: dict) -> list[dict]:
    """``kwargs`` under each configuration the kernel's autotuner may pick (just ``kwargs`` when
    the kernel is not autotuned): tuning is opt-in, and any configuration must compile."""
    configs = _runtime.TUNING_CONFIGS.get(kernel.fn.__name__)
    if not configs:
        return [kwargs]
    return [{**kwargs, **config.all_kwargs()} for config in configs]


# ---------------------------------------------------------------------------------------------
# The sample calls: the shapes, layouts and dtypes of the test suite
# ---------------------------------------------------------------------------------------------

# (weight shape, groups): C = 1 and 3, 1x1 to 7x7, depthwise, grouped, Linear, 1-D and 3-D
# convs, and rows longer than one (channels x taps) tile.
WEIGHTS = (
    ((4, 3, 3, 3), 1), ((5, 1, 3, 3), 1), ((3, 1, 3, 3), 1), ((6, 4, 1, 1), 1), ((4, 3, 1, 1), 1),
    ((3, 2, 5, 5), 1), ((4, 3, 7, 7), 1), ((3, 3, 7, 7), 1), ((6, 1, 3, 3), 6), ((4, 1, 3, 3), 4),
    ((8, 2, 3, 3), 2), ((5, 6), 1), ((4, 3, 3), 1), ((3, 2, 4), 1), ((4, 2, 3, 3, 3), 1),
    ((3, 40, 8, 8), 1), ((2, 3, 9, 9), 1), ((3, 2500), 1),
)
QUICK_WEIGHTS = (((4, 3, 3, 3), 1), ((5, 1, 3, 3), 1), ((6, 4, 1, 1), 1), ((6, 1, 3, 3), 6), ((5, 6), 1))
# Inputs of the channel-mean tests: wide rows, planes large enough to split, small planes,
# Linear inputs, and odd sizes.
MEAN_INPUTS = (
    (3, 300, 4, 4), (5, 3, 20, 20), (3, 2, 80, 80), (4, 6, 3, 3), (2, 5000), (5, 7), (5, 3, 4, 6), (3, 5, 6, 7),
)
LAYOUTS = ("contiguous", "channels_last", "strided")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # neither contiguous nor channels_last: the launchers copy it
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def _input_for(weight_shape: tuple[int, ...], groups: int, batch: int) -> torch.Tensor:
    spatial = {2: (), 3: (6,), 4: (5, 6), 5: (3, 4, 3)}[len(weight_shape)]
    return torch.rand((batch, weight_shape[1] * groups, *spatial))


def _equinorm_calls(recorder: LaunchRecorder, dtypes, weights) -> None:
    """Every weight in every dtype and mode; channels_last weights, the backward of every weight
    and inputs in every layout in float32 and float64 (the low-precision tests take fewer)."""
    ops = torch.ops.equinorm_kernels
    for dtype in dtypes:
        acc = _runtime.accumulation_dtype(dtype)
        low_precision = dtype in (torch.float16, torch.bfloat16)
        for index, (shape, groups) in enumerate(weights):
            x = _input_for(shape, groups, batch=4).to(dtype)
            for rows in (4, 2):
                with recorder.sample(f"{dtype} channel mean of the input of {shape}/{groups}, rows={rows}"):
                    ops.triton_channel_mean(x, rows, "mean")
            with recorder.sample(f"{dtype} channel abs-mean of the input of {shape}/{groups}"):
                ops.triton_channel_mean(x - 0.5, 4, "abs_mean")
            mean = torch.rand(x.shape[1], dtype=acc)
            gain = torch.ones(shape[0], dtype=acc)
            with_backward = not low_precision or index < 2
            with_channels_last = len(shape) in (4, 5) and not low_precision
            for layout in ("contiguous", "channels_last") if with_channels_last else ("contiguous",):
                weight = _layout(torch.randn(shape).to(dtype), layout)
                for mode in ("single_pass", "exact"):
                    with recorder.sample(f"{dtype} weight {shape}/{groups} {layout} {mode}", every_tuning=index == 0):
                        out, stats = ops.triton_equinorm_weight(weight, mean, gain, 0.7, groups, mode, 1e-5)
                        if with_backward:
                            ops.triton_equinorm_backward(torch.randn_like(out), weight, mean, gain, stats, groups)
                if len(shape) > 2:  # per-tap means (C, *kernel)
                    tap_mean = torch.rand((x.shape[1], *shape[2:]), dtype=acc)
                    with recorder.sample(f"{dtype} weight {shape}/{groups} {layout} per-tap means"):
                        out, stats = ops.triton_equinorm_weight(weight, tap_mean, gain, 1.0, groups, "exact", 1e-5)
                        if with_backward:
                            ops.triton_equinorm_backward(torch.randn_like(out), weight, tap_mean, gain, stats, groups)
        for index, shape in enumerate(MEAN_INPUTS):
            for layout in LAYOUTS[:2] if low_precision else LAYOUTS:
                x = _layout(torch.rand(shape).to(dtype), layout)
                for rows in (shape[0],) if low_precision else sorted({shape[0], math.ceil(shape[0] / 2), 1}):
                    with recorder.sample(f"{dtype} channel mean {shape} {layout} rows={rows}", every_tuning=index == 0):
                        ops.triton_channel_mean(x, rows, "mean")
                    with recorder.sample(f"{dtype} channel abs-mean {shape} {layout} rows={rows}"):
                        ops.triton_channel_mean(x - 0.5, rows, "abs_mean")


def _split_reductions(recorder: LaunchRecorder, dtypes) -> None:
    """Channel sums, row sums and energies cut over more programs than the test inputs' default
    plans make, as the tests force them."""
    for dtype in dtypes:
        for shape, layout in (((5, 3, 4, 6), "contiguous"), ((5, 3, 4, 6), "channels_last"), ((5, 7), "contiguous")):
            x = _layout(torch.rand(shape).to(dtype), layout)
            for rows in (5, 3):
                readable, channels_last = equinorm._channel_input(x, rows)
                for per_program in (None, 5, 13, 48):
                    mean = torch.empty(shape[1], dtype=_runtime.accumulation_dtype(dtype))
                    with recorder.sample(f"{dtype} channel sums {shape} {layout} rows={rows} "
                                         f"per_program={per_program}"):
                        equinorm._launch_channel_means(readable, channels_last, rows, mean, per_program=per_program)
                    negative = torch.zeros(shape[1], dtype=torch.uint8)
                    with recorder.sample(f"{dtype} channel abs sums {shape} {layout} rows={rows} "
                                         f"per_program={per_program}"):
                        equinorm._launch_channel_means(
                            readable - 0.5, channels_last, rows, mean, per_program=per_program, negative=negative
                        )
        weight = torch.randn(12, 3, 3, 3).to(dtype)
        for record in ([0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 1]):
            entry = enorm._decode_entry([weight], record)
            for p in (2.0, 3.0):
                with recorder.sample(f"{dtype} energies in chunks {record} p={p}"):
                    enorm._launch_energy(weight, entry, p, torch.empty(entry.channels, dtype=torch.float64), 7)
    for batches, rows, width, chunk_rows in ((1, 37, 5, 4), (3, 20, 2, 3), (1, 130, 300, None)):
        with recorder.sample(f"row sums ({batches}, {rows}, {width}) chunk_rows={chunk_rows}"):
            plan = launch_plans.row_sum_plan(batches, rows, width, chunk_rows=chunk_rows)
            launch_row_sums(torch.randn(batches, rows, width, dtype=torch.float64),
                            torch.empty(batches * width, dtype=torch.float64), batches, rows, width, plan=plan)


# tap_mean: (x shape, kernel, stride, padding (before, after) per dim, dilation) of the tests:
# Conv1d/2d/3d, kernels and strides of 1 (constants once compiled), odd sizes.
TAP_MEAN_INPUTS = (
    ((3, 2, 9, 7), [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
    ((3, 2, 9, 7), [5, 3], [3, 3], [2, 2, 1, 1], [1, 1]),
    ((4, 3, 11), [5], [2], [2, 2], [1]),
    ((2, 2, 5, 6, 7), [3, 2, 3], [2, 1, 2], [1, 1, 1, 1, 1, 1], [1, 2, 1]),
    ((5, 3, 7, 6), [1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),
    ((3, 40, 9, 10), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
)


def _tap_mean_calls(recorder: LaunchRecorder, dtypes) -> None:
    """Every padding mode and statistic, both layouts, forward and backward, row splits."""
    ops = torch.ops.equinorm_kernels
    for dtype in dtypes:
        acc = _runtime.accumulation_dtype(dtype)
        for shape, kernel, stride, padding, dilation in TAP_MEAN_INPUTS:
            for layout in ("contiguous", "channels_last"):
                x = _layout(torch.randn(shape).to(dtype), layout)
                for mode, absolute in (("zeros", True), ("reflect", False), ("replicate", True), ("circular", False)):
                    for rows in sorted({shape[0], 1}):
                        with recorder.sample(f"{dtype} tap_mean {shape} {layout} {mode} rows={rows}"):
                            ops.triton_tap_mean(x, rows, geometry_spec(kernel, stride, padding, dilation, mode),
                                                absolute)
                    with recorder.sample(f"{dtype} tap_mean backward {shape} {mode}"):
                        grad = torch.randn((shape[1], *kernel), dtype=acc)
                        ops.triton_tap_mean_backward(grad, list(shape[2:]), shape[0],
                                                     geometry_spec(kernel, stride, padding, dilation, mode))
        x = torch.randn(7, 3, 5, 6).to(dtype)
        for splits in (1, 2, 3):
            with recorder.sample(f"{dtype} tap_mean splits={splits}"):
                tap_mean._tap_mean(x, 6, [3, 3], [1, 2], [1, 1, 1, 1], [1, 1], "zeros", True, splits)


class _Residual(nn.Module):
    """A basic block, its skip the identity or a 1x1 conv: several producers (rows) per group."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.skip = nn.Conv2d(channels, width, 1) if channels != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.skip(x))


# (network, input shape): Linear chains, convs with pooling and a flatten into a Linear (columns
# per channel), grouped and depthwise (channel multiplier 2) convs, C = 1 inputs, residual blocks.
def _enorm_networks() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    return [
        ("mlp", nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3)), (5, 6)),
        ("cnn", nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 5), nn.ReLU(), nn.Linear(5, 3)), (2, 3, 8, 8)),
        ("grouped", nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.ReLU(),
            nn.Conv2d(16, 8, 1, groups=4), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 3)),
         (2, 4, 6, 6)),
        ("grayscale", nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)),
         (2, 1, 6, 6)),
        ("residual", nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _Residual(4, 4), _Residual(4, 6), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(6, 3)), (2, 3, 6, 6)),
        ("wide", nn.Sequential(nn.Linear(300, 40), nn.ReLU(), nn.Linear(40, 3)), (2, 300)),
    ]


def _enorm_program(model: nn.Module, input_shape: tuple[int, ...], include_bias: bool):
    """(tensors, entries, group sizes) of one ENorm cycle over ``model``, its gradients and Adam moments."""
    from ..enorm.graph import discover_groups
    from ..enorm.optimizer_state import StateRescaler
    from ..ops.enorm import RescalingProgram

    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(input_shape, dtype=next(model.parameters()).dtype)).square().sum().backward()
    optimizer.step()
    _, groups = discover_groups(model)
    program = RescalingProgram(StateRescaler(optimizer))
    for group in groups:
        program.add_group(group, include_bias)
    return program.tensors, program.entries, program.group_sizes


_EVERY_NETWORK = ("mlp", "cnn", "grouped", "grayscale", "residual", "wide")
# (networks, dtype, p, c, include_bias, conv weight layout) of the ENorm tests' cycles: every
# network with p = 2 in every dtype, the other exponents, uncounted biases and channels_last
# conv weights on a few.
ENORM_SETTINGS = (
    (_EVERY_NETWORK, torch.float64, 2.0, 1.0, True, torch.contiguous_format),
    (_EVERY_NETWORK, torch.float32, 2.0, 1.1, True, torch.contiguous_format),
    (_EVERY_NETWORK, torch.float16, 2.0, 1.1, True, torch.contiguous_format),
    (_EVERY_NETWORK, torch.bfloat16, 2.0, 1.0, True, torch.contiguous_format),
    (("cnn", "grouped"), torch.float64, 1.0, 1.1, True, torch.contiguous_format),
    (("cnn", "grouped"), torch.float64, 3.0, 1.0, True, torch.contiguous_format),
    (("cnn", "grouped"), torch.float32, 3.0, 1.1, True, torch.contiguous_format),
    (("cnn",), torch.bfloat16, 1.0, 1.0, True, torch.contiguous_format),
    (("mlp", "cnn"), torch.float64, 2.0, 1.0, False, torch.contiguous_format),
    (("cnn",), torch.float64, 2.0, 1.2, False, torch.contiguous_format),
    (("cnn", "residual", "grayscale"), torch.float64, 2.0, 1.0, True, torch.channels_last),
    (("residual",), torch.float32, 2.0, 1.0, True, torch.channels_last),
)


def _enorm_calls(recorder: LaunchRecorder, dtypes, quick: bool) -> None:
    networks = {name: (model, input_shape) for name, model, input_shape in _enorm_networks()}
    ops = torch.ops.equinorm_kernels
    for names, dtype, p, c, include_bias, memory_format in ENORM_SETTINGS:
        for name in names[:2] if quick else names:
            if dtype not in dtypes:
                continue
            model, input_shape = networks[name]
            torch.manual_seed(0)
            tensors, entries, sizes = _enorm_program(_copy_of(model, dtype, memory_format), input_shape, include_bias)
            with recorder.sample(f"{dtype} enorm {name} p={p} c={c} bias={include_bias} {memory_format}"):
                ops.triton_enorm_cycle_(tensors, entries, sizes, p, c)
                for group_entries in _entries_by_group(entries, sizes):
                    ops.triton_enorm_group_(tensors, group_entries, p, c)
    for dtype in dtypes:
        producer, consumer = torch.randn(40, 300).to(dtype), torch.randn(3, 40, 3, 3).to(dtype)
        for p in (2.0, 3.0):
            with recorder.sample(f"{dtype} enorm group of long rows p={p}"):
                ops.triton_enorm_group_([producer, consumer], [0, 0, 1, 1, 1, 1, 1, 1, -1, 1, 1, 1], p, 0.5)


def _entries_by_group(entries: list[int], group_sizes: list[int]) -> Iterator[list[int]]:
    first = 0
    for size in group_sizes:
        yield entries[first * enorm.ENTRY_FIELDS:(first + size) * enorm.ENTRY_FIELDS]
        first += size


def _copy_of(model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format) -> nn.Module:
    return copy.deepcopy(model).to(dtype=dtype, memory_format=memory_format)


def record_sample_launches(quick: bool = False) -> LaunchRecorder:
    """Runs every sample call with its launches recorded; returns the recorder."""
    if _runtime.INTERPRETED:
        raise RuntimeError("the kernels were defined for Triton's interpreter: run without TRITON_INTERPRET")
    dtypes = QUICK_DTYPES if quick else FLOAT_DTYPES
    recorder = LaunchRecorder()
    with recorder.recording(), torch.no_grad():
        _equinorm_calls(recorder, dtypes, QUICK_WEIGHTS if quick else WEIGHTS)
        _split_reductions(recorder, dtypes)
        _tap_mean_calls(recorder, dtypes)
    with recorder.recording():  # ENorm programs need a backward pass for their gradients
        _enorm_calls(recorder, dtypes, quick)
    return recorder


# ---------------------------------------------------------------------------------------------
# 32-bit products of strides in the compiled code
# ---------------------------------------------------------------------------------------------

_OPERATION = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*?) : ([^:]*?)(?: loc\(.*)?$")
_SSA_NAME = re.compile(r"%[\w.]+")
# Operations whose result carries an operand's value (or a sum or product with it) unwidened.
_CARRIES_VALUE = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "arith.addi", "arith.subi", "arith.muli"}


def _is_int32(type_text: str) -> bool:
    return bool(re.search(r"(?:^|\s|x)i32\b", type_text.split("->")[-1]))


def narrow_products(ttir: str, arguments: tuple[str, ...]) -> list[str]:
    """Lines of ``ttir`` that multiply a value carrying one of ``arguments`` in 32 bits."""
    carriers = {f"%{name}" for name in arguments}
    found = []
    for line in ttir.splitlines():
        match = _OPERATION.match(line)
        if not match:
            continue
        result, operation, operands, result_type = match.groups()
        if not carriers.intersection(_SSA_NAME.findall(operands)):
            continue
        if operation == "arith.muli" and _is_int32(result_type):
            found.append(line.strip())
        if operation in _CARRIES_VALUE and _is_int32(result_type):
            carriers.add(result)
    return found


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------

_pending: list[Launch] = []  # read by forked workers


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one compiled kernel: registers per thread and bytes spilled to local memory."""

    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def spilled(self) -> int:
        return max(self.spill_stores, self.spill_loads)


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def resources(compiled: CompiledKernel, arch: int) -> Resources:
    """Registers and spills of ``compiled``, from ptxas -v run again on its PTX (reading them from
    the loaded binary would need a GPU)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, "kernel.ptx")
        with open(source, "w") as f:
            f.write(compiled.asm["ptx"])
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             source, "-o", os.path.join(directory, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    registers = _PTXAS_REGISTERS.search(result.stderr)
    spills = _PTXAS_SPILLS.search(result.stderr)
    return Resources(int(registers.group(1)) if registers else 0,
                     int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0)


# Spills: ptxas leaves a scalar or two in local memory in many variants even far below the register
# limit (4 to 16 B at 32 to 128 registers; the weight kernel's 8 B at 32 registers stays without
# Triton's --regAllocOptLevel=2): one or two L1-resident values per thread, not register pressure,
# accepted in every kernel. Larger spills
# fail unless TOLERATED_SPILLS names the kernel with a reason; none past SPILL_LIMIT is accepted.
SMALL_SPILL = 16
SPILL_LIMIT = 128
TOLERATED_SPILLS: dict[str, tuple[int, str]] = {
    "_equinorm_weight_kernel": (
        64,
        "float64 scalars of the exact positive mass kept in local memory: stored once before its loop "
        "and loaded once after (SASS of the float32 (4, 3, 3, 3) exact variant); up to 36 B stored and "
        "52 B loaded by the 32 x 64 float64 tile on sm_90 (128 registers)",
    ),
    "_equinorm_backward_kernel": (
        48,
        "loop-invariant float64 scalars kept in local memory: stored once per program and reloaded "
        "4 B per channel-block step from L1 (SASS of the float64 channels_last (4, 3, 3, 3) variant, "
        "32 registers); up to 48 B loaded",
    ),
}


def spill_allowance(kernel_name: str) -> int:
    """The most bytes ``kernel_name`` may spill (stored or loaded) and still pass."""
    return min(max(SMALL_SPILL, TOLERATED_SPILLS.get(kernel_name, (0, ""))[0]), SPILL_LIMIT)


def _compile_one(index: int, arch: int) -> tuple[str, float, Resources | None]:
    """(status, seconds, resources) of one compilation: "ok", or what failed."""
    launch = _pending[index]
    start = time.perf_counter()
    try:
        compiled = compile_launch(launch, arch)
    except Exception as error:  # report every failure, not only the first
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = _compilation_error_line(error)
        return f"FAILED: {type(error).__name__}: {detail or first_line}", time.perf_counter() - start, None
    narrow = narrow_products(compiled.asm["ttir"], STRIDE_ARGUMENTS.get(launch.name, ()))
    used = resources(compiled, arch)
    status = "ok"
    if narrow:
        status = f"FAILED: stride multiplied in 32 bits: {narrow[0]}"
    elif used.spilled > spill_allowance(launch.name):
        status = f"FAILED: spills {used.spill_stores} B stored, {used.spill_loads} B loaded"
    return status, time.perf_counter() - start, used


def _compilation_error_line(error: Exception) -> str:
    """The source line and message of a Triton CompilationError, in one line."""
    text = str(error)
    lines = [line for line in text.splitlines() if line.strip()]
    caret = next((i for i, line in enumerate(lines) if set(line.strip()) == {"^"}), None)
    if caret is None or caret == 0:
        return ""
    return f"{lines[caret - 1].strip()}  -> {lines[-1].strip()}"


def kernel_label(launch: Launch) -> str:
    """``_finish_channel_means_kernel`` -> ``finish channel means``."""
    return launch.name.strip("_").removesuffix("_kernel").replace("_", " ")


def compile_all(
    archs: list[int], quick: bool = False, only: str = "", verbose: bool = True, show_all: bool = False, jobs: int = 0,
) -> int:
    """Compiles the specialisation of every sample launch (of the kernels whose label contains
    ``only``) for every architecture; returns the number of failures. ``verbose`` prints the
    failures (``show_all``: every compilation) and a summary; ``jobs`` is the number of parallel
    compilations (0: one per available CPU)."""
    start = time.perf_counter()
    recorder = record_sample_launches(quick)
    launches = [launch for launch in recorder.launches.values() if only in kernel_label(launch)]
    if verbose:
        counts = collections.Counter(kernel_label(launch) for launch in launches)
        print(f"{len(launches)} specialisations from the sample calls ({time.perf_counter() - start:.1f} s): "
              f"{', '.join(f'{label} {count}' for label, count in counts.most_common())}\n"
              f"compiling each for sm_{', sm_'.join(map(str, archs))}", flush=True)
    _pending[:] = launches
    tasks = [(index, arch) for arch in archs for index in range(len(launches))]
    failures = 0
    usage: dict[tuple[str, int], list[Resources]] = collections.defaultdict(list)
    for (index, arch), (status, seconds, used) in zip(tasks, _run_tasks(tasks, jobs)):
        launch = launches[index]
        failed = status != "ok"
        failures += failed
        if used is not None:
            usage[kernel_label(launch), arch].append(used)
        if verbose and (failed or show_all):
            measured = f"  {used.registers} registers, {used.spilled} B spilled" if used else ""
            print(f"sm_{arch}  {kernel_label(launch):<28} {seconds:5.2f} s  {status}{measured}\n"
                  f"        {describe(launch, recorder.backend)}\n        first from: {launch.origin}", flush=True)
    if verbose:
        print(f"compiled {len(tasks)} kernels in {time.perf_counter() - start:.1f} s", flush=True)
        print(resource_table(usage), flush=True)
    return failures


def resource_table(usage: dict[tuple[str, int], list[Resources]]) -> str:
    """Per kernel and architecture: specialisations, registers (fewest to most) and the largest spill."""
    lines = [f"{'kernel':<28} {'arch':<6} {'variants':>8} {'registers':>10} {'spilled':>8}"]
    for (label, arch), measured in sorted(usage.items()):
        registers = sorted(m.registers for m in measured)
        lines.append(f"{label:<28} sm_{arch:<3} {len(measured):>8} {registers[0]:>4}-{registers[-1]:<5}"
                     f" {max(m.spilled for m in measured):>6} B")
    return "\n".join(lines)


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_tasks(tasks: list[tuple[int, int]], jobs: int) -> Iterator[tuple[str, float, Resources | None]]:
    jobs = jobs or _available_cpus()
    if jobs == 1 or len(tasks) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (_compile_one(*task) for task in tasks)
        return
    # Forked workers inherit the recorded launches; only indices cross the process boundary.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        yield from pool.map(_compile_one, *zip(*tasks), chunksize=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--quick", action="store_true", help="bfloat16 and float64 only, and fewer shapes")
    parser.add_argument("--only", default="", help="only the kernels whose label contains this text")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compilations (default: one per CPU)")
    parser.add_argument("--all", action="store_true", help="print every compilation, not only the failures")
    args = parser.parse_args(argv)
    failures = compile_all(args.arch, quick=args.quick, only=args.only, show_all=args.all, jobs=args.jobs)
    print(f"triton {triton.__version__}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
