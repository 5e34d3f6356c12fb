"""How each Triton kernel is cut into programs: pure host functions of the sizes, no torch, no Triton.

Every launcher asks one of these functions for its plan (how many programs, how much of the tensor
each reads, how a sum is split and finished) and launches exactly that, so a plan can be checked
for every real shape without a GPU (tests/test_triton_launch_plans.py). The plans aim at one
machine model, stated here as constants:

- an H100/H200 has 132 SMs, and the model counts 4 resident reduction programs per SM (4 warps
  each, tiles of at most 16 KiB), so 132 x 4 = 528 programs fill the GPU once; the plans ask for at
  least two waves (1056 programs) whenever the tensor holds enough work for that, because with one
  wave the SMs whose programs finish first sit idle until the last ones do;
- the resident programs' loads of one loop step together cover HBM's latency
  (MIN_BYTES_IN_FLIGHT);
- a program reads at least a few tiles (4096 elements) so the launch and the partial-sum scratch
  stay small next to the data, and at most 65536 elements of one reduction, so no program's serial
  loop grows with a tensor dimension: bigger tensors get more programs, not longer ones;
- a split sum is finished in a fixed order (partial sums in a scratch, then the row-sum kernel
  adds them, itself in chunks when they are many), so results are bit-identical from run to run.

Sizes may be symbolic under ``torch.compile``: launchers pass :func:`._runtime.size_hint` values,
so a plan never guards a graph on the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---- the machine model ----------------------------------------------------------------------
SMS = 132                      # H100 SXM / H200 streaming multiprocessors
PROGRAMS_PER_SM = 4            # resident reduction programs per SM (4 warps, 16 KiB tile each)
WAVES = 2
TARGET_PROGRAMS = SMS * PROGRAMS_PER_SM * WAVES   # 1056
TILE_BYTES = 16 * 1024         # one program's register tile, loaded per loop step
# Bytes the resident programs must have requested at once to keep HBM busy (Little's law: about
# 3.3 TB/s times about 0.5 us of latency).
MIN_BYTES_IN_FLIGHT = 3 * 512 * 1024
MIN_ELEMENTS_PER_PROGRAM = 4096
MAX_ELEMENTS_PER_PROGRAM = 1 << 16

# ---- row sums: out[b, w] = sum_r x[b, r, w] ----------------------------------------------------
ROW_SUM_BLOCK_COLUMNS = 128    # columns per first-stage program
FINISH_BLOCK_COLUMNS = 256     # columns per finishing program
SHORT_CHUNK_ROWS = 64          # rows per chunk while the chunks stay few enough to finish
LONG_CHUNK_ROWS = 256          # rows per chunk of a very tall matrix
MIN_CHUNK_ROWS = 16            # the partial-sum scratch adds at most 1/16 of the data read
MAX_CHUNKS = 256               # the finish adds at most this many partial rows per column

# ---- channel sums and energies ------------------------------------------------------------------
CHANNEL_SUM_TILE = 2048        # elements a channel-sum program loads per step (default, smallest config)
CHANNELS_LAST_BLOCK_CHANNELS = 128
ENERGY_BLOCK_CHANNELS = 32
ENERGY_TILE_ELEMENTS = 2048
ROW_TILE_ELEMENTS = 2048       # (channels x taps) tile of a weight-row program
MAX_TAP_BLOCK = 64


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def elements_per_program(total: int) -> int:
    """Elements one program of a reduction reads: enough programs for two waves over the machine,
    within [MIN_ELEMENTS_PER_PROGRAM, MAX_ELEMENTS_PER_PROGRAM]."""
    return min(max(cdiv(total, TARGET_PROGRAMS), MIN_ELEMENTS_PER_PROGRAM), MAX_ELEMENTS_PER_PROGRAM)


# ---------------------------------------------------------------------------------------------
# Row sums (the EquiNorm backward's dL/dmu, ENorm's and the channel means' finishing sums)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSumPlan:
    """out[j] = sum over r of x[j // width, r, j % width] for a (batches, rows, width) matrix.

    Stage 1: ``column_blocks x chunks`` programs, program (b, k) adding rows
    [k * chunk_rows, (k + 1) * chunk_rows) of ``block_columns`` columns, ``block_rows`` rows per
    step, into partial[k] (into out directly when ``chunks == 1``). Stage 2 (``chunks > 1``):
    ``finish_programs`` programs add partial[0], partial[1], ... tile by tile, a fixed order."""

    columns: int
    rows: int
    width: int
    chunk_rows: int
    chunks: int
    block_columns: int
    block_rows: int
    column_blocks: int
    finish_block_columns: int
    finish_block_rows: int

    @property
    def programs(self) -> int:
        return self.column_blocks * self.chunks

    @property
    def finish_programs(self) -> int:
        return cdiv(self.columns, self.finish_block_columns) if self.chunks > 1 else 0

    @property
    def launches(self) -> int:
        return 1 if self.chunks == 1 else 2


def row_sum_plan(batches: int, rows: int, width: int, element_size: int = 8,
                 chunk_rows: int | None = None) -> RowSumPlan:
    """The plan of the row sums of ``batches`` (rows, width) matrices of ``element_size``-byte
    values; ``chunk_rows`` forces the chunk height (tests use it to reach the two-stage path)."""
    columns = batches * width
    tile = TILE_BYTES // element_size
    block_columns = min(next_power_of_2(columns), ROW_SUM_BLOCK_COLUMNS)
    column_blocks = cdiv(columns, block_columns)
    if chunk_rows is None:
        wanted_chunks = cdiv(TARGET_PROGRAMS, column_blocks)
        # Rounded down, so the chunks are at least as many as wanted.
        chunk_rows = min(SHORT_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows // wanted_chunks))
        if cdiv(rows, chunk_rows) > MAX_CHUNKS:
            chunk_rows = max(LONG_CHUNK_ROWS, cdiv(rows, MAX_CHUNKS))
    chunk_rows = max(1, min(chunk_rows, rows))
    chunks = cdiv(rows, chunk_rows)
    block_rows = min(next_power_of_2(chunk_rows), max(1, tile // block_columns))
    finish_block_columns = min(next_power_of_2(columns), FINISH_BLOCK_COLUMNS)
    finish_block_rows = min(next_power_of_2(chunks), max(1, tile // finish_block_columns))
    return RowSumPlan(columns, rows, width, chunk_rows, chunks, block_columns, block_rows, column_blocks,
                      finish_block_columns, finish_block_rows)


# ---------------------------------------------------------------------------------------------
# Channel sums of x (N, C, *spatial): NCHW planes or channels_last C-vectors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanarChannelSumPlan:
    """NCHW: ``channels x splits`` programs; split k of a channel reads samples
    [(k // spatial_splits) * rows_per_split, ...) x positions [(k % spatial_splits) * segment, ...)."""

    channels: int
    rows: int
    spatial: int
    rows_per_split: int
    sample_splits: int
    segment: int
    spatial_splits: int
    block_positions: int
    finish: RowSumPlan  # adds the (splits, C) partial sums, (splits, 2C) with the negative flags

    @property
    def splits(self) -> int:
        return self.sample_splits * self.spatial_splits

    @property
    def programs(self) -> int:
        return self.channels * self.splits

    @property
    def elements_per_program(self) -> int:
        return self.rows_per_split * self.segment


@dataclass(frozen=True)
class ChannelsLastChannelSumPlan:
    """channels_last: ``channel_blocks x splits`` programs; split k reads positions
    [k * positions_per_split, ...) of ``block_channels`` channels."""

    channels: int
    positions: int
    block_channels: int
    channel_blocks: int
    positions_per_split: int
    splits: int
    finish: RowSumPlan  # adds the (splits, C) partial sums, (splits, 2C) with the negative flags

    @property
    def programs(self) -> int:
        return self.channel_blocks * self.splits

    @property
    def elements_per_program(self) -> int:
        return self.positions_per_split * min(self.block_channels, self.channels)


def _finish_plan(channels: int, splits: int, flags: bool, element_size: int) -> RowSumPlan:
    return row_sum_plan(1, splits, channels * (2 if flags else 1), element_size)


def planar_channel_sum_plan(rows: int, channels: int, spatial: int, per_program: int | None = None, *,
                            flags: bool = False, element_size: int = 4) -> PlanarChannelSumPlan:
    """NCHW channel sums of x[:rows] (rows, channels, spatial): split over samples and over the
    plane, so a few large planes (a detection input) still give two waves; ``per_program`` forces
    the elements per program (tests). ``flags``: negative flags are summed with the partial sums;
    ``element_size``: of the sums (4 for float32, 8 for float64)."""
    per_program = per_program or elements_per_program(rows * channels * spatial)
    if spatial >= per_program:
        rows_per_split, spatial_splits = 1, cdiv(spatial, per_program)
        segment = cdiv(spatial, spatial_splits)
    else:
        rows_per_split, spatial_splits, segment = max(1, per_program // spatial), 1, spatial
    sample_splits = cdiv(rows, rows_per_split)
    # One sample per split: the whole tile runs along the plane (a tile of 2 x 1024 would be half masked).
    longest = CHANNEL_SUM_TILE if rows_per_split == 1 else CHANNEL_SUM_TILE // 2
    block_positions = min(next_power_of_2(segment), longest)
    splits = sample_splits * spatial_splits
    return PlanarChannelSumPlan(channels, rows, spatial, rows_per_split, sample_splits, segment, spatial_splits,
                                block_positions, _finish_plan(channels, splits, flags, element_size))


def channels_last_channel_sum_plan(positions: int, channels: int, per_program: int | None = None, *,
                                   flags: bool = False, element_size: int = 4) -> ChannelsLastChannelSumPlan:
    """channels_last channel sums over ``positions`` C-vectors (rows x spatial): channel blocks
    of up to 128 and as many position splits as two waves need, uncapped."""
    per_program = per_program or elements_per_program(positions * channels)
    block_channels = min(next_power_of_2(channels), CHANNELS_LAST_BLOCK_CHANNELS)
    positions_per_split = min(positions, max(1, per_program // min(block_channels, channels)))
    splits = cdiv(positions, positions_per_split)
    return ChannelsLastChannelSumPlan(channels, positions, block_channels, cdiv(channels, block_channels),
                                      positions_per_split, splits, _finish_plan(channels, splits, flags, element_size))


# ---------------------------------------------------------------------------------------------
# tap_mean's column sums of x[:rows] seen as a (rows, C x plane) matrix
# ---------------------------------------------------------------------------------------------

TAP_BLOCK_COLUMNS = 256
TAP_BLOCK_ROWS = 8


@dataclass(frozen=True)
class ColumnSumPlan:
    """``column_blocks x splits`` programs; program (b, k) adds rows [k * rows_per_split, ...) of
    ``block_columns`` columns, ``block_rows`` rows per step; a finishing launch adds the splits in
    order when there are several."""

    rows: int
    width: int
    rows_per_split: int
    splits: int
    column_blocks: int
    block_rows: int = TAP_BLOCK_ROWS
    block_columns: int = TAP_BLOCK_COLUMNS

    @property
    def programs(self) -> int:
        return self.column_blocks * self.splits

    @property
    def elements_per_program(self) -> int:
        return self.rows_per_split * min(self.block_columns, self.width)


def tap_column_sum_plan(rows: int, width: int, splits: int | None = None) -> ColumnSumPlan:
    """Row splits for two waves when the columns alone give fewer programs, at most
    MAX_ELEMENTS_PER_PROGRAM per program and MAX_CHUNKS splits for the finish; ``splits`` forces the
    count (tests)."""
    column_blocks = cdiv(width, TAP_BLOCK_COLUMNS)
    if splits is None:
        longest = MAX_ELEMENTS_PER_PROGRAM // TAP_BLOCK_COLUMNS
        wanted = min(rows, MAX_CHUNKS, max(cdiv(TARGET_PROGRAMS, column_blocks), cdiv(rows, longest)))
        rows_per_split = max(1, rows // wanted)  # rounded down: at least the splits wanted
        if cdiv(rows, rows_per_split) > MAX_CHUNKS:
            rows_per_split = cdiv(rows, MAX_CHUNKS)
    else:
        rows_per_split = cdiv(rows, max(1, min(splits, rows)))
    return ColumnSumPlan(rows, width, rows_per_split, cdiv(rows, rows_per_split), column_blocks)


# ---------------------------------------------------------------------------------------------
# ENorm energies: per channel, the sum of |v|^p over `reduction` values
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnergyPlan:
    """``channel_blocks x chunks`` programs; chunk k of a channel adds its values
    [k * chunk, (k + 1) * chunk) (flattened over the outer rows and the inner values), ``block_values``
    per step; the chunks' partial energies are then added in order by a row sum."""

    channels: int
    reduction: int
    block_channels: int
    channel_blocks: int
    chunk: int
    chunks: int
    block_values: int

    @property
    def programs(self) -> int:
        return self.channel_blocks * self.chunks

    @property
    def elements_per_program(self) -> int:
        return self.chunk * min(self.block_channels, self.channels)


def energy_plan(channels: int, reduction: int, per_program: int | None = None) -> EnergyPlan:
    """Energies of ``channels`` channels of ``reduction`` values each (a column of a Linear: its
    rows; a row: its values); ``per_program`` forces the elements per program (tests)."""
    per_program = per_program or elements_per_program(channels * reduction)
    block_channels = min(next_power_of_2(channels), ENERGY_BLOCK_CHANNELS)
    per_channel = max(1, per_program // min(block_channels, channels))
    chunks = min(cdiv(reduction, per_channel), MAX_CHUNKS)
    chunk = cdiv(reduction, chunks)
    chunks = cdiv(reduction, chunk)
    block_values = min(next_power_of_2(chunk), max(1, ENERGY_TILE_ELEMENTS // block_channels))
    return EnergyPlan(channels, reduction, block_channels, cdiv(channels, block_channels), chunk, chunks, block_values)


# ---------------------------------------------------------------------------------------------
# Weight rows (EquiNorm's weight transform and backward): one program per output channel
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightRowPlan:
    """``out_channels`` programs, each walking its row of group_channels x taps values in
    (block_channels, block_taps) tiles."""

    out_channels: int
    group_channels: int
    taps: int
    block_channels: int
    block_taps: int

    @property
    def programs(self) -> int:
        return self.out_channels

    @property
    def steps(self) -> int:
        return cdiv(self.group_channels, self.block_channels) * cdiv(self.taps, self.block_taps)


def weight_row_plan(out_channels: int, group_channels: int, taps: int) -> WeightRowPlan:
    block_taps = min(next_power_of_2(taps), MAX_TAP_BLOCK)
    block_channels = min(next_power_of_2(group_channels), max(1, ROW_TILE_ELEMENTS // block_taps))
    return WeightRowPlan(out_channels, group_channels, taps, block_channels, block_taps)
