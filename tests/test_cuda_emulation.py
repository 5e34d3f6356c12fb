"""Every CUDA kernel (csrc/cuda/*.cu) executed on the CPU, in three builds, against the float64 reference.

tests/cuda_emulation/cuda_emulation.h is an execution layer under which g++ compiles each .cu as C++:
the blocks of a launch run one after another, the threads of a block are fibers that meet at
__syncthreads and at warp shuffles. tests/cuda_emulation/kernel_runner.cpp calls every launcher of
csrc/cuda/launchers.h on the cases below, twice each, the second time with blocks and threads in
reverse order (the outputs must agree bit for bit, whichever block finishes last), and this module
compares what it wrote with equinorm_kernels.reference in float64 (autograd through it for the
backward). The cases are those of the CPU kernel tests: odd shapes, NCHW and channels_last, every
dtype, base pointers misaligned by one element, multi-block reductions, warp and block teams,
groups, depthwise, ENorm groups with many entries and several launches per group.

Builds: plain (-O2); ASan + UBSan, which report reads and writes out of bounds of global and
__shared__ memory (what compute-sanitizer's memcheck does on a GPU); TSan, which reports
__shared__ accesses of different threads that no __syncthreads orders (racecheck's job). Copies of
the kernels with planted bugs show that those reports fire.

About 75 s on 2 idle cores from a cold cache (build/cuda_emulation, keyed by content hash), 40 s warm.
Skipped where g++ or the CUDA headers are missing.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from cuda_emulation.build import FLAVOURS, BuildError, Variant, build, find_toolchain, planted, run_runner
from test_ops_equinorm import WEIGHT_CASES as CPU_KERNEL_WEIGHT_CASES
from equinorm_kernels import reference

RUN_TIMEOUT_S = 600
DTYPES = {"half": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32, "double": torch.float64}


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- raw buffers ----


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """The view of `t` whose logical order is the order of its elements in memory."""
    dims = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    view = t.permute(dims)
    assert view.is_contiguous(), "a dense layout was expected"
    return view


def _to_bytes(t: torch.Tensor) -> bytes:
    return _memory_order(t).contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and laid out like `like`, its memory filled with `data`."""
    out = torch.empty_like(like)
    _memory_order(out).view(-1).copy_(torch.frombuffer(bytearray(data), dtype=like.dtype))
    return out


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.contiguous()


# ---- comparisons ----


def _error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth.double()).abs().max().item()


def _scale(truth: torch.Tensor) -> float:
    return max(truth.double().abs().max().item(), 1e-30)


def _compare(what: str, value: torch.Tensor, truth: torch.Tensor, tolerance: float) -> list[str]:
    error = _error(value, truth)
    return [] if error <= tolerance else [f"{what}: max error {error:.3g} > {tolerance:.3g}"]  # NaN fails too


def _compare_relative(what: str, value: torch.Tensor, truth: torch.Tensor, rtol: float) -> list[str]:
    """|value - truth| <= rtol * |truth| elementwise, with a floor for elements near zero."""
    bound = rtol * (truth.double().abs() + 1e-3 * _scale(truth))
    excess = ((value.double() - truth.double()).abs() - bound).nan_to_num(nan=math.inf)
    return [] if excess.max().item() <= 0 else [f"{what}: {int((excess > 0).sum())} elements beyond rtol {rtol:g}"]


def _compare_with_same_precision(what, value, same_precision, truth, dtype, float64_tolerance) -> list[str]:
    """float64: within float64_tolerance * scale of the truth; lower precisions: at most twice the error of
    the reference run in the same precision on the same inputs (the CPU tests' rule), plus a floor. The
    absolute floor serves truths that are zero up to rounding (a row of two weights has zero gradient):
    the weight math runs in float64 for every dtype, so their rounding noise is float64's."""
    if dtype == torch.float64:
        return _compare(what, value, truth, float64_tolerance * _scale(truth) + 1e-12)
    return _compare(what, value, truth, 2 * _error(same_precision, truth) + 2e-6 * _scale(truth) + 1e-12)


# ---- cases ----


@dataclass
class KernelCase:
    op: str
    name: str
    fields: dict[str, object]
    inputs: dict[str, torch.Tensor]  # manifest key -> tensor, written in its memory order
    check: Callable[[Callable[[str, torch.Tensor], torch.Tensor]], list[str]] = field(repr=False)
    # check(output) -> problems, where output(key, like) reads an output laid out like `like`

    def manifest_line(self, directory: Path) -> str:
        fields = dict(self.fields)
        for key, tensor in self.inputs.items():
            file = f"{self.name}.{key}.in"
            (directory / file).write_bytes(_to_bytes(tensor))
            fields.setdefault(key, file)
        return " ".join([self.op, self.name, *(f"{k}={v}" for k, v in fields.items())])


# channel_mean: every reduction path (plans: csrc/cuda/launch_plans.h). NCHW planes are read plane by
# plane (a scalar head and tail around aligned vectors: 7x7, 17x17 and 10x13 planes have both), or
# as columns of an (R, C * S) matrix when their planes are short and that gives 16-byte loads;
# channels_last and (N, C) inputs as columns (tiles of whole channels, slots of rows), each contiguous
# run rotated by its head when the base is misaligned (offsets of one and three elements). The cases run
# on the H100 model and on smaller machines (MACHINES) whose plans split the same small shapes over
# many slots, a finish level or two of them.
CHANNEL_MEAN_SHAPES = {
    "wide-rows": (3, 300, 4, 4),
    "large-planes": (5, 3, 20, 20),
    "odd-planes": (3, 2, 10, 13),  # 130 values: heads and tails around the vectors
    "planes-7x7": (3, 5, 7, 7),
    "planes-17x17": (2, 3, 17, 17),
    "segment-pieces": (6, 2, 40, 40),
    "small-planes": (4, 6, 3, 3),
    "column-slots": (16, 12, 8, 8),
    "odd": (3, 5, 7, 9),
    "linear": (2, 5000),
    "many-slots": (130, 4, 16, 16),  # with MACHINES["many-slots"]: two finish levels in both layouts
    # channels_last: a full 128-column tile and one of 8 columns, whose every thread reads a run's seam
    "wide-channels": (9, 136, 2, 3),
    "linear-narrow": (700, 13),  # contiguous steps of 152 rows, over several slots
}
MACHINES = {
    "h100": {},
    # two waves = 16 blocks of at least 64 bytes: every shape above splits its channels over slots
    "small": dict(multiprocessors=2, min_block_bytes=64),
    # 1056 blocks of at least 16 bytes: more than 64 slots per channel
    "many-slots": dict(multiprocessors=132, min_block_bytes=16),
    # two waves = 16 equinorm blocks of at least 64 bytes: rows of a few hundred values split into slices
    "split-rows": dict(multiprocessors=4, min_block_bytes=64),
}


def _signed_values(shape) -> torch.Tensor:
    """Signed values in every channel but the first, whose values are >= 0 (one of them -0.0, which
    counts as non-negative); in each signed channel one negative value sits only in the last sample,
    so the flags of a statistic over fewer rows see none there."""
    values = torch.rand(shape, generator=_generator(len(shape) + shape[1] + 7), dtype=torch.float64) - 0.5
    values[:, 0] = values[:, 0].abs()
    values.view(shape[0], shape[1], -1)[0, 0, 0] = -0.0
    if shape[1] > 2:
        values[:, 2] = values[:, 2].abs()
        values.view(shape[0], shape[1], -1)[-1, 2, -1] = -0.25
    return values


def _channel_mean_case(shape_name: str, dtype_name: str, channels_last: bool, offset: int, all_rows: bool,
                       statistic: str = "mean", machine: str = "h100"):
    shape = CHANNEL_MEAN_SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    if statistic == "abs_mean":
        values = _signed_values(shape)
    else:
        values = torch.rand(shape, generator=_generator(len(shape) + shape[1]), dtype=torch.float64)
    x = _layout(values.to(dtype), channels_last)
    rows = shape[0] if all_rows else 1
    spatial = x.numel() // (shape[0] * shape[1])
    reduced = [0, *range(2, x.dim())]
    sample = x[:rows].double()
    truth = (sample.abs() if statistic == "abs_mean" else sample).mean(dim=reduced)
    negative_truth = (sample < 0).any(dim=reduced) if statistic == "abs_mean" else None

    def check(output):
        rtol = 1e-13 if dtype == torch.float64 else 1e-5
        problems = _compare_relative("mean", output("mean", truth.to(_accumulation(dtype))), truth, rtol)
        if negative_truth is not None:
            # As bytes: a flag the kernel never wrote keeps the buffer's 0xff fill and fails.
            negative = output("negative", negative_truth.to(torch.uint8))
            if not torch.equal(negative, negative_truth.to(torch.uint8)):
                problems.append(f"negative flags {negative.tolist()} != {negative_truth.int().tolist()}")
        return problems

    layout = "cl" if channels_last else "nchw"
    fields = dict(dtype=dtype_name, rows=rows, channels=shape[1], spatial=spatial,
                  channels_last=int(channels_last or spatial == 1), offset=offset)
    if statistic == "abs_mean":
        fields["abs"] = 1
    fields.update(MACHINES[machine])
    prefix = "abs-mean" if statistic == "abs_mean" else "mean"
    suffix = "" if machine == "h100" else f"-{machine}"
    return KernelCase(
        "channel_mean",
        f"{prefix}-{shape_name}-{layout}-{dtype_name}-rows{rows}-offset{offset}{suffix}",
        fields,
        {"x": x},
        check,
    )


def channel_mean_cases() -> list[KernelCase]:
    cases = []
    for shape_name, shape in CHANNEL_MEAN_SHAPES.items():
        for channels_last in ([False, True] if len(shape) == 4 else [False]):
            if shape_name == "many-slots":
                cases.append(_channel_mean_case(shape_name, "float", channels_last, 0, True, machine="many-slots"))
                cases.append(_channel_mean_case(shape_name, "half", channels_last, 1, True, "abs_mean", "many-slots"))
                continue
            for dtype_name in DTYPES:
                cases.append(_channel_mean_case(shape_name, dtype_name, channels_last, 0, True))
            cases.append(_channel_mean_case(shape_name, "half", channels_last, 1, True))
            cases.append(_channel_mean_case(shape_name, "float", channels_last, 1, False))
            # abs_mean: the same paths with signed values; the flags over all rows and over one.
            cases.append(_channel_mean_case(shape_name, "float", channels_last, 0, True, "abs_mean"))
            cases.append(_channel_mean_case(shape_name, "half", channels_last, 1, False, "abs_mean"))
            # many slots of the same shape: partial sums and flags through the finish
            cases.append(_channel_mean_case(shape_name, "bfloat16", channels_last, 0, True, machine="small"))
            cases.append(_channel_mean_case(shape_name, "half", channels_last, 1, True, "abs_mean", "small"))
            cases.append(_channel_mean_case(shape_name, "double", channels_last, 1, True, "abs_mean", "small"))
            # a base three elements past the alignment unit: column runs rotated by a head of 5 (half)
            # or 1 (float) values
            cases.append(_channel_mean_case(shape_name, "half", channels_last, 3, True, machine="small"))
            cases.append(_channel_mean_case(shape_name, "float", channels_last, 3, True, "abs_mean"))
    return cases


# equinorm weight transform + backward: the CPU kernel tests' weights, and the launch paths only the
# CUDA kernels have. Rows of at most 256 values go to warp teams (eight per block), longer ones to
# whole blocks; a team reads its row as 16-byte vectors between a scalar head and tail (rows whose
# length is no multiple of the vector start at every alignment), or one element a load where the
# weight and the other rows are aligned unlike (weight_offset). The backward's grad_weight blocks
# own a slot of a group's rows and a tile of columns (vectors as wide as the row length and the
# bases allow); a finish adds the slots' column sums (and a channel's taps) into grad_mean.
WEIGHT_CASES = {
    **CPU_KERNEL_WEIGHT_CASES,
    "two-values": ((3, 2), 1),
    "block-team": ((5, 40, 3, 3), 1),
    "block-team-linear": ((3, 300), 1),
    # 13 blocks of warp teams, the last one partial; grad_mean adds 100 rows over two blocks of columns
    "many-outputs": ((100, 40), 1),
    # rows of 77 values: each starts at another place of the 16-byte unit
    "linear-odd-rows": ((9, 77), 1),
    # two groups of three output channels with rows of 360 values (split into slices on "split-rows")
    "grouped-long": ((6, 40, 3, 3), 2),
    # the backward's grad_weight over several slots of rows on "split-rows" (and 16 row lanes a block)
    "many-outputs-conv": ((40, 4, 3, 3), 1),
}


def _weight(shape, seed: int) -> torch.Tensor:
    """Row 0 one-signed (the single_pass fallback to the exact mass) and, where a row has 4 or more
    values, row 1 constant (no positive mass: a zero output channel)."""
    w = torch.randn(shape, generator=_generator(seed), dtype=torch.float64)
    w[0] = w[0].abs() + 0.1
    if w[1].numel() >= 4 and shape[0] > 2:
        w[1] = 0.3
    return w


def _mean(channels: int, seed: int) -> torch.Tensor:
    mean = torch.rand(channels, generator=_generator(seed), dtype=torch.float64) + 0.05
    if channels >= 3:
        mean[-1] = 0  # an input channel nobody sees: it must not count for the one-signed test
    return mean


def _equinorm_forward_and_grads(weight, mean, gain, upstream, ratio, groups, mode, eps):
    weight, mean, gain = (t.detach().clone().requires_grad_() for t in (weight, mean, gain))
    out = reference.equinorm_weight(weight, mean, ratio=ratio, groups=groups, mode=mode, gain=gain, eps=eps)
    grads = torch.autograd.grad(out, [weight, mean, gain], upstream)
    return out.detach(), grads


def _equinorm_case(case_name: str, dtype_name: str, channels_last: bool, exact: bool, offset: int,
                   per_tap: bool = False, weight_offset: int | None = None, machine: str = "h100") -> KernelCase:
    shape, groups = WEIGHT_CASES[case_name]
    dtype, acc = DTYPES[dtype_name], _accumulation(DTYPES[dtype_name])
    ratio, eps, mode = (1.0 if per_tap else 0.7), 1e-5, "exact" if exact else "single_pass"
    weight = _layout(_weight(shape, seed=shape[0] * 7 + shape[1]).to(dtype), channels_last)
    channels, kernel = shape[1] * groups, shape[2:]
    mean = _mean(channels * math.prod(kernel), seed=shape[1]).reshape(channels, *kernel) if per_tap else _mean(channels, seed=shape[1])
    mean = mean.to(acc)
    gain = torch.linspace(-1.0, 2.0, shape[0], dtype=torch.float64).to(acc)  # negative gains are allowed
    upstream = _layout(torch.randn(shape, generator=_generator(5), dtype=torch.float64).to(dtype), channels_last)
    truth = _equinorm_forward_and_grads(
        *(t.double() for t in (weight, mean, gain, upstream)), ratio, groups, mode, eps
    )
    same_precision = _equinorm_forward_and_grads(weight, mean, gain, upstream, ratio, groups, mode, eps)

    def check(output):
        problems = _compare_with_same_precision(
            "out", output("out", weight), same_precision[0], truth[0], dtype, 1e-12
        )
        # grad_mean and stats are float64 for every weight dtype (csrc/shared/equinorm_math.h).
        for key, like, same, true in zip(("grad_weight", "grad_mean", "grad_gain"), (weight, mean.double(), gain),
                                         same_precision[1], truth[1]):
            problems += _compare_with_same_precision(key, output(key, like), same, true, dtype, 1e-10)
        stats = output("stats", torch.empty(shape[0], 5, dtype=torch.float64))
        used_exact = stats[:, 4]
        if not torch.isfinite(stats).all() or not ((used_exact == 0) | (used_exact == 1)).all():
            problems.append(f"stats not finite or used_exact not 0/1: {stats.tolist()}")
        if exact and not (used_exact == 1).all():
            problems.append("mode exact but stats say the one-pass mass was used")
        return problems

    layout = "cl" if channels_last else "contiguous"
    means = "-per-tap" if per_tap else ""
    fields = dict(dtype=dtype_name, out_channels=shape[0], group_channels=shape[1],
                  taps=weight.numel() // (shape[0] * shape[1]), groups=groups,
                  channels_last=int(channels_last and weight.dim() >= 4), per_tap_means=int(per_tap),
                  exact=int(exact), ratio=ratio, eps=eps, offset=offset)
    suffix = ""
    if weight_offset is not None:
        fields["weight_offset"] = weight_offset
        suffix = f"-weight-offset{weight_offset}"
    fields.update(MACHINES[machine])
    if machine != "h100":
        suffix += f"-{machine}"
    return KernelCase(
        "equinorm",
        f"equinorm-{case_name}-{layout}-{dtype_name}-{mode}{means}-offset{offset}{suffix}",
        fields,
        {"weight": weight, "mean": mean, "gain": gain, "grad": upstream},
        check,
    )


def equinorm_cases() -> list[KernelCase]:
    cases = []
    for case_name, (shape, _) in WEIGHT_CASES.items():
        for channels_last in ([False, True] if len(shape) in (4, 5) else [False]):
            for dtype_name in DTYPES:
                cases.append(_equinorm_case(case_name, dtype_name, channels_last, False, 0))
            cases.append(_equinorm_case(case_name, "float", channels_last, True, 0))
            cases.append(_equinorm_case(case_name, "bfloat16", channels_last, True, 1))
            cases.append(_equinorm_case(case_name, "double", channels_last, False, 1))
            if len(shape) > 2:  # per-tap means (C, *kernel): every value reads its own mean
                cases.append(_equinorm_case(case_name, "float", channels_last, True, 0, per_tap=True))
                cases.append(_equinorm_case(case_name, "double", channels_last, False, 1, per_tap=True))
    # the weight one element off the other rows' alignment: one element a load
    for case_name in ("linear-odd-rows", "block-team"):
        cases.append(_equinorm_case(case_name, "half", False, False, 0, weight_offset=1))
        cases.append(_equinorm_case(case_name, "float", False, True, 1, weight_offset=0))
    # rows split over several blocks each (their plans: test_emulated_equinorm_plans_split_rows)
    split = [  # (case, dtype, channels_last, exact, offset, per_tap)
        ("block-team", "half", False, False, 1, False), ("block-team", "float", False, True, 0, False),
        ("block-team", "float", False, True, 1, True), ("block-team", "bfloat16", True, False, 0, False),
        ("block-team", "half", True, False, 0, True), ("block-team-linear", "half", False, False, 1, False),
        ("block-team-linear", "double", False, True, 0, False), ("grouped-long", "float", False, True, 1, False),
        ("grouped-long", "half", True, False, 0, False), ("many-outputs-conv", "float", False, False, 0, False),
        ("many-outputs-conv", "double", True, True, 1, True), ("many-outputs", "half", False, False, 1, False),
    ]
    for case_name, dtype_name, channels_last, exact, offset, per_tap in split:
        cases.append(_equinorm_case(case_name, dtype_name, channels_last, exact, offset, per_tap=per_tap,
                                    machine="split-rows"))
    cases.append(_equinorm_case("block-team", "half", False, True, 0, weight_offset=1, machine="split-rows"))
    return cases


# ENorm: programs in the format of csrc/enorm_plan.h, decoded into launcher entries as the glue does.


@dataclass(frozen=True)
class Role:
    tensor: int
    columns: bool
    power: int
    counted: bool
    groups: int = 1
    columns_per_channel: int = 1


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.dim() in (4, 5)


def _launcher_entry(t: torch.Tensor, role: Role) -> list[int]:
    """The 11 fields of an EnormEntry for `role` (csrc/enorm_plan.h, decode_entry)."""
    head = [role.tensor, int(role.columns), role.power, int(role.counted), role.groups]
    if not role.columns:
        inner = t.numel() // t.shape[0]
        return head + [t.shape[0], 1, inner, inner, 0, 1]
    taps = t.numel() // (t.shape[0] * t.shape[1])
    inner = role.columns_per_channel * taps
    outer_stride = t.shape[1] * taps
    if _is_channels_last(t):
        return head + [t.shape[0], t.shape[1] // role.columns_per_channel, inner, outer_stride, 1, t.shape[1]]
    return head + [t.shape[0], t.shape[1] // role.columns_per_channel, inner, outer_stride, inner, 1]


def _enorm_reference(tensors: list[torch.Tensor], dtypes: list[torch.dtype], program: list[list[Role]], p, c):
    """float64 run of the program: each group's d from the tensors as the previous groups left them,
    stored in their dtypes. Returns the tensors, the last group's d and each group's max |d - 1|."""
    tensors = [t.to(torch.float64, copy=True) for t in tensors]  # rescaled in place below
    deviations = []
    for group in program:
        rows = sum(reference.enorm_row_energy(tensors[r.tensor], p) for r in group if r.counted and not r.columns)
        columns = sum(
            reference.enorm_column_energy(
                tensors[r.tensor], p, groups=r.groups, columns_per_channel=r.columns_per_channel
            )
            for r in group if r.counted and r.columns
        )
        d = reference.enorm_coefficients(rows, columns, p, c)
        for r in group:
            if r.power == 0:
                continue
            if r.columns:
                reference.enorm_scale_columns_(tensors[r.tensor], d ** r.power, groups=r.groups,
                                               columns_per_channel=r.columns_per_channel)
            else:
                reference.enorm_scale_rows_(tensors[r.tensor], d ** r.power)
        tensors = [t.to(dtype).double() for t, dtype in zip(tensors, dtypes)]
        deviations.append((d - 1).abs().max())
    return tensors, d, torch.stack(deviations)


ENORM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def rows(tensor: int, power: int = 1, counted: bool = True) -> Role:
    return Role(tensor, False, power, counted)


def columns(tensor: int, power: int = -1, counted: bool = True, groups: int = 1, columns_per_channel: int = 1) -> Role:
    return Role(tensor, True, power, counted, groups, columns_per_channel)


@dataclass(frozen=True)
class EnormProgram:
    shapes: list[tuple[int, ...]]
    groups: list[list[Role]]
    channels_last: tuple[int, ...] = ()  # tensors stored channels_last
    zeroed: tuple[tuple[int, tuple], ...] = ()  # (tensor, index) set to zero: channels with no energy

    @property
    def is_cycle(self) -> bool:
        return len(self.groups) > 1


def _many_entries() -> EnormProgram:
    """19 counted entries (two energy launches of at most 16) and 23 to rescale (two rescale launches)."""
    producers = [(5, k) for k in range(1, 9)] + [(5, 3, 3), (5, 2, 2, 2)]
    consumers = [(m, 5) for m in range(2, 10)] + [(4, 5, 3)]
    shapes = producers + consumers + [(5, 4), (5, 4), (3, 5), (3, 5)]
    first_consumer, first_state = len(producers), len(producers) + len(consumers)
    group = [rows(k) for k in range(first_consumer)] + [columns(k) for k in range(first_consumer, first_state)]
    group += [rows(first_state, -1, False), rows(first_state + 1, -2, False)]
    group += [columns(first_state + 2, 1, False), columns(first_state + 3, 2, False)]
    return EnormProgram(shapes, [group])


ENORM_PROGRAMS = {
    "conv-pair": EnormProgram([(6, 3, 3, 3), (4, 6, 3, 3)], [[rows(0), columns(1)]]),
    "linear-bias": EnormProgram([(6, 5), (6,), (4, 6)], [[rows(0), rows(1), columns(2)]]),
    "grouped": EnormProgram([(8, 2, 3, 3), (8, 2, 1, 1)], [[rows(0), columns(1, groups=4)]]),
    "flatten": EnormProgram([(3, 4), (5, 12)], [[rows(0), columns(1, columns_per_channel=4)]]),
    "channels-last": EnormProgram(
        [(6, 3, 3, 3), (4, 6, 3, 3), (6, 2, 3, 3)],
        [[rows(0), columns(1), columns(2, groups=3)]],
        channels_last=(0, 1, 2),
    ),
    # a weight, its bias, their gradients and optimizer moments, and the consumer's
    "optimizer-state": EnormProgram(
        [(6, 4), (6,), (6, 4), (6,), (6, 4), (5, 6), (5, 6), (5, 6), (5, 6)],
        [[rows(0), rows(1), rows(2, -1, False), rows(3, -1, False), rows(4, -2, False), columns(5),
          columns(6, 1, False), columns(7, 2, False), columns(8, 0, False)]],
    ),
    "many-entries": _many_entries(),
    # one tensor both a producer and a consumer: its two rescales go to separate launches
    "repeated-tensor": EnormProgram([(6, 6), (6, 3), (2, 6)], [[rows(0), rows(1), columns(0), columns(2)]]),
    # long channels: energies in several slices, rescales over several blocks
    "slices": EnormProgram([(4, 4, 32, 32), (8, 4, 32, 32)], [[rows(0), columns(1)]]),
    # a Linear consumer: its columns are adjacent channels, whose energies split over row slices
    "linear-columns": EnormProgram([(16, 12), (300, 16), (16,)], [[rows(0), rows(2), columns(1)]]),
    "cycle": EnormProgram(
        [(8, 5), (8,), (6, 8), (6,), (7, 6), (7,), (3, 7)],
        [[rows(0), rows(1), columns(2)], [rows(2), rows(3), columns(4)], [rows(4), rows(5), columns(6)]],
    ),
    "cnn-cycle": EnormProgram(
        [(8, 3, 3, 3), (8, 4, 3, 3), (6, 8, 1, 1)],
        [[rows(0), columns(1, groups=2)], [rows(1), columns(2)]],
        channels_last=(0, 1),
    ),
    "zero-energy": EnormProgram([(4, 3), (2, 4)], [[rows(0), columns(1)]], zeroed=((0, (1,)), (1, (slice(None), 2)))),
    # rows of 147 values (a 3x7x7 stem conv), a bias, 3x3 columns: no row is a whole number of vectors, so
    # rescale vectors span rows and channels, around a scalar head (offset 1) and tail; two rescale blocks
    # of 16-byte vectors in float32
    "odd-rows": EnormProgram([(40, 3, 7, 7), (40,), (9, 40, 3, 3)], [[rows(0), rows(1), columns(2)]]),
    # 13 adjacent channels of a channels_last consumer, and a Linear's 7 adjacent channels: vectors that
    # span taps (or rows) and restart the channel index inside them
    "odd-channels-last": EnormProgram([(13, 3, 7, 7), (13,), (5, 13, 3, 3)], [[rows(0), rows(1), columns(2)]],
                                      channels_last=(0, 2)),
    "odd-linear": EnormProgram([(7, 13), (7,), (300, 7)], [[rows(0), rows(1), columns(2)]]),
    # energies of adjacent channels in vectors: a channels_last consumer's rows of 16 channels and a grouped
    # 1x1 conv's of 8, with (offset 1) scalar head and tail channels around the vectors
    "adjacent-vectors": EnormProgram([(16, 3, 3, 3), (5, 16, 3, 3), (16, 8, 1, 1)],
                                     [[rows(0), columns(1), columns(2, groups=2)]], channels_last=(0, 1)),
}


def _coefficient_power(d: torch.Tensor, power: int) -> torch.Tensor:
    """d^power as csrc/shared/enorm_math.h computes it, in float64."""
    return {1: d, -1: 1 / d, 2: d * d, -2: 1 / (d * d)}[power]


def _rescaled_as_stored(tensors: list[torch.Tensor], group: list[Role], d: torch.Tensor) -> list[torch.Tensor]:
    """The group's rescale from the kernel's own d: each value times its factor in float64, rounded to
    the accumulation type and then to its dtype, in entry order. The kernels must match these bits."""
    out = [t.clone() for t in tensors]
    for r in group:
        if r.power == 0:
            continue
        dtype = out[r.tensor].dtype
        work = out[r.tensor].double()
        factor = _coefficient_power(d, r.power)
        if r.columns:
            reference.enorm_scale_columns_(work, factor, groups=r.groups, columns_per_channel=r.columns_per_channel)
        else:
            reference.enorm_scale_rows_(work, factor)
        out[r.tensor] = work.to(_accumulation(dtype)).to(dtype)
    return out


def _enorm_case(program_name: str, dtypes: list[torch.dtype], *, p: float = 2.0, c: float = 1.1, offset: int = 0,
                machine: str = "h100"):
    program = ENORM_PROGRAMS[program_name]
    tensors = []
    for k, (shape, dtype) in enumerate(zip(program.shapes, dtypes)):
        values = torch.randn(shape, generator=_generator(11 + k), dtype=torch.float64) * (0.25 + k % 4)
        for tensor, index in program.zeroed:
            if tensor == k:
                values[index] = 0
        tensors.append(_layout(values.to(dtype), k in program.channels_last))
    expected, d, deviations = _enorm_reference(tensors, dtypes, program.groups, p, c)
    entries = [_launcher_entry(tensors[r.tensor], r) for group in program.groups for r in group]
    # enorm_cycle_ asks for the deviations, enorm_group_ for the coefficients; the float64 cycles ask for both.
    wants_coefficients = not program.is_cycle or dtypes[0] == torch.float64
    coefficient_rtol = 1e-12 if all(dtype == torch.float64 for dtype in dtypes) else 1e-5

    def check(output):
        problems = []
        for k, (tensor, want) in enumerate(zip(tensors, expected)):
            # a tensor is rescaled by d, which is only as exact as the least exact energy of its group
            rtol = max(ENORM_RTOL[tensor.dtype], coefficient_rtol)
            problems += _compare_relative(f"tensor {k}", output(f"tensor{k}", tensor), want, rtol)
        if wants_coefficients:
            got_d = output("coefficients", d)
            problems += _compare_relative("coefficients", got_d, d, coefficient_rtol)
            if not program.is_cycle:
                for k, want in enumerate(_rescaled_as_stored(tensors, program.groups[0], got_d)):
                    if _to_bytes(output(f"tensor{k}", tensors[k])) != _to_bytes(want):
                        problems.append(f"tensor {k}: not the bits of its values times d^power rounded once per type")
        if program.is_cycle:
            problems += _compare("deviations", output("deviations", deviations), deviations, coefficient_rtol)
        return problems

    dtype_names = "-".join(dict.fromkeys(DTYPE_NAMES[dtype] for dtype in dtypes))
    suffix = "" if machine == "h100" else f"-{machine}"
    return KernelCase(
        "enorm",
        f"enorm-{program_name}-{dtype_names}-p{p:g}-offset{offset}{suffix}",
        dict(p=p, c=c, offset=offset, dtypes=",".join(DTYPE_NAMES[dtype] for dtype in dtypes),
             group_sizes=",".join(str(len(group)) for group in program.groups),
             entries=";".join(",".join(str(v) for v in entry) for entry in entries),
             coefficients=int(wants_coefficients), deviations=int(program.is_cycle), **MACHINES[machine]),
        {f"tensor{k}": t for k, t in enumerate(tensors)},
        check,
    )


def enorm_cases() -> list[KernelCase]:
    cases = []
    for name, program in ENORM_PROGRAMS.items():
        count = len(program.shapes)
        for dtype in DTYPES.values():
            cases.append(_enorm_case(name, [dtype] * count))
        cases.append(_enorm_case(name, [torch.float16] * count, offset=1))
        cases.append(_enorm_case(name, [torch.float32] * count, offset=1))
        # energies split over many slices and finish blocks, as on a large tensor
        cases.append(_enorm_case(name, [torch.float32] * count, machine="small"))
        cases.append(_enorm_case(name, [torch.bfloat16] * count, offset=1, machine="small"))
    mixed = list(DTYPES.values())
    for name in ("many-entries", "cycle"):
        cases.append(_enorm_case(name, [mixed[k % 4] for k in range(len(ENORM_PROGRAMS[name].shapes))]))
    for p in (1.0, 3.0):
        for name in ("conv-pair", "cycle"):
            cases.append(_enorm_case(name, [torch.float64] * len(ENORM_PROGRAMS[name].shapes), p=p, c=1.2))
            cases.append(_enorm_case(name, [torch.float32] * len(ENORM_PROGRAMS[name].shapes), p=p, c=1.2))
    return cases


# tap_mean: every padding mode, strides, dilation, Conv1d/2d/3d inputs, channels_last, both
# statistics, rows < N, one row (a single slot of rows) and many (slots added by a second kernel, on
# the small machine). Widths (C x plane) of 126, 168, 33, 60 and 3600 values take vectors of 1 to 8
# elements; bases one or three elements past the alignment unit rotate every row's columns by a head.
# (name, x shape, kernel, stride, padding as (before, after) per dim, dilation, mode)
TAP_MEAN_SHAPES = {
    "zeros-3x3": ((4, 3, 7, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "zeros"),
    "zeros-stride2-dilation2": ((3, 2, 9, 8), (3, 3), (2, 2), (2, 2, 2, 2), (2, 2), "zeros"),
    "reflect-stride3": ((3, 3, 8, 7), (3, 2), (3, 2), (2, 2, 1, 1), (1, 2), "reflect"),
    "replicate-same-even": ((2, 2, 6, 5), (4, 2), (1, 1), (1, 2, 0, 1), (1, 1), "replicate"),
    "circular-full-wrap": ((3, 2, 4, 5), (3, 3), (1, 2), (4, 4, 2, 5), (1, 1), "circular"),
    "conv1d-reflect": ((5, 3, 11), (5,), (2,), (2, 2), (1,), "reflect"),
    "conv3d-zeros": ((2, 2, 4, 5, 3), (3, 2, 3), (2, 1, 1), (1, 1, 0, 1, 1, 1), (1, 2, 1), "zeros"),
    "many-rows": ((70, 3, 5, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "circular"),
    "wide": ((3, 40, 9, 10), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "zeros"),
    # a plane of 320 positions: a block per (channel, tap) instead of a warp
    "block-teams": ((3, 4, 16, 20), (3, 5), (2, 1), (1, 1, 2, 2), (1, 1), "reflect"),
    # 18 pairs of 1920 positions: each plane split into runs (the last shorter) and a finish kernel
    "plane-runs": ((2, 2, 48, 40), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "zeros"),
}
TAP_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}


def _tap_reference(sample: torch.Tensor, geometry, statistic: str) -> torch.Tensor:
    """The reference's per-tap means of every row of ``sample`` for ``statistic``."""
    from equinorm_kernels.reference.tap_statistics import tap_mean_unchecked

    return tap_mean_unchecked(sample, 1.0, dataclasses.replace(geometry, absolute=statistic == "abs_mean"))


def _tap_mean_case(shape_name: str, dtype_name: str, channels_last: bool, statistic: str, rows_kind: str,
                   offset: int, machine: str = "h100") -> KernelCase:
    from equinorm_kernels._tap_geometry import TapGeometry, tap_output_shape

    shape, kernel, stride, padding, dilation, mode = TAP_MEAN_SHAPES[shape_name]
    dtype, acc = DTYPES[dtype_name], _accumulation(DTYPES[dtype_name])
    values = torch.randn(shape, generator=_generator(shape[0] + 3 * shape[1]), dtype=torch.float64)
    x = _layout(values.to(dtype), channels_last)
    rows = {"all": shape[0], "part": math.ceil(shape[0] / 2), "one": 1}[rows_kind]
    geometry = TapGeometry(kernel, stride, padding, dilation, mode, statistic == "abs_mean")
    sample = x[:rows].double()
    truth = _tap_reference(sample, geometry, statistic)
    magnitude = _tap_reference(sample, geometry, "abs_mean").abs().max().item() + 1e-30
    negative = (sample < 0).transpose(0, 1).reshape(shape[1], -1).any(dim=1) if statistic == "abs_mean" else (
        torch.zeros(shape[1], dtype=torch.bool))
    grad = torch.randn((shape[1], *kernel), generator=_generator(7), dtype=torch.float64).to(acc)
    leaf = sample.clone().requires_grad_(True)
    plane_truth = torch.autograd.grad(_tap_reference(leaf, geometry, "mean"), leaf, grad.double())[0][0]

    def check(output):
        rtol = 1e-13 if dtype == torch.float64 else 4e-6
        problems = _compare("mean", output("mean", truth.to(acc)), truth, rtol * magnitude)
        got_negative = output("negative", torch.zeros(shape[1], dtype=torch.uint8)) != 0
        if not torch.equal(got_negative, negative):
            problems.append(f"negative flags {got_negative.tolist()}, expected {negative.tolist()}")
        plane_scale = plane_truth.abs().max().item() + 1e-30
        problems += _compare("plane", output("plane", plane_truth.to(acc).contiguous()), plane_truth,
                             rtol * plane_scale)
        return problems

    spatial = shape[2:]
    outputs = tap_output_shape(spatial, geometry)
    dims = [(1, 1, 1, 1, 0, 0, 1)] * (3 - len(spatial))
    dims += [(spatial[i], kernel[i], stride[i], dilation[i], padding[2 * i], padding[2 * i + 1], outputs[i])
             for i in range(len(spatial))]
    layout = "cl" if channels_last else "nchw"
    suffix = "" if machine == "h100" else f"-{machine}"
    return KernelCase(
        "tap_mean",
        f"tap-{shape_name}-{layout}-{dtype_name}-{statistic}-rows{rows}-offset{offset}{suffix}",
        dict(dtype=dtype_name, rows=rows, channels=shape[1], channels_last=int(channels_last and len(shape) in (4, 5)),
             mode=TAP_MODES[mode], absolute=int(statistic == "abs_mean"), offset=offset,
             dims=";".join(",".join(str(v) for v in dim) for dim in dims), **MACHINES[machine]),
        {"x": x, "grad": grad},
        check,
    )


def tap_mean_cases() -> list[KernelCase]:
    cases = []
    for shape_name, (shape, *_rest) in TAP_MEAN_SHAPES.items():
        for channels_last in ([False, True] if len(shape) in (4, 5) else [False]):
            for dtype_name in DTYPES:
                cases.append(_tap_mean_case(shape_name, dtype_name, channels_last, "abs_mean", "all", 0))
            cases.append(_tap_mean_case(shape_name, "float", channels_last, "mean", "part", 0))
            cases.append(_tap_mean_case(shape_name, "half", channels_last, "mean", "one", 1))
            cases.append(_tap_mean_case(shape_name, "double", channels_last, "abs_mean", "part", 1))
            # row slots and their second kernel, misaligned bases
            cases.append(_tap_mean_case(shape_name, "half", channels_last, "abs_mean", "all", 3, "small"))
            cases.append(_tap_mean_case(shape_name, "float", channels_last, "mean", "all", 1, "small"))
            cases.append(_tap_mean_case(shape_name, "bfloat16", channels_last, "mean", "part", 0, "small"))
    return cases


FAMILIES = {
    "channel_mean": channel_mean_cases, "equinorm": equinorm_cases, "enorm": enorm_cases, "tap_mean": tap_mean_cases,
}


# ---- planted bugs: copies of a kernel source with one line changed ----


@dataclass(frozen=True)
class PlantedBug:
    flavour: str
    source: str
    original: str
    replacement: str
    case: str  # a case that runs the planted line
    reports: tuple[str, ...]  # the run must print one of these
    place: str  # where, as the report names it


_BLOCK_SUM_STORE = "  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = value;\n"
_SEGMENT_TOTAL = "  const acc_t total = block_sum(thread_sum);\n"
PLANTED_BUGS = {
    # racecheck's job: block_sum's thread 0 adds the warp totals before the other warps have stored theirs
    "syncthreads-removed": PlantedBug(
        "tsan", "channel_mean.cu", _BLOCK_SUM_STORE + "  __syncthreads();\n", _BLOCK_SUM_STORE,
        "mean-large-planes-nchw-float-rows5-offset0", ("WARNING: ThreadSanitizer: data race",), "block_sum",
    ),
    # the same for abs_mean's flag count: the sums' block_sum reuses warp_sums while thread 0 reads it
    "abs-flag-barrier-removed": PlantedBug(
        "tsan", "channel_mean.cu",
        "    block_negative = block_sum(static_cast<acc_t>(negative ? 1 : 0)) > 0;\n    __syncthreads();\n",
        "    block_negative = block_sum(static_cast<acc_t>(negative ? 1 : 0)) > 0;\n",
        "abs-mean-large-planes-nchw-float-rows5-offset0", ("WARNING: ThreadSanitizer: data race",), "block_sum",
    ),
    # the same in the finish: lane 0 adds the other lanes' sums before they are stored
    "finish-barrier-removed": PlantedBug(
        "tsan", "channel_mean.cu",
        "  lane_negative[slot_lane][channel_lane] = negative;\n  __syncthreads();\n",
        "  lane_negative[slot_lane][channel_lane] = negative;\n",
        "mean-segment-pieces-nchw-float-rows6-offset0", ("WARNING: ThreadSanitizer: data race",), "finish_kernel",
    ),
    # memcheck's job, in shared memory: one element past the end of a __shared__ array, through a
    # pointer. UBSan's object-size check sees it before ASan does (an ASan-only build reports the
    # global-buffer-overflow on 'scratch').
    "shared-read-past-end": PlantedBug(
        "asan", "equinorm_weight.cu",
        "for (int w = 0; w < kWarps; ++w) total += scratch[i * kWarps + w];",
        "for (int w = 0; w <= kWarps; ++w) total += scratch[i * kWarps + w];",
        "equinorm-block-team-contiguous-float-single_pass-offset0",
        ("ERROR: AddressSanitizer: global-buffer-overflow", "with insufficient space for an object of type 'double'"),
        "equinorm_weight_kernel<float, 256, 4>",
    ),
    # memcheck's job, in global memory: the last channel's energy reads one element past the tensor
    "global-read-past-end": PlantedBug(
        "asan", "enorm.cu",
        "for (; k < last; k += lanes) sums[0] +=",
        "for (; k <= last; k += lanes) sums[0] +=",
        "enorm-conv-pair-float-p2-offset0", ("ERROR: AddressSanitizer: heap-buffer-overflow",), "channel_energy",
    ),
    # the same for the energies' vector paths and the rescale's scalar tail: a run's head and tail read
    # one value too many, adjacent channels' vectors one row too many, the tail rescales one value too many
    "run-scalars-past-end": PlantedBug(
        "asan", "enorm.cu",
        "for (unsigned q = lane; q < head + (values - tail_first); q += lanes) {",
        "for (unsigned q = lane; q <= head + (values - tail_first); q += lanes) {",
        "enorm-odd-rows-half-p2-offset1", ("ERROR: AddressSanitizer: heap-buffer-overflow",), "run_channel_energy",
    ),
    "adjacent-vectors-past-end": PlantedBug(
        "asan", "enorm.cu",
        "  for (; k < last; k += lanes) {\n    scalar_t loaded[kVec];\n    load_vector<kVec>(data + value_offset(v, inner, k), loaded);",
        "  for (; k <= last; k += lanes) {\n    scalar_t loaded[kVec];\n    load_vector<kVec>(data + value_offset(v, inner, k), loaded);",
        "enorm-adjacent-vectors-half-p2-offset0", ("ERROR: AddressSanitizer: heap-buffer-overflow",),
        "adjacent_channels_energy",
    ),
    "rescale-tail-past-end": PlantedBug(
        "asan", "enorm.cu",
        "if (block == v.blocks - 1 && threadIdx.x < v.tail) {",
        "if (block == v.blocks - 1 && threadIdx.x <= v.tail) {",
        "enorm-odd-linear-float-p2-offset0", ("ERROR: AddressSanitizer: heap-buffer-overflow",), "rescale_scalar",
    ),
    # the layer's own checks, in the plain build
    "shuffle-in-divergent-branch": PlantedBug(
        "plain", "channel_mean.cu", _SEGMENT_TOTAL,
        "  thread_sum += threadIdx.x % 2 ? __shfl_xor_sync(kFullWarpMask, thread_sum, 1)\n"
        "                                : __shfl_down_sync(kFullWarpMask, thread_sum, 1);\n" + _SEGMENT_TOTAL,
        "mean-large-planes-nchw-float-rows5-offset0",
        ("reach shuffles at different call sites",), "plane_mean_kernel",
    ),
    # the GPU's misaligned-address trap: plane heads that ignore x's alignment put 16-byte loads at x + 2 bytes
    "load-ignores-alignment": PlantedBug(
        "plain", "channel_mean.cu",
        "const uint64_t phase = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(x) / sizeof(scalar_t));",
        "const uint64_t phase = 0;",
        "mean-large-planes-nchw-half-rows5-offset1", ("at misaligned address",), "__ldg of 16-byte alignment",
    ),
    # half of each warp skips a shuffle the other half waits at, and waits at the barrier after it
    "shuffle-skipped-by-half-a-warp": PlantedBug(
        "plain", "channel_mean.cu", "  value = group_sum(value, kWarpSize);\n",
        "  if (threadIdx.x % 2 == 0) value = group_sum(value, kWarpSize);\n",
        "mean-large-planes-nchw-float-rows5-offset0",
        ("no thread can go on",), "warp  0: SBSBSBSBSBSBSBSBSBSBSBSBSBSBSBSB",
    ),
    "shuffle-names-exited-lane": PlantedBug(
        "plain", "channel_mean.cu", _SEGMENT_TOTAL, "  if (threadIdx.x == 5) return;\n" + _SEGMENT_TOTAL,
        "mean-large-planes-nchw-float-rows5-offset0", ("a shuffle names an exited lane",), "thread (5,0,0)",
    ),
}


# ---- fixtures ----


@pytest.fixture(scope="module")
def toolchain():
    found, why_not = find_toolchain()
    if found is None:
        pytest.skip(f"the CUDA emulation needs g++ and the CUDA headers: {why_not}")
    return found


@pytest.fixture(scope="module")
def runners(toolchain) -> dict[str, Path]:
    """kernel_runner per flavour and per planted bug, all built at once (in parallel, from the cache)."""
    variants = {flavour: Variant(flavour) for flavour in FLAVOURS}
    try:
        for name, bug in PLANTED_BUGS.items():
            variants[name] = Variant(bug.flavour, (planted(bug.source, bug.original, bug.replacement),))
        built = build(toolchain, list(variants.values()))
    except BuildError as error:
        pytest.fail(str(error), pytrace=False)
    return {name: built[variant] for name, variant in variants.items()}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict[str, KernelCase]]:
    """Every case's inputs written to a directory, with the manifest listing them all."""
    directory = tmp_path_factory.mktemp("cuda_emulation")
    every_case = {case.name: case for make in FAMILIES.values() for case in make()}
    lines = [case.manifest_line(directory) for case in every_case.values()]
    (directory / "all.manifest").write_text("\n".join(lines) + "\n")
    return directory, every_case


@pytest.fixture(scope="module")
def runs(runners, cases) -> dict[str, subprocess.CompletedProcess]:
    """Every case run by each flavour, the flavours side by side."""
    directory, _ = cases
    with ThreadPoolExecutor(max_workers=len(FLAVOURS)) as pool:
        jobs = {
            flavour: pool.submit(
                run_runner, runners[flavour], directory / "all.manifest", directory / flavour, RUN_TIMEOUT_S
            )
            for flavour in FLAVOURS
        }
        return {flavour: job.result() for flavour, job in jobs.items()}


def _report(result, lines: int = 60) -> str:
    tail = "\n".join((result.stderr or "").splitlines()[-lines:])
    return f"exit code {result.returncode}\n{result.stdout}{tail}"


# ---- tests ----


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_every_case_runs_clean_and_twice_alike(flavour, runs):
    """No launcher error, no sanitizer report, and each case's outputs bit-identical across two runs."""
    result = runs[flavour]
    assert result.returncode == 0, _report(result)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_outputs_match_the_float64_reference(flavour, family, runs, cases):
    """Every output of every case of the family, as its flavour's run wrote it (fixture `runs`)."""
    directory, every_case = cases
    problems = []
    for case in every_case.values():
        if case.op != family:
            continue

        def output(key: str, like: torch.Tensor, case=case) -> torch.Tensor:
            return _from_bytes((directory / flavour / f"{case.name}.{key}.bin").read_bytes(), like)

        try:
            problems += [f"{case.name}: {problem}" for problem in case.check(output)]
        except (OSError, RuntimeError) as error:  # no output (the run failed) or one of the wrong size
            problems.append(f"{case.name}: {error}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("bug", list(PLANTED_BUGS))
def test_a_planted_bug_is_reported(bug, runners, cases):
    """The unmodified kernels run these cases clean (above); with the bug planted, the run must fail with
    the sanitizer's (or the layer's) report naming the planted place."""
    directory, every_case = cases
    planted_bug = PLANTED_BUGS[bug]
    manifest = directory / f"{bug}.manifest"
    manifest.write_text(every_case[planted_bug.case].manifest_line(directory) + "\n")
    result = run_runner(runners[bug], manifest, directory / bug, RUN_TIMEOUT_S)
    assert result.returncode != 0, _report(result)
    reported = any(report in result.stderr for report in planted_bug.reports)
    assert reported and planted_bug.place in result.stderr, _report(result)
