"""The CUDA kernels' launch plans (csrc/cuda/launch_plans.h) against the machine model they are made for.

tests/cuda_emulation/launch_plan_driver.cpp prints the plan of every shape in the tables below (real
network shapes: ResNet-18/50 layer inputs at batch 1 to 256, Linear layers up to 8192 x 8192,
detection-size inputs; float16, bfloat16 and float32; NCHW and channels_last), and each test
asserts one property of the model stated in launch_plans.h for every plan:

- waves: at least two waves of blocks over the 132 multiprocessors at the kernel's guaranteed
  occupancy, unless the tensor is too small for every block to stream min_block_bytes;
- bytes in flight: resident blocks x threads x unrolled loads x load width covers the memory
  latency at the copy bandwidth (32 KiB per multiprocessor);
- vector loads: 16-byte loads on the aligned body of every contiguous run, whatever the plane
  length or the base's alignment (heads and tails are scalar); ENorm's energies of a contiguous
  conv's columns (runs of a few taps) load one element each, with as many bytes in flight;
- no serial loop that grows with a tensor dimension: the finish adds at most 64 slots per block in
  at most two levels, and a thread's share of the loads is the tensor's spread over all blocks.

The emulation cases (tests/test_cuda_emulation.py) run some of these plans' paths on small shapes
with smaller machines; the tests named for them check that their plans take the paths they are meant to.
"""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass

import pytest

from cuda_emulation.build import BuildError, build_plan_driver

MULTIPROCESSORS = 132
WAVES = 2
MIN_BLOCK_BYTES = 8 * 1024
BYTES_IN_FLIGHT_PER_MULTIPROCESSOR = 32 * 1024
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@pytest.fixture(scope="module")
def driver():
    try:
        return build_plan_driver()
    except BuildError as error:
        pytest.fail(str(error), pytrace=False)


def plans(driver, requests: list[str], machine: tuple[int, int, int, int] | None = None) -> list[dict]:
    """The driver's plan for each request line, in order."""
    lines = ([f"machine {' '.join(map(str, machine))}"] if machine else []) + requests
    result = subprocess.run([str(driver)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == len(requests)
    return answers


# ---- channel_mean: the shape table ----


@dataclass(frozen=True)
class ChannelMeanShape:
    name: str
    batch: int
    channels: int
    spatial: tuple[int, ...]  # () for an (N, C) input
    dtype: str
    channels_last: bool
    misalignment: int = 0  # bytes past a 16-byte boundary

    @property
    def numel(self) -> int:
        return self.batch * self.channels * math.prod(self.spatial)

    @property
    def bytes(self) -> int:
        return self.numel * ELEMENT_BYTES[self.dtype]

    def request(self) -> str:
        spatial = math.prod(self.spatial)
        channels_last = self.channels_last or not self.spatial
        accumulation = 4
        return (f"channel_mean {self.batch} {self.channels} {spatial} {int(channels_last)} "
                f"{ELEMENT_BYTES[self.dtype]} {accumulation} {self.misalignment}")


# (channels, side) of every conv input of ResNet-18 and ResNet-50 at 224 x 224
RESNET_INPUTS = sorted({
    (3, 224), (64, 112), (64, 56), (128, 28), (256, 14), (512, 7),  # ResNet-18 (and its stage inputs)
    (256, 56), (128, 56), (512, 28), (256, 28), (1024, 14), (512, 14), (2048, 7),  # ResNet-50 bottlenecks
})
# Inception-style planes whose length is no multiple of the vector width
ODD_PLANES = [(192, 35), (768, 17), (64, 147), (2048, 7)]
# detection inputs (batch 2 and 8): the image and the FPN levels of an 800 x 1216 input
DETECTION_INPUTS = [(3, (800, 1216)), (256, (200, 304)), (256, (100, 152)), (256, (50, 76)), (256, (25, 38))]
LINEAR_FEATURES = [512, 1024, 2048, 4096, 8192]


def channel_mean_shapes() -> list[ChannelMeanShape]:
    shapes = []
    for dtype in ELEMENT_BYTES:
        for channels_last in (False, True):
            layout = "cl" if channels_last else "nchw"
            for batch in (1, 8, 32, 256):
                for channels, side in RESNET_INPUTS + ODD_PLANES:
                    shapes.append(ChannelMeanShape(f"resnet-c{channels}-{side}x{side}-n{batch}-{layout}-{dtype}",
                                                   batch, channels, (side, side), dtype, channels_last))
            for batch in (2, 8):
                for channels, plane in DETECTION_INPUTS:
                    shapes.append(ChannelMeanShape(f"detection-c{channels}-{plane[0]}x{plane[1]}-n{batch}-{layout}-{dtype}",
                                                   batch, channels, plane, dtype, channels_last))
        for batch in (1, 32, 256, 4096):
            for features in LINEAR_FEATURES:
                shapes.append(ChannelMeanShape(f"linear-{batch}x{features}-{dtype}", batch, features, (), dtype, False))
        # NCHW planes behind a base 2 bytes past a 16-byte boundary (a sliced batch)
        for channels, side in ODD_PLANES + [(64, 56)]:
            shapes.append(ChannelMeanShape(f"misaligned-c{channels}-{side}x{side}-{dtype}", 32, channels,
                                           (side, side), dtype, False, misalignment=ELEMENT_BYTES[dtype]))
    return shapes


CHANNEL_MEAN_SHAPES = channel_mean_shapes()


@pytest.fixture(scope="module")
def channel_mean_plans(driver) -> list[tuple[ChannelMeanShape, dict]]:
    return list(zip(CHANNEL_MEAN_SHAPES, plans(driver, [s.request() for s in CHANNEL_MEAN_SHAPES])))


def wave_blocks(plan: dict) -> int:
    return MULTIPROCESSORS * plan["blocks_per_multiprocessor"] * WAVES


def failures(pairs, predicate, describe) -> list[str]:
    return [f"{shape.name}: {describe(shape, plan)}" for shape, plan in pairs if not predicate(shape, plan)]


def test_channel_mean_fills_two_waves_unless_the_tensor_is_small(channel_mean_plans):
    """blocks >= two waves, or every block already streams about min_block_bytes (at most twice)."""
    bad = failures(
        channel_mean_plans,
        lambda shape, plan: plan["blocks"] >= min(wave_blocks(plan), shape.bytes // (2 * MIN_BLOCK_BYTES)),
        lambda shape, plan: f"{plan['blocks']} blocks for {shape.bytes} bytes ({plan['mode']}, slots {plan['slots']})",
    )
    assert not bad, "\n".join(bad[:30])
    # the example: N256 C128 28x28 float16 channels_last had 128 blocks
    example = next(plan for shape, plan in channel_mean_plans if shape.name == "resnet-c128-28x28-n256-cl-float16")
    assert example["blocks"] >= wave_blocks(example) == 1056


def test_channel_mean_keeps_enough_bytes_in_flight(channel_mean_plans):
    def in_flight(plan):
        return plan["blocks_per_multiprocessor"] * plan["threads"] * plan["unroll"] * plan["load_bytes"]

    bad = failures(channel_mean_plans, lambda shape, plan: in_flight(plan) >= BYTES_IN_FLIGHT_PER_MULTIPROCESSOR,
                   lambda shape, plan: f"{in_flight(plan)} bytes in flight per multiprocessor ({plan['mode']})")
    assert not bad, "\n".join(bad[:30])


def test_channel_mean_loads_16_bytes_on_aligned_bodies(channel_mean_plans):
    """NCHW planes of any length (7x7, 17x17, 35x35, 147x147) and misaligned NCHW bases included."""
    pairs = [(s, p) for s, p in channel_mean_plans if not (s.channels_last and s.misalignment)]
    bad = failures(pairs, lambda shape, plan: plan["load_bytes"] == 16,
                   lambda shape, plan: f"{plan['load_bytes']}-byte loads ({plan['mode']})")
    assert not bad, "\n".join(bad[:30])
    for shape, plan in pairs:
        if plan["mode"] == "planes":  # heads and tails are the only scalar loads: fewer than two vectors a plane
            assert plan["plane_scalars"] < 2 * plan["vec"], shape.name
            assert plan["plane_vectors"] * plan["vec"] + plan["plane_scalars"] == plan["spatial"], shape.name


def test_channel_mean_channels_last_misaligned_bases_keep_16_byte_loads(driver):
    """channels_last and (N, C) inputs whose base sits one or three elements past a 16-byte boundary (a
    sliced batch): the column tiles rotate their threads' shares by the head, so the body keeps 16-byte
    loads and only one thread per run reads scalars."""
    shapes = [ChannelMeanShape("cl-misaligned", 32, 256, (14, 14), "float16", True, misalignment=2)]
    for dtype, element_bytes in ELEMENT_BYTES.items():
        for misalignment in (element_bytes, 3 * element_bytes):
            for batch in (1, 32):
                for channels, side in RESNET_INPUTS + ODD_PLANES:
                    shapes.append(ChannelMeanShape(f"cl-c{channels}-{side}x{side}-n{batch}-{dtype}-m{misalignment}",
                                                   batch, channels, (side, side), dtype, True, misalignment))
            for features in LINEAR_FEATURES:
                shapes.append(ChannelMeanShape(f"linear-32x{features}-{dtype}-m{misalignment}", 32, features, (),
                                               dtype, False, misalignment))
    answers = plans(driver, [shape.request() for shape in shapes])
    assert answers[0]["load_bytes"] == 16
    for shape, plan in zip(shapes, answers):
        assert plan["mode"] == "columns" and plan["load_bytes"] == 16, shape.name
        assert (plan["head"] * ELEMENT_BYTES[shape.dtype] + shape.misalignment) % 16 == 0, shape.name
        assert 0 < plan["head"] < plan["vec"], shape.name


def test_channel_mean_emulation_cases_take_the_rotated_column_paths(driver):
    """The misaligned column cases of tests/test_cuda_emulation.py (offset 3 on its small machine) run rotated
    runs over several slots: a 128-column tile beside an 8-column one, and contiguous steps of (N, C) rows."""
    machine = (2, 2, 64, BYTES_IN_FLIGHT_PER_MULTIPROCESSOR)
    requests = {  # request: (head, tiles)
        "channel_mean 9 136 6 1 2 4 6": (5, 2),  # wide-channels, channels_last, half
        "channel_mean 700 13 1 1 2 4 6": (5, 1),  # linear-narrow, half
        "channel_mean 3 5 63 1 2 4 6": (5, 1),  # odd, channels_last, half
    }
    for (request, (head, tiles)), plan in zip(requests.items(), plans(driver, list(requests), machine)):
        assert plan["mode"] == "columns" and plan["load_bytes"] == 16, request
        assert (plan["head"], plan["tiles"]) == (head, tiles), request
        assert plan["slots"] > 1 or request.startswith("channel_mean 3 "), request


def test_channel_mean_has_no_serial_loop_growing_with_the_tensor(channel_mean_plans):
    """The finish: at most two levels of <= 64 slots per block; the main kernel: a thread's loads are
    the tensor's spread evenly over all blocks (no block owns a whole channel while others idle)."""
    problems = []
    for shape, plan in channel_mean_plans:
        if plan["finish_levels"] > 2 or (plan["slots"] > 1) != (plan["finish_levels"] > 0):
            problems.append(f"{shape.name}: {plan['slots']} slots, {plan['finish_levels']} finish levels")
        if plan["mode"] == "columns":
            # a column thread walks its slot's rows; a channel's S columns are added by one thread, S < 128
            per_thread = math.ceil(plan["rows_per_slot"] / plan["tile_rows"])
            assert plan["spatial"] < 128, shape.name
        else:
            per_thread = math.ceil(plan["slot_vectors"] / plan["threads"])
        loads = shape.numel / plan["vec"]
        even = loads / (plan["blocks"] * plan["threads"])
        if per_thread > 2 * even + 4:
            problems.append(f"{shape.name}: {per_thread} loads per thread where an even split gives {even:.1f}")
    assert not problems, "\n".join(problems[:30])


def test_channel_mean_workspace_holds_every_partial(channel_mean_plans):
    for shape, plan in channel_mean_plans:
        if plan["slots"] == 1:
            assert plan["workspace_bytes"] == 0, shape.name
        else:
            assert plan["workspace_bytes"] >= 2 * plan["slots"] * plan["channels"] * 5, shape.name


def test_no_kernel_clears_counters_before_every_call():
    """No cudaMemsetAsync in any launcher: the finishes are separate kernels with no counters to reset."""
    from cuda_emulation.build import KERNEL_SOURCES

    assert KERNEL_SOURCES
    for source in KERNEL_SOURCES:
        assert "cudaMemsetAsync" not in source.read_text(), source.name


# ---- ENorm: energies, finish and rescale of a producer/consumer group ----


@dataclass(frozen=True)
class EnormGroup:
    """A producer's rows and its consumer's columns: one group of ENorm's cycle."""

    name: str
    producer: tuple[int, ...]  # (out, in, *kernel)
    consumer: tuple[int, ...]
    dtype: str
    consumer_channels_last: bool = False

    @property
    def channels(self) -> int:
        return self.producer[0]

    def entries(self) -> list[tuple[int, int, bool]]:
        """(channels, values per channel, channels adjacent) of the rows, then the columns."""
        rows = (self.channels, math.prod(self.producer[1:]), False)
        taps = math.prod(self.consumer[2:])
        adjacent = self.consumer_channels_last or taps == 1
        return [rows, (self.channels, self.consumer[0] * taps, adjacent)]

    @property
    def bytes(self) -> int:
        return sum(c * v for c, v, _ in self.entries()) * ELEMENT_BYTES[self.dtype]

    def request(self) -> str:
        """Layouts as the driver takes them: the rows are a run per channel (2), the columns adjacent (1) or
        runs of the kernel's taps (0)."""
        layouts = [2] + [int(a) for _, _, a in self.entries()[1:]]
        items = " ".join(f"{c} {v} {layout} {ELEMENT_BYTES[self.dtype]}"
                         for (c, v, _), layout in zip(self.entries(), layouts))
        return f"enorm_energy {self.channels} {len(self.entries())} {items}"


LINEAR_PAIRS = [((h, k), (m, h)) for h in (1024, 4096, 8192) for k in (1024, 8192) for m in (1024, 8192)]
LINEAR_PAIRS += [((16384, 4096), (4096, 16384))]  # the 4096 x 16384 Linear consumer of the issue
CONV_PAIRS = [
    ((64, 64, 3, 3), (64, 64, 3, 3)), ((128, 64, 3, 3), (128, 128, 3, 3)), ((256, 128, 3, 3), (256, 256, 3, 3)),
    ((512, 256, 3, 3), (512, 512, 3, 3)),  # ResNet-18 stages
    ((64, 256, 1, 1), (64, 64, 3, 3)), ((64, 64, 3, 3), (256, 64, 1, 1)), ((512, 1024, 1, 1), (512, 512, 3, 3)),
    ((2048, 512, 1, 1), (512, 2048, 1, 1)),  # ResNet-50 bottlenecks
]


def enorm_groups() -> list[EnormGroup]:
    groups = []
    for dtype in ELEMENT_BYTES:
        for producer, consumer in LINEAR_PAIRS:
            groups.append(EnormGroup(f"linear-{producer}-{consumer}-{dtype}", producer, consumer, dtype))
        for producer, consumer in CONV_PAIRS:
            for channels_last in (False, True):
                layout = "cl" if channels_last else "contiguous"
                groups.append(EnormGroup(f"conv-{producer}-{consumer}-{layout}-{dtype}", producer, consumer, dtype,
                                         channels_last))
    return groups


ENORM_GROUPS = enorm_groups()


@pytest.fixture(scope="module")
def energy_plans(driver) -> list[tuple[EnormGroup, dict]]:
    return list(zip(ENORM_GROUPS, plans(driver, [g.request() for g in ENORM_GROUPS])))


def test_enorm_energies_fill_two_waves_unless_the_group_is_small(energy_plans):
    bad = failures(
        energy_plans,
        lambda group, plan: plan["blocks"] >= min(wave_blocks(plan), group.bytes // (2 * MIN_BLOCK_BYTES)),
        lambda group, plan: f"{plan['blocks']} blocks for {group.bytes} bytes (slices {plan['slices']})",
    )
    assert not bad, "\n".join(bad[:30])
    # the 4096 x 16384 float32 consumer had 64 energy blocks, each thread walking a 4096-value column
    example = next(plan for group, plan in energy_plans if group.name.startswith("linear-(16384, 4096)")
                   and group.dtype == "float32")
    assert example["entry_blocks"][1] >= 8 * 64 and example["slice_values"][1] <= 512


def test_enorm_energy_blocks_stream_balanced_bytes(energy_plans):
    """No block walks a whole long channel while the others are done: every block of a group streams at
    most twice the group's bytes over two waves (or min_block_bytes); the finish adds a bounded number
    of partials per channel, over one block per 32 channels."""
    problems = []
    for group, plan in energy_plans:
        fair = max(MIN_BLOCK_BYTES, group.bytes // wave_blocks(plan))
        for (channels, values, _), lanes, unit_channels, slice_values in zip(
                group.entries(), plan["lanes"], plan["unit_channels"], plan["slice_values"]):
            block_channels = min(channels, plan["threads"] // lanes * unit_channels)
            block_bytes = block_channels * slice_values * ELEMENT_BYTES[group.dtype]
            if block_bytes > 2 * fair:
                problems.append(f"{group.name}: a block streams {block_bytes} bytes where {fair} is fair")
        if plan["partial_rows"] > len(group.entries()) * wave_blocks(plan):
            problems.append(f"{group.name}: {plan['partial_rows']} partial rows per channel")
        if plan["finish_blocks"] != math.ceil(group.channels / 32):
            problems.append(f"{group.name}: {plan['finish_blocks']} finish blocks for {group.channels} channels")
    assert not problems, "\n".join(problems[:30])


def test_enorm_energies_keep_enough_bytes_in_flight(energy_plans):
    """Every entry: resident blocks x threads x loads in flight x load width. Rows (a run per channel) and
    adjacent columns (Linear, 1x1 and channels_last convs) load 16 bytes; runs of a few taps (3x3 columns
    of a contiguous conv) load one element, with more of them in flight."""
    for group, plan in energy_plans:
        for k, (layout, unroll, load_bytes) in enumerate(zip(plan["layouts"], plan["unroll"], plan["load_bytes"])):
            in_flight = plan["blocks_per_multiprocessor"] * plan["threads"] * unroll * load_bytes
            assert in_flight >= BYTES_IN_FLIGHT_PER_MULTIPROCESSOR, f"{group.name} entry {k}"
            assert load_bytes == (ELEMENT_BYTES[group.dtype] if layout == "strided" else 16), f"{group.name} entry {k}"
        assert plan["layouts"][0] == "run", group.name
        adjacent = group.entries()[1][2]
        assert plan["layouts"][1] == ("adjacent" if adjacent else "strided"), group.name


def rescale_requests() -> list[tuple[str, int, str]]:
    """(request, row length, dtype) for every weight of the groups above, rescaled row by row."""
    requests = []
    for group in ENORM_GROUPS:
        for weight in (group.producer, group.consumer):
            row = math.prod(weight[1:])
            requests.append((f"enorm_rescale {weight[0]} {row} {ELEMENT_BYTES[group.dtype]} 0", row, group.dtype))
    return requests


def test_enorm_rescale_loads_16_bytes_and_keeps_them_in_flight(driver):
    requests = rescale_requests()
    for (request, row, dtype), plan in zip(requests, plans(driver, [r for r, _, _ in requests])):
        assert plan["load_bytes"] == 16, request  # every row of the table is a multiple of 16 bytes long
        in_flight = plan["blocks_per_multiprocessor"] * plan["threads"] * plan["unroll"] * plan["load_bytes"]
        assert in_flight >= BYTES_IN_FLIGHT_PER_MULTIPROCESSOR, request


def test_enorm_rescale_of_odd_rows_keeps_vector_loads(driver):
    """Rows whose length is no multiple of the vector width (a 3x7x7 stem conv, biases) and bases past a
    16-byte boundary: 16-byte loads on the aligned body, fewer than one vector's values in each of the
    scalar head and tail, every value in exactly one of them, every body vector in one block."""
    assert plans(driver, ["enorm_rescale 64 147 2 0"])[0]["load_bytes"] == 16
    for outer, row, element_bytes, misalignment in [(64, 147, 2, 0), (64, 147, 2, 2), (1000, 1, 2, 6), (3, 5, 4, 4),
                                                    (512, 27, 4, 8), (7, 3, 8, 8), (2, 3, 2, 14)]:
        request = f"enorm_rescale {outer} {row} {element_bytes} {misalignment}"
        plan = plans(driver, [request])[0]
        vec = plan["vec"]
        assert plan["load_bytes"] == vec * element_bytes == 16, request
        assert plan["head"] < vec and plan["tail"] < vec, request
        assert plan["head"] + plan["body_vectors"] * vec + plan["tail"] == plan["values"] == outer * row, request
        if plan["values"] > plan["head"]:  # the body starts at the 16-byte boundary
            assert (misalignment + plan["head"] * element_bytes) % 16 == 0, request
        assert (plan["blocks"] - 1) * plan["block_vectors"] < max(1, plan["body_vectors"]), request
        assert plan["body_vectors"] <= plan["blocks"] * plan["block_vectors"], request


# ---- EquiNorm weight transform and backward: one team (a warp or the block) per output channel ----


def equinorm_weights() -> list[tuple[str, tuple[int, ...], str, bool]]:
    """(name, weight shape, dtype, channels_last) of the ResNet convs and Linear layers above."""
    weights = []
    for dtype in ELEMENT_BYTES:
        for producer, consumer in CONV_PAIRS:
            for weight in (producer, consumer):
                for channels_last in (False, True):
                    weights.append((f"conv-{weight}-{'cl' if channels_last else 'contiguous'}-{dtype}", weight, dtype,
                                    channels_last))
        for producer, consumer in LINEAR_PAIRS:
            for weight in (producer, consumer):
                weights.append((f"linear-{weight}-{dtype}", weight, dtype, False))
    return weights


def equinorm_request(shape: tuple[int, ...], dtype: str, channels_last: bool, per_tap: bool = False) -> str:
    taps = math.prod(shape[2:])
    return (f"equinorm_weight {shape[0]} {shape[1]} {taps} 1 {int(channels_last)} {int(per_tap)} "
            f"{ELEMENT_BYTES[dtype]}")


@pytest.fixture(scope="module")
def weight_plans(driver):
    weights = equinorm_weights()
    return list(zip(weights, plans(driver, [equinorm_request(w, d, cl) for _, w, d, cl in weights])))


def test_equinorm_weight_teams_cover_every_output_channel(weight_plans):
    """Rows of up to 256 values go to warp teams (eight a block), longer ones to the block; every output
    channel has its team, and no block is left without one. A block team's row may be split into slices,
    each a block: the slices cover the row, none empty."""
    for (name, shape, _, channels_last), plan in weight_plans:
        row = math.prod(shape[1:])
        assert plan["team"] == (32 if row <= 256 else 256), name
        row_blocks = plan["row_blocks"]
        assert row_blocks * plan["rows_per_block"] >= shape[0] > (row_blocks - 1) * plan["rows_per_block"], name
        assert plan["blocks"] == row_blocks * plan["slices"], name
        assert plan["slices"] == 1 or plan["team"] == 256, name
        assert (plan["slices"] - 1) * plan["slice_values"] < row <= plan["slices"] * plan["slice_values"], name


def test_equinorm_backward_blocks_cover_every_value_once(weight_plans):
    """The backward's grad_weight blocks: column tiles cover the row, slots cover each group's output
    channels, every thread of a block has its place (row lanes x column threads), and the loads are
    16 bytes where the row length allows (all rows of the table do)."""
    for (name, shape, dtype, _), plan in weight_plans:
        row, outputs = math.prod(shape[1:]), shape[0]
        tile = plan["column_threads"] * plan["column_vec"]
        assert (plan["column_tiles"] - 1) * tile < row <= plan["column_tiles"] * tile, name
        assert (plan["slots"] - 1) * plan["rows_per_slot"] < outputs <= plan["slots"] * plan["rows_per_slot"], name
        assert plan["row_lanes"] * plan["column_threads"] == plan["threads"], name
        assert plan["column_blocks"] == plan["slots"] * plan["column_tiles"], name
        assert plan["column_load_bytes"] == 16, name


def test_equinorm_backward_keeps_enough_bytes_in_flight(weight_plans):
    """grad_weight: resident blocks x threads x rows started at a time x two reads (weight and gradient)
    x 16 bytes covers the memory latency, wherever a slot gives a row lane at least two rows."""
    for (name, _, _, _), plan in weight_plans:
        rows_a_lane = math.ceil(plan["rows_per_slot"] / plan["row_lanes"])
        rows_in_flight = min(plan["grad_rows_in_flight"], rows_a_lane)
        in_flight = plan["blocks_per_multiprocessor"] * plan["threads"] * rows_in_flight * 2 * plan["column_load_bytes"]
        assert in_flight >= BYTES_IN_FLIGHT_PER_MULTIPROCESSOR or rows_a_lane < 2, name


def test_equinorm_backward_workspace_is_smaller_than_every_weight(weight_plans):
    for (name, shape, dtype, _), plan in weight_plans:
        assert plan["backward_workspace_bytes"] < math.prod(shape) * ELEMENT_BYTES[dtype], name


def test_equinorm_weight_slices_stream_at_least_min_block_bytes(weight_plans):
    """A row is split only as far as two waves ask, and every slice but a row's last streams
    min_block_bytes; the forward's workspace holds every slice's partials."""
    for (name, shape, dtype, _), plan in weight_plans:
        if plan["slices"] == 1:
            assert plan["forward_workspace_bytes"] == 0, name
            continue
        assert plan["slice_values"] * ELEMENT_BYTES[dtype] >= MIN_BLOCK_BYTES, name
        assert plan["row_blocks"] * (plan["slices"] - 1) < wave_blocks(plan), name
        assert plan["forward_workspace_bytes"] >= shape[0] * plan["slices"] * 7 * 8, name


def test_emulated_equinorm_plans_split_rows(driver):
    """The emulation's "split-rows" machine (tests/test_cuda_emulation.py) splits its long-row cases."""
    machine = (4, 2, 64, BYTES_IN_FLIGHT_PER_MULTIPROCESSOR)
    for shape, dtype in (((5, 40, 3, 3), "float32"), ((3, 300), "float16"), ((6, 40, 3, 3), "float16")):
        plan = plans(driver, [equinorm_request(shape, dtype, False)], machine)[0]
        assert plan["slices"] >= 3, (shape, dtype)
    # the backward's grad_weight: several slots of rows, several row lanes, several column tiles
    plan = plans(driver, [equinorm_request((40, 4, 3, 3), "float32", False)], machine)[0]
    assert plan["slots"] >= 3 and plan["row_lanes"] > 1, plan
    plan = plans(driver, [equinorm_request((5, 40, 3, 3), "float32", False)], machine)[0]
    assert plan["column_tiles"] >= 2 and plan["row_lanes"] > 1, plan


def test_equinorm_weight_linear_rows_load_16_bytes(driver):
    plan = plans(driver, [equinorm_request((4096, 4096), "float16", False)])[0]
    assert plan["load_bytes"] == 16


def test_equinorm_backward_scratch_is_smaller_than_the_weight(driver):
    plan = plans(driver, [equinorm_request((4096, 4096), "float16", False)])[0]
    assert plan["backward_workspace_bytes"] < 4096 * 4096 * ELEMENT_BYTES["float16"]


def test_equinorm_weight_few_output_channels_fill_two_waves(driver):
    plan = plans(driver, [equinorm_request((64, 4096, 3, 3), "float16", False)])[0]
    assert plan["blocks"] >= 2 * MULTIPROCESSORS


# ---- tap_mean: the column sums of x[:rows] as a (rows, C x plane) matrix ----


def tap_mean_requests() -> list[tuple[str, int, int, str]]:
    """(request, rows, width, dtype) of the ResNet conv inputs at batch 1 to 256, aligned and with a base one
    element past a 16-byte boundary (a sliced batch)."""
    requests = []
    for dtype in ELEMENT_BYTES:
        for batch in (1, 8, 32, 256):
            for channels, side in RESNET_INPUTS:
                width = channels * side * side
                for misalignment in (0, ELEMENT_BYTES[dtype]):
                    requests.append((f"tap_mean_columns {batch} {width} {ELEMENT_BYTES[dtype]} {misalignment}",
                                     batch, width, dtype))
    return requests


@pytest.fixture(scope="module")
def tap_plans(driver):
    requests = tap_mean_requests()
    return list(zip(requests, plans(driver, [r for r, _, _, _ in requests])))


def test_tap_mean_column_sums_cover_the_rows_in_at_most_64_slots(tap_plans):
    """Every row in exactly one slot; the second kernel adds at most 64 partials per column, a thread per column."""
    for (request, rows, width, _), plan in tap_plans:
        assert 1 <= plan["slots"] <= min(64, rows), request
        assert (plan["slots"] - 1) * plan["rows_per_slot"] < rows <= plan["slots"] * plan["rows_per_slot"], request
        assert plan["column_blocks"] * plan["threads"] * plan["vec"] >= width, request
        assert width % plan["vec"] == 0, request
        assert plan["finish_blocks"] == (math.ceil(width / plan["threads"]) if plan["slots"] > 1 else 0), request


def test_tap_mean_column_sums_fill_two_waves_unless_the_input_is_small(tap_plans):
    """One block per 256 x vec columns, the rows split into slots until two waves."""
    for (request, rows, width, dtype), plan in tap_plans:
        bytes_read = rows * width * ELEMENT_BYTES[dtype]
        assert plan["blocks"] >= min(wave_blocks(plan), bytes_read // (2 * MIN_BLOCK_BYTES)), request


def test_tap_mean_column_sums_keep_enough_bytes_in_flight(tap_plans):
    """16-byte loads on every row's aligned body (every ResNet width is a multiple of 16 bytes), whatever
    the base's alignment: the head the threads' columns are rotated by aligns it."""
    for (request, *_), plan in tap_plans:
        in_flight = plan["blocks_per_multiprocessor"] * plan["threads"] * plan["unroll"] * plan["load_bytes"]
        assert in_flight >= BYTES_IN_FLIGHT_PER_MULTIPROCESSOR, request
        assert plan["load_bytes"] == 16, request
        misalignment = int(request.split()[-1])
        assert (plan["head"] * plan["load_bytes"] // plan["vec"] + misalignment) % 16 == 0, request


# ---- tap_mean: the per-tap kernels (count tables, tap sums, backward) ----


def tap_sums_requests() -> list[tuple[str, int, int, int, int]]:
    """(request, channels, taps, plane, table entries) of 1x1, 3x3 and 7x7 convs over the ResNet inputs."""
    requests = []
    for channels, side in RESNET_INPUTS:
        for kernel in (1, 3, 7):
            taps, plane, entries = kernel * kernel, side * side, 1 + 2 * kernel * side  # dims (1, side, side)
            requests.append((f"tap_mean_taps {channels} {taps} {plane} {entries}", channels, taps, plane, entries))
    return requests


@pytest.fixture(scope="module")
def tap_sums_plans(driver):
    requests = tap_sums_requests()
    return list(zip(requests, plans(driver, [r for r, *_ in requests])))


def test_tap_mean_per_tap_kernels_take_their_launch_from_the_plan(tap_sums_plans):
    """A team per (channel, tap, run of the plane), a warp for planes of up to 256 positions (eight a block, so
    a 7x7 plane keeps its lanes busy) and the block for longer ones; runs cover the plane; every table entry
    and every (channel, position) of the backward has its thread."""
    for (request, channels, taps, plane, entries), plan in tap_sums_plans:
        assert plan["team"] == (32 if plane <= 256 else 256), request
        assert plan["teams_per_block"] * plan["team"] == plan["threads"], request
        assert plan["pairs"] == channels * taps, request
        splits, run = plan["splits"], plan["split_positions"]
        assert (splits - 1) * run < plane <= splits * run, request
        assert splits == 1 or plan["team"] == 256, request  # warp teams never split
        teams = plan["pairs"] * splits
        assert (plan["blocks"] - 1) * plan["teams_per_block"] < teams <= plan["blocks"] * plan["teams_per_block"]
        assert plan["lane_positions"] == math.ceil(run / plan["team"]), request
        assert plan["finish_blocks"] == (math.ceil(plan["pairs"] / plan["threads"]) if splits > 1 else 0), request
        assert (plan["table_blocks"] - 1) * plan["threads"] < entries <= plan["table_blocks"] * plan["threads"], request
        grad_threads = channels * plane
        assert (plan["grad_blocks"] - 1) * plan["threads"] < grad_threads <= plan["grad_blocks"] * plan["threads"]


def test_tap_mean_block_teams_fill_two_waves_with_short_lanes(tap_sums_plans, driver):
    """Planes longer than 256 positions: two waves of one block per multiprocessor and at most 32 positions a
    lane, unless a run would then have fewer positions than the block has lanes. The 3-channel 224x224 stem
    with a 7x7 kernel (147 pairs) was 147 blocks of 196 positions a lane before its planes were split."""
    cases = [(request, plane, plan) for (request, _, _, plane, _), plan in tap_sums_plans if plane > 256]
    stem = "tap_mean_taps 3 49 50176 3137"
    cases.append((stem, 50176, plans(driver, [stem])[0]))
    for request, plane, plan in cases:
        assert plan["lane_positions"] <= 32, request
        assert plan["blocks"] >= WAVES * MULTIPROCESSORS or plan["split_positions"] < 2 * plan["team"], request
    stem_plan = cases[-1][2]
    assert stem_plan["blocks"] >= WAVES * MULTIPROCESSORS and stem_plan["splits"] > 1


def test_emulated_tap_mean_plans_split_planes(driver):
    """The emulation's "plane-runs" shape (2 channels, 48x40, 3x3; tests/test_cuda_emulation.py) splits its
    planes into runs of uneven length on the default machine and not on its small one; "block-teams" keeps
    one run."""
    plane_runs, block_teams = plans(driver, ["tap_mean_taps 2 9 1920 265", "tap_mean_taps 4 15 320 149"])
    (small,) = plans(driver, ["tap_mean_taps 2 9 1920 265"], machine=(2, 2, 64, 32 * 1024))
    assert plane_runs["splits"] > 2 and plane_runs["splits"] * plane_runs["split_positions"] > 1920
    assert small["splits"] == 1 and block_teams["splits"] == 1
