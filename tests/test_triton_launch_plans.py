"""The Triton kernels' launch plans (equinorm_kernels/triton/launch_plans.py) over real shapes, and
the kernels they launch on the split paths.

Plans (channel sums, dL/dmu row sums, ENorm energies, tap_mean's column sums): ResNet-18/50
layers at batch 1 to 256, Linear layers up to 8192 x 8192, a detection input
(2, 3, 800, 1333), in float16/bfloat16/float32 and both layouts, against the machine model stated in
launch_plans: at least two waves over 132 SMs (1056 programs) where the tensor holds that much
work, enough bytes requested at once, and per-program work bounded whatever the tensor's size.
Kernels: under Triton's interpreter (CPU tensors) or on a GPU, with plans forced to small chunks
so that the multi-chunk and multi-split paths run at small shapes, against the reference.
"""
from __future__ import annotations

import pytest
import torch

import equinorm_kernels
from equinorm_kernels import reference
from equinorm_kernels import triton as triton_backend
from equinorm_kernels.triton import launch_plans as plans

# ---- the shape table ------------------------------------------------------------------------

# (weight shape, input height = width) of every distinct conv of torchvision's ResNet-18 and
# ResNet-50 at 224 x 224, and their Linear heads (input height 0: a (N, C) input).
RESNET_LAYERS = (
    ((64, 3, 7, 7), 224), ((64, 64, 3, 3), 56), ((128, 64, 3, 3), 56), ((128, 128, 3, 3), 28),
    ((128, 64, 1, 1), 56), ((256, 128, 3, 3), 28), ((256, 256, 3, 3), 14), ((256, 128, 1, 1), 28),
    ((512, 256, 3, 3), 14), ((512, 512, 3, 3), 7), ((512, 256, 1, 1), 14), ((1000, 512), 0),
    ((64, 64, 1, 1), 56), ((256, 64, 1, 1), 56), ((64, 256, 1, 1), 56), ((128, 256, 1, 1), 56),
    ((512, 128, 1, 1), 28), ((128, 512, 1, 1), 28), ((256, 512, 1, 1), 28), ((1024, 256, 1, 1), 14),
    ((256, 1024, 1, 1), 14), ((512, 1024, 1, 1), 14), ((2048, 512, 1, 1), 7), ((512, 2048, 1, 1), 7),
    ((2048, 1024, 1, 1), 14), ((1000, 2048), 0),
)
LINEAR_WEIGHTS = ((1024, 1024), (4096, 1024), (1024, 4096), (4096, 4096), (8192, 8192), (8192, 1024))
BATCHES = (1, 8, 32, 256)
ELEMENT_SIZES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
DETECTION_INPUT = (2, 3, 800, 1333)


def _inputs():
    """(N, C, spatial) of every ResNet layer's input at every batch size, and the detection input."""
    shapes = {(batch, weight[1], height * height if height else 1)
              for weight, height in RESNET_LAYERS for batch in BATCHES}
    shapes |= {(batch, weight[1], 1) for weight in LINEAR_WEIGHTS for batch in BATCHES}
    n, c, h, w = DETECTION_INPUT
    shapes.add((n, c, h * w))
    return sorted(shapes)


def _weights():
    """(out, in, taps) of every ResNet and Linear weight."""
    shapes = {(w[0], w[1], w[2] * w[3] if len(w) == 4 else 1) for w, _ in RESNET_LAYERS}
    return sorted(shapes | {(out, width, 1) for out, width in LINEAR_WEIGHTS})


# ---- the machine model's properties ----------------------------------------------------------

RESIDENT_PROGRAMS = plans.SMS * plans.PROGRAMS_PER_SM


def _assert_waves(programs: int, total_elements: int, min_per_program: int, label: str) -> None:
    """Two waves over the machine when the tensor holds two waves of minimal programs; below that,
    every minimal share of the tensor gets its own program."""
    wanted = min(plans.TARGET_PROGRAMS, total_elements // min_per_program)
    assert programs >= wanted, f"{label}: {programs} programs, the model asks for {wanted}"


def _assert_bytes_in_flight(programs: int, step_bytes: int, label: str) -> None:
    """Once the machine is full, the resident programs' loads per step cover HBM's latency."""
    if programs >= RESIDENT_PROGRAMS:
        in_flight = RESIDENT_PROGRAMS * step_bytes
        assert in_flight >= plans.MIN_BYTES_IN_FLIGHT, f"{label}: {in_flight} bytes in flight"


def _assert_row_sum_bounded(plan: plans.RowSumPlan, label: str) -> None:
    assert plan.chunk_rows <= max(plans.LONG_CHUNK_ROWS, plan.rows // plans.MAX_CHUNKS + 1), label
    assert plan.chunks <= plans.MAX_CHUNKS, label
    assert plan.programs * plan.chunk_rows * plan.block_columns >= plan.rows * plan.columns, label  # covers it all


@pytest.mark.parametrize("dtype", list(ELEMENT_SIZES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_sum_plans_fill_the_machine_with_bounded_programs(layout, dtype):
    size = ELEMENT_SIZES[dtype]
    for rows, channels, spatial in _inputs():
        label = f"{layout} x ({rows}, {channels}, {spatial})"
        total = rows * channels * spatial
        if layout == "contiguous" and spatial > 1:
            plan = plans.planar_channel_sum_plan(rows, channels, spatial)
            assert plan.sample_splits * plan.rows_per_split >= rows and plan.spatial_splits * plan.segment >= spatial
            tile_rows = plans.CHANNEL_SUM_TILE // plan.block_positions
            step = min(tile_rows, plan.rows_per_split) * min(plan.block_positions, plan.segment)
        else:
            plan = plans.channels_last_channel_sum_plan(rows * spatial, channels)
            assert plan.splits * plan.positions_per_split >= rows * spatial
            step = min(plans.CHANNEL_SUM_TILE // plan.block_channels, plan.positions_per_split) * min(
                plan.block_channels, channels)
        # A program never reads more than the bound, so work past two waves means more programs.
        assert plan.elements_per_program <= plans.MAX_ELEMENTS_PER_PROGRAM, label
        _assert_waves(plan.programs, total, plans.MIN_ELEMENTS_PER_PROGRAM, label)
        _assert_bytes_in_flight(plan.programs, step * size, label)
        _assert_row_sum_bounded(plan.finish, label + " finish")


def test_backward_row_sum_plans_fill_the_machine_with_bounded_chunks():
    """dL/dmu: (out channels) rows of float64 terms per input channel, or per (channel, tap)."""
    for out, width, taps in _weights():
        for values in {width, width * taps}:
            label = f"backward {out} x {values}"
            plan = plans.row_sum_plan(1, out, values)
            _assert_row_sum_bounded(plan, label)
            min_per_program = plans.MIN_CHUNK_ROWS * min(plan.block_columns, values)
            _assert_waves(plan.programs, out * values, min_per_program, label)
            step = min(plan.block_rows, plan.chunk_rows) * min(plan.block_columns, values) * 8
            _assert_bytes_in_flight(plan.programs, step, label)


@pytest.mark.parametrize("dtype", list(ELEMENT_SIZES))
def test_energy_plans_fill_the_machine_with_bounded_chunks(dtype):
    """ENorm: every weight's row energies (out rows of in x taps values) and column energies (in
    columns of out x taps values)."""
    for out, width, taps in _weights():
        for channels, reduction, role in ((out, width * taps, "rows"), (width, out * taps, "columns")):
            label = f"{role} energies of {out} x {width} x {taps}"
            plan = plans.energy_plan(channels, reduction)
            assert plan.chunks <= plans.MAX_CHUNKS and plan.chunks * plan.chunk >= reduction, label
            assert plan.elements_per_program <= plans.MAX_ELEMENTS_PER_PROGRAM, label
            _assert_waves(plan.programs, channels * reduction, plans.MIN_ELEMENTS_PER_PROGRAM, label)
            step = min(plan.block_channels, channels) * min(plan.block_values, plan.chunk)
            _assert_bytes_in_flight(plan.programs, step * ELEMENT_SIZES[dtype], label)


def test_tap_column_sum_plans_fill_the_machine_with_bounded_programs():
    """tap_mean reads x[:rows] as a (rows, C x plane) matrix and sums its columns."""
    for rows, channels, spatial in _inputs():
        width = channels * spatial
        label = f"tap_mean columns of ({rows}, {width})"
        plan = plans.tap_column_sum_plan(rows, width)
        assert plan.splits * plan.rows_per_split >= rows and plan.splits <= plans.MAX_CHUNKS, label
        assert plan.elements_per_program <= plans.MAX_ELEMENTS_PER_PROGRAM, label
        min_per_program = min(plans.MIN_ELEMENTS_PER_PROGRAM, plan.block_columns)
        _assert_waves(plan.programs, rows * width, min_per_program, label)


def test_a_smaller_last_batch_keeps_the_tuning_keys():
    """With autotuning on, the channel-sum kernels are tuned per tile shape (their block sizes and
    flags), which the plan keeps when only the batch size changes."""
    for rows, channels, spatial in _inputs():
        if rows < 8:
            continue
        last = rows - 3  # a dataset whose size is not a multiple of the batch size
        if spatial > 1:
            full, partial = (plans.planar_channel_sum_plan(n, channels, spatial) for n in (rows, last))
            assert full.block_positions == partial.block_positions, (rows, channels, spatial)
        full, partial = (plans.channels_last_channel_sum_plan(n * spatial, channels) for n in (rows, last))
        assert full.block_channels == partial.block_channels, (rows, channels, spatial)


def test_shapes_that_used_serial_loops_get_two_waves():
    """A 4096 x 4096 Linear's backward sum over output channels (once 4 programs looping over 4096
    rows each), a detection input's NCHW channel sums (once 6 programs) and channels_last sums
    (once capped at 128 splits), a 4096 x 4096 Linear's energies."""
    backward = plans.row_sum_plan(1, 4096, 4096)
    assert (backward.programs, backward.finish_programs) == (2048, 16)
    assert backward.chunk_rows == plans.SHORT_CHUNK_ROWS
    n, c, h, w = DETECTION_INPUT
    assert plans.planar_channel_sum_plan(n, c, h * w).programs == plans.TARGET_PROGRAMS
    assert plans.channels_last_channel_sum_plan(n * h * w, c).programs >= plans.TARGET_PROGRAMS
    assert plans.energy_plan(4096, 4096).programs >= plans.TARGET_PROGRAMS


def test_plans_depend_on_sizes_only_through_hints():
    """A symbolic batch size (torch.compile(dynamic=True)) is planned from its example value, and
    asking for the plan adds no guard on it."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from equinorm_kernels.triton._runtime import size_hint

    env = ShapeEnv()
    batch = env.create_symintnode(env.create_symbol(32, source=ConstantSource("batch"),
                                                    dynamic_dim=DimDynamic.DYNAMIC), hint=32)
    spatial = 56 * 56
    plan = plans.planar_channel_sum_plan(size_hint(batch), 64, spatial)
    splits = plans.cdiv(batch, plan.rows_per_split) * plan.spatial_splits  # how the launcher sizes its grid
    assert isinstance(splits, torch.SymInt) and size_hint(splits) == plan.splits
    assert plan == plans.planar_channel_sum_plan(32, 64, spatial)
    assert not env.guards


# ---- the kernels on their split paths -------------------------------------------------------

DEVICES = [
    device
    for device, present in (("cpu", triton_backend.interpreted()), ("cuda", torch.cuda.is_available()))
    if present and "triton" in equinorm_kernels.available_backends(device)
]
needs_triton = pytest.mark.skipif(not DEVICES, reason="the Triton backend cannot run here")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@needs_triton
@pytest.mark.parametrize(
    "batches,rows,width,chunk_rows",
    [(1, 37, 5, 4), (1, 37, 300, 7), (3, 20, 2, 3), (6, 2, 1, 1), (1, 5, 3, None), (2, 130, 9, None)],
    ids=["tall", "wide-two-column-blocks", "groups", "depthwise", "one-chunk", "default-chunks"],
)
def test_row_sums_match_a_float64_sum(batches, rows, width, chunk_rows):
    from equinorm_kernels.triton._row_sums import launch_row_sums

    device = DEVICES[0]
    x = torch.randn((batches, rows, width), generator=_generator(1), dtype=torch.float64)
    plan = plans.row_sum_plan(batches, rows, width, chunk_rows=chunk_rows)
    out = torch.empty(batches * width, dtype=torch.float64, device=device)
    launched = launch_row_sums(x.to(device), out, batches, rows, width, plan=plan)
    assert launched.chunks == -(-rows // plan.chunk_rows)
    torch.testing.assert_close(out.cpu(), x.sum(dim=1).reshape(-1), rtol=1e-13, atol=1e-13)
    again = torch.empty_like(out)
    launch_row_sums(x.to(device), again, batches, rows, width, plan=plan)
    assert torch.equal(out, again)  # a fixed order: the same bits every run


@needs_triton
@pytest.mark.parametrize(
    "shape,groups,per_tap",
    [((70, 6), 1, False), ((40, 3, 3, 3), 2, False), ((40, 3, 3, 3), 2, True), ((36, 1, 3, 3), 12, False),
     ((36, 1, 3, 3), 12, True)],
    ids=["linear", "grouped", "grouped-per-tap", "depthwise-multiplier-3", "depthwise-per-tap"],
)
def test_backward_over_many_output_channels_matches_the_reference(shape, groups, per_tap):
    """More output channels per group than one chunk: dL/dmu takes the two-stage row sum."""
    device = DEVICES[0]
    outputs_per_group = shape[0] // groups
    plan = plans.row_sum_plan(groups, outputs_per_group, shape[1])
    assert plan.chunks > 1 or outputs_per_group <= plans.MIN_CHUNK_ROWS
    ops = torch.ops.equinorm_kernels
    g = _generator(3)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    mean_shape = (shape[1] * groups, *shape[2:]) if per_tap else (shape[1] * groups,)
    mean = (torch.rand(mean_shape, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    gain = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)
    w = weight.clone().requires_grad_()
    expected = reference.equinorm.equinorm_weight_unchecked(w, mean, 0.75, groups, "exact", gain, 1e-5)
    probe = torch.randn(shape, generator=g, dtype=torch.float64)
    expected_grad_w, expected_grad_mean = torch.autograd.grad((expected * probe).sum(), (w, mean))
    out, stats = ops.triton_equinorm_weight(weight.to(device), mean.detach().to(device), gain.to(device), 0.75,
                                            groups, "exact", 1e-5)
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=1e-10, atol=1e-12)
    grad_w, grad_mean, _ = ops.triton_equinorm_backward(
        probe.to(device), weight.to(device), mean.detach().to(device), gain.to(device), stats, groups)
    torch.testing.assert_close(grad_w.cpu(), expected_grad_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_mean.cpu(), expected_grad_mean, rtol=1e-10, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("per_program", [None, 7, 40])
def test_energies_in_chunks_match_the_reference(p, per_program):
    """Row and column energies of a grouped conv, a channels_last conv and a flattened Linear
    (columns per channel), each channel's values cut into chunks."""
    from equinorm_kernels.triton import enorm as triton_enorm

    device = DEVICES[0]
    g = _generator(5)
    cases = [
        (torch.randn(12, 3, 3, 3, generator=g, dtype=torch.float64), 2, 1),
        (torch.randn(10, 4, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
         1, 1),
        (torch.randn(9, 24, generator=g, dtype=torch.float64), 1, 4),
    ]
    chunk_counts = set()
    for weight, groups, per_channel in cases:
        tensors = [weight.to(device)]
        expected = {
            0: reference.enorm.enorm_row_energy(weight, p),
            1: reference.enorm.enorm_column_energy(weight, p, groups=groups, columns_per_channel=per_channel),
        }
        for axis, record in ((0, [0, 0, 1, 1, 1, 1]), (1, [0, 1, 1, 1, groups, per_channel])):
            entry = triton_enorm._decode_entry(tensors, record)
            energy = torch.empty(entry.channels, dtype=torch.float64, device=device)
            plan = triton_enorm._launch_energy(tensors[0], entry, p, energy, per_program=per_program)
            chunk_counts.add(plan.chunks)
            torch.testing.assert_close(energy.cpu(), expected[axis], rtol=1e-12, atol=1e-12)
    assert (chunk_counts == {1}) == (per_program is None)
