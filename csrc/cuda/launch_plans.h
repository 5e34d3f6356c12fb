// How each CUDA kernel cuts its work into blocks: the machine model the plans are sized for, and
// host functions (plain C++, no CUDA or torch header) that return every launch parameter of a
// shape. The launchers run exactly these plans; tests/test_cuda_launch_plans.py checks them over
// real network shapes through tests/cuda_emulation/launch_plan_driver.cpp.
//
// The model (H100/H200): a memory-bound kernel reaches the copy bandwidth only when
// - every multiprocessor has work for the whole run: at least kWaves waves of blocks at the
//   kernel's guaranteed occupancy (its __launch_bounds__ minimum), so the last wave's tail is short;
// - each multiprocessor keeps enough loads in flight to cover the memory latency (Little's law:
//   about 4.3 TB/s x 1 us / 132 multiprocessors = 32 KiB);
// - loads are 16 bytes wide on the aligned body of every contiguous run, scalar only on its head
//   and tail;
// - no thread walks a loop whose length grows with a tensor dimension while others idle.
// A block still streams at least min_block_bytes, below which its fixed costs (launch, partial
// sums, the finish) outweigh its loads: small tensors get fewer blocks than two waves.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace equinorm {
namespace cuda {

struct MachineModel {
  int64_t multiprocessors = 132;
  int64_t waves = 2;
  int64_t min_block_bytes = 8 * 1024;
  int64_t bytes_in_flight_per_multiprocessor = 32 * 1024;
};
// The machine every launcher plans for unless told otherwise (tests shrink it to keep shapes small).
inline constexpr MachineModel kHopper{};

// Widest global load, in bytes.
constexpr int kMaxLoadBytes = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up(int64_t a, int64_t multiple) { return ceil_div(a, multiple) * multiple; }

inline int64_t greatest_common_divisor(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// Largest power of two <= value (value >= 1).
inline int64_t floor_power_of_two(int64_t value) {
  int64_t power = 1;
  while (power * 2 <= value) power *= 2;
  return power;
}

// Smallest power of two >= value.
inline int64_t ceil_power_of_two(int64_t value) {
  int64_t power = 1;
  while (power < value) power *= 2;
  return power;
}

// Blocks that fill `waves` waves of the machine at `blocks_per_multiprocessor`.
inline int64_t wave_blocks(const MachineModel& machine, int64_t blocks_per_multiprocessor) {
  return machine.multiprocessors * blocks_per_multiprocessor * machine.waves;
}

// ---- channel_mean ----

constexpr int kChannelMeanThreads = 256;
// The kernels' __launch_bounds__ minimum: up to 64 registers, so the unrolled loads stay in registers.
constexpr int kChannelMeanBlocksPerMultiprocessor = 4;
// Loads a thread has in flight before it adds them.
constexpr int kChannelMeanUnroll = 4;
// NCHW planes shorter than this are read as columns of an (R, C * S) matrix when that gives
// full-width loads; longer ones (and short ones where it does not) plane by plane.
constexpr int64_t kColumnModeMaxSpatial = 128;
// Columns of a column tile, when the matrix is wider: a warp still reads >= 256 contiguous bytes.
constexpr int64_t kTargetTileColumns = 128;
// The finish adds partial sums in blocks of 32 channels x 8 lanes, each block at most this many
// slots; more slots take another level.
constexpr int kFinishChannels = 32;
constexpr int kFinishLanes = 8;
constexpr int64_t kFinishSlotsPerBlock = 64;

enum class ChannelMeanMode { kColumns, kPlanes };

// One level of the finish: `slots` partial rows of every channel reduced to `groups` rows (1: the means).
struct FinishLevel {
  int64_t slots = 0;
  int64_t groups = 0;
  int64_t blocks = 0;
};

struct ChannelMeanPlan {
  ChannelMeanMode mode = ChannelMeanMode::kColumns;
  int threads = kChannelMeanThreads;
  int blocks_per_multiprocessor = kChannelMeanBlocksPerMultiprocessor;
  int unroll = kChannelMeanUnroll;
  int vec = 1;                 // elements per load of the body
  int64_t rows = 0;            // R: x is (R, C, S)
  int64_t channels = 0;
  int64_t spatial = 0;         // S
  // columns mode: x as an (R, C * S) matrix; a block owns a tile of whole channels' columns and a
  // slot of rows, read tile_rows rows per step. A run (a step's tile_rows x columns values when the
  // tile spans all columns, else one row of the tile) starts `head` elements before its first
  // vec-aligned one, the same for every run: its threads' vectors are rotated by head, and the one
  // whose vector would cross the run's end reads the run's head and tail as scalars.
  int64_t columns = 0;
  int64_t head = 0;
  int64_t tile_columns = 0;
  int64_t tile_rows = 0;
  int64_t rows_per_slot = 0;
  int64_t tiles = 0;
  // planes mode: every plane is a scalar head (up to its first vec-aligned element), plane_vectors
  // aligned vectors and a scalar tail; plane_scalars = head + tail, the same for every plane. A
  // block owns one channel and a slot of its R * plane_vectors vectors and R * plane_scalars scalars.
  int64_t plane_vectors = 0;
  int64_t plane_scalars = 0;
  int64_t slot_vectors = 0;
  int64_t slot_scalars = 0;
  int64_t slots = 1;           // partial sums per channel; 1: blocks write the means directly
  int64_t blocks = 0;
  FinishLevel finish[4];       // levels, in launch order
  int finish_levels = 0;
  int64_t load_bytes = 0;      // bytes of one body load (vec x element)
  size_t partial_bytes = 0;    // each of the two partial buffers (sums, then flags)
  size_t workspace_bytes = 0;
};

inline void plan_channel_mean_columns(ChannelMeanPlan& plan, int64_t element_bytes, int64_t misalignment_bytes,
                                      const MachineModel& machine) {
  const int64_t columns = plan.channels * plan.spatial;
  plan.mode = ChannelMeanMode::kColumns;
  plan.columns = columns;
  plan.vec = 1;
  for (int64_t vec = kMaxLoadBytes / element_bytes; vec >= 1; vec /= 2) {
    const int64_t budget = plan.threads * vec;  // values one step of the block reads
    int64_t tile_columns = 0, tile_rows = 0;
    if (columns <= kTargetTileColumns) {
      // One tile of whole rows: each step reads tile_rows * columns contiguous values, a multiple
      // of vec so that every step starts aligned.
      const int64_t row_align = vec / greatest_common_divisor(columns, vec);
      tile_columns = columns;
      tile_rows = budget / columns / row_align * row_align;
    } else {
      // Tiles of whole channels, every row segment at the same place of the alignment unit.
      if (columns % vec != 0) continue;
      const int64_t unit = plan.spatial / greatest_common_divisor(plan.spatial, vec) * vec;
      tile_columns = std::max<int64_t>(1, kTargetTileColumns / unit) * unit;
      if (tile_columns > budget) continue;
      tile_rows = budget / tile_columns;
    }
    if (tile_rows < 1) continue;
    plan.vec = static_cast<int>(vec);
    plan.tile_columns = tile_columns;
    plan.tile_rows = tile_rows;
    const int64_t unit_bytes = vec * element_bytes;
    plan.head = (unit_bytes - misalignment_bytes % unit_bytes) % unit_bytes / element_bytes;
    break;
  }
  if (plan.tile_columns == 0) return;  // no tile fits a block step (long NCHW planes): not a column plan
  plan.tiles = ceil_div(columns, plan.tile_columns);
  const int64_t row_steps = ceil_div(plan.rows, plan.tile_rows);
  const int64_t strip_bytes = plan.rows * plan.tile_columns * element_bytes;
  // Two waves over all tiles, as long as a slot keeps min_block_bytes.
  const int64_t wanted = ceil_div(wave_blocks(machine, plan.blocks_per_multiprocessor), plan.tiles);
  const int64_t most = std::min(row_steps, std::max<int64_t>(1, strip_bytes / machine.min_block_bytes));
  const int64_t slots = std::clamp<int64_t>(wanted, 1, most);
  // Rounded down, so that the slots are at least as many as wanted.
  plan.rows_per_slot = std::max<int64_t>(1, row_steps / slots) * plan.tile_rows;
  plan.slots = ceil_div(plan.rows, plan.rows_per_slot);
  plan.blocks = plan.tiles * plan.slots;
}

inline void plan_channel_mean_planes(ChannelMeanPlan& plan, int64_t element_bytes, const MachineModel& machine) {
  plan.mode = ChannelMeanMode::kPlanes;
  // The widest vector of which every plane holds at least one after its head of < vec values.
  plan.vec = 1;
  for (int64_t vec = kMaxLoadBytes / element_bytes; vec > 1; vec /= 2) {
    if (plan.spatial >= 2 * vec - 1) {
      plan.vec = static_cast<int>(vec);
      break;
    }
  }
  plan.plane_vectors = (plan.spatial - (plan.vec - 1)) / plan.vec;
  plan.plane_scalars = plan.spatial - plan.plane_vectors * plan.vec;
  const int64_t vectors = plan.rows * plan.plane_vectors, scalars = plan.rows * plan.plane_scalars;
  const int64_t channel_bytes = plan.rows * plan.spatial * element_bytes;
  const int64_t wanted = ceil_div(wave_blocks(machine, plan.blocks_per_multiprocessor), plan.channels);
  const int64_t most = std::max<int64_t>(1, channel_bytes / machine.min_block_bytes);
  const int64_t slots = std::clamp<int64_t>(wanted, 1, std::min(most, vectors));
  plan.slot_vectors = std::max<int64_t>(1, vectors / slots);  // rounded down: at least `slots` slots
  plan.slots = ceil_div(vectors, plan.slot_vectors);
  plan.slot_scalars = ceil_div(scalars, plan.slots);
  plan.blocks = plan.channels * plan.slots;
}

inline void plan_channel_mean_finish(ChannelMeanPlan& plan) {
  plan.finish_levels = 0;
  for (int64_t slots = plan.slots; slots > 1;) {
    FinishLevel& level = plan.finish[plan.finish_levels++];
    level.slots = slots;
    level.groups = ceil_div(slots, kFinishSlotsPerBlock);
    level.blocks = ceil_div(plan.channels, kFinishChannels) * level.groups;
    slots = level.groups;
  }
}

// x (rows, channels, spatial) NCHW, or rows * spatial positions of `channels` contiguous values
// (channels_last, and (N, C) with spatial 1); misalignment_bytes = x's address modulo 16.
inline ChannelMeanPlan plan_channel_mean(int64_t rows, int64_t channels, int64_t spatial, bool channels_last,
                                         int64_t element_bytes, int64_t accumulation_bytes, int64_t misalignment_bytes,
                                         const MachineModel& machine = kHopper) {
  ChannelMeanPlan plan;
  plan.channels = channels;
  plan.spatial = channels_last ? 1 : spatial;
  plan.rows = channels_last ? rows * spatial : rows;
  if (channels_last || plan.spatial < kColumnModeMaxSpatial) {
    plan_channel_mean_columns(plan, element_bytes, misalignment_bytes, machine);
  }
  const bool full_width = plan.tile_columns > 0 && plan.vec * element_bytes == kMaxLoadBytes;
  if (!channels_last && (plan.spatial >= kColumnModeMaxSpatial || !full_width)) {
    ChannelMeanPlan planes = plan;
    plan_channel_mean_planes(planes, element_bytes, machine);
    // A plane too short for a vector reads as columns, whatever their width.
    if (planes.vec > 1 || plan.spatial >= kColumnModeMaxSpatial) plan = planes;
  }
  plan_channel_mean_finish(plan);
  plan.load_bytes = plan.vec * element_bytes;
  if (plan.slots > 1) {
    // Two buffers of slots x channels partial sums (a finish level reads one, writes the other),
    // then two of flags.
    plan.partial_bytes = static_cast<size_t>(round_up(plan.slots * channels * accumulation_bytes, 256));
    const size_t flag_bytes = static_cast<size_t>(round_up(plan.slots * channels, 256));
    plan.workspace_bytes = 2 * plan.partial_bytes + 2 * flag_bytes;
  }
  return plan;
}

// ---- ENorm: energies of one group, their finish, the rescale ----

constexpr int kEnormThreads = 256;
// The energy and rescale kernels' __launch_bounds__ minimum.
constexpr int kEnormBlocksPerMultiprocessor = 4;
// Vectors a rescale thread loads before it stores them.
constexpr int kRescaleUnroll = 4;
// The finish takes kFinishChannels channels per block with kFinishLanes lanes each (as channel_mean's).

// How a counted entry's channels lie in memory, and so what one load of the energy kernel takes:
// - kRun: each channel's values are one contiguous run (rows): 16-byte vectors along the run,
//   with a scalar head up to the run's first 16-byte boundary and a scalar tail;
// - kAdjacent: neighbouring channels are neighbours in memory (Linear columns, channels_last and
//   1x1 convs), rows of row_channels channels: a vector holds one value of vec adjacent channels,
//   the first channels of every row up to a 16-byte boundary (the head) and its last fewer than
//   vec (the tail) scalar. That needs every row to start at the same alignment;
// - kStrided: anything else (runs of a few taps, rows that start at differing alignments, rows
//   narrower than a vector): one element a load, kEnergyScalarBytes of them in flight a thread.
enum class EnergyLayout { kStrided, kAdjacent, kRun };

// Bytes of scalar loads an energy thread has in flight (16 fp16 loads): at the guaranteed
// occupancy, the bytes per multiprocessor the memory latency needs.
constexpr int kEnergyScalarBytes = 32;
// 16-byte loads an energy thread has in flight.
constexpr int kEnergyUnroll = 4;

// One counted entry of a group as the energy kernel reads it: `channels` channels of `values`
// values each.
struct EnergyEntry {
  int64_t channels = 0;
  int64_t values = 0;
  EnergyLayout layout = EnergyLayout::kStrided;
  int64_t element_bytes = 4;
  // kAdjacent: channels side by side in a row (a conv group's), the gcd of the rows' strides in
  // values, and the base's bytes past a 16-byte boundary.
  int64_t row_channels = 0;
  int64_t row_stride_gcd = 0;
  int64_t misalignment_bytes = 0;
};

struct EnergySlices {
  EnergyLayout layout = EnergyLayout::kStrided;
  int vec = 1;                 // values of one body load
  int unroll = 1;              // body loads a thread has in flight
  int64_t load_bytes = 0;      // vec x element bytes
  int unit_channels = 1;       // channels a lane group owns: vec for kAdjacent, else 1
  // kAdjacent: a row's units are `head` scalar channels, `body` vectors of vec channels, `tail`
  // scalar channels; every unit is one lane group's. Otherwise a unit is one channel.
  int64_t head = 0, body = 0, tail = 0;
  int64_t units = 0;
  int lanes = 1;               // per unit, a power of two <= 32
  int64_t channel_blocks = 0;  // blocks that cover every unit once
  int64_t slices = 1;          // of each channel's values, each a block of its own
  int64_t slice_values = 0;    // kRun: slice_vectors x vec
  int64_t slice_vectors = 0;   // kRun: body vectors of a slice; a run's scalars go to slice 0
  int64_t blocks = 0;          // channel_blocks x slices
};

struct EnergyPlan {
  int threads = kEnormThreads;
  int blocks_per_multiprocessor = kEnormBlocksPerMultiprocessor;
  std::vector<EnergySlices> entries;
  int64_t partial_rows = 0;    // sum of the slices: the finish adds that many partials per channel
  int64_t blocks = 0;
  int64_t finish_blocks = 0;
};

// The loads of one entry: vectors where its layout allows them.
inline EnergySlices energy_loads(const EnergyEntry& e) {
  EnergySlices s;
  const int64_t vec = kMaxLoadBytes / e.element_bytes;
  s.units = e.channels;
  if (e.layout == EnergyLayout::kRun && e.values >= vec) {
    s.layout = EnergyLayout::kRun;
    s.vec = static_cast<int>(vec);
  } else if (e.layout == EnergyLayout::kAdjacent && e.row_stride_gcd % vec == 0 &&
             e.misalignment_bytes % e.element_bytes == 0) {
    const int64_t to_boundary = (kMaxLoadBytes - e.misalignment_bytes % kMaxLoadBytes) % kMaxLoadBytes;
    const int64_t head = std::min(e.row_channels, to_boundary / e.element_bytes);
    const int64_t body = (e.row_channels - head) / vec;
    if (body > 0) {
      s.layout = EnergyLayout::kAdjacent;
      s.vec = static_cast<int>(vec);
      s.unit_channels = static_cast<int>(vec);
      s.head = head;
      s.body = body;
      s.tail = e.row_channels - head - body * vec;
      s.units = (head + body + s.tail) * (e.channels / e.row_channels);
    }
  }
  s.unroll = s.vec > 1 ? kEnergyUnroll : static_cast<int>(std::max<int64_t>(kEnergyUnroll, kEnergyScalarBytes / e.element_bytes));
  s.load_bytes = s.vec * e.element_bytes;
  return s;
}

// Adjacent channels (or vectors of them) take neighbouring lanes (a warp reads 32 units' values
// side by side); otherwise up to 32 lanes share one channel's values (or run of vectors).
inline int energy_lanes(const EnergyEntry& e, const EnergySlices& s) {
  const int64_t per_unit = s.layout == EnergyLayout::kRun ? e.values / s.vec : e.values;
  int64_t lanes = std::min<int64_t>(32, ceil_power_of_two(per_unit));
  if (e.layout == EnergyLayout::kAdjacent) {
    lanes = std::min(lanes, floor_power_of_two(std::max<int64_t>(1, kEnormThreads / s.units)));
  }
  return static_cast<int>(lanes);
}

// Each entry's channels split into slices of their values, so that every block of the group
// streams about the same bytes: the group's bytes over two waves, min_block_bytes at least (a
// slice's values rounded down, so that the slices are at least as many as wanted). A
// Linear consumer's columns (256 lane groups of adjacent channels a block) then take as many
// slices as its producer's rows (8 channels a block) take blocks' worth of bytes, and no block
// walks a whole column.
inline EnergyPlan plan_enorm_energy(const std::vector<EnergyEntry>& entries, int64_t group_channels,
                                    const MachineModel& machine = kHopper) {
  EnergyPlan plan;
  int64_t group_bytes = 0;
  for (const EnergyEntry& e : entries) group_bytes += e.channels * e.values * e.element_bytes;
  const int64_t block_bytes =
      std::max(machine.min_block_bytes, group_bytes / wave_blocks(machine, plan.blocks_per_multiprocessor));
  for (const EnergyEntry& e : entries) {
    EnergySlices slices = energy_loads(e);
    slices.lanes = energy_lanes(e, slices);
    const int64_t block_units = std::min<int64_t>(slices.units, kEnormThreads / slices.lanes);
    slices.channel_blocks = ceil_div(slices.units, block_units);
    const int64_t channel_block_bytes =
        std::min(e.channels, block_units * slices.unit_channels) * e.values * e.element_bytes;
    if (slices.layout == EnergyLayout::kRun) {
      // A run's body has at most values / vec vectors (fewer behind a head); its head and tail
      // scalars go to the first slice.
      const int64_t run_vectors = e.values / slices.vec;
      const int64_t count = std::clamp<int64_t>(ceil_div(channel_block_bytes, block_bytes), 1, run_vectors);
      slices.slice_vectors = std::max<int64_t>(1, run_vectors / count);
      slices.slices = ceil_div(run_vectors, slices.slice_vectors);
      slices.slice_values = slices.slice_vectors * slices.vec;
    } else {
      const int64_t count = std::clamp<int64_t>(ceil_div(channel_block_bytes, block_bytes), 1, e.values);
      slices.slice_values = std::max<int64_t>(1, e.values / count);
      slices.slices = ceil_div(e.values, slices.slice_values);
    }
    slices.blocks = slices.channel_blocks * slices.slices;
    plan.partial_rows += slices.slices;
    plan.blocks += slices.blocks;
    plan.entries.push_back(slices);
  }
  plan.finish_blocks = ceil_div(group_channels, kFinishChannels);
  return plan;
}

// One rescaled entry: `outer` rows of `row_values` values, stored as one contiguous run. The run
// is a scalar head (up to its first 16-byte boundary), body_vectors aligned vectors of vec values,
// and a scalar tail (fewer than vec values), whatever the row length: vectors may span rows, the
// kernel steps each value's channel along. A block owns block_vectors vectors of the body, so every
// thread has its kRescaleUnroll loads in flight; the first block also takes the head, the last the tail.
struct RescalePlan {
  int threads = kEnormThreads;
  int blocks_per_multiprocessor = kEnormBlocksPerMultiprocessor;
  int unroll = kRescaleUnroll;
  int vec = 1;
  int64_t values = 0;
  int64_t head = 0;
  int64_t body_vectors = 0;
  int64_t tail = 0;
  int64_t block_vectors = 0;
  int64_t blocks = 0;
  int64_t load_bytes = 0;
};

inline RescalePlan plan_enorm_rescale(int64_t outer, int64_t row_values, int64_t element_bytes,
                                      int64_t misalignment_bytes) {
  RescalePlan plan;
  plan.values = outer * row_values;
  // A base that is not a whole number of elements past a boundary cannot reach one: all scalars.
  plan.vec = misalignment_bytes % element_bytes == 0 ? static_cast<int>(kMaxLoadBytes / element_bytes) : 1;
  const int64_t vector_bytes = plan.vec * element_bytes;
  const int64_t to_boundary = (vector_bytes - misalignment_bytes % vector_bytes) % vector_bytes;
  plan.head = std::min(plan.values, to_boundary / element_bytes);
  plan.body_vectors = (plan.values - plan.head) / plan.vec;
  plan.tail = plan.values - plan.head - plan.body_vectors * plan.vec;
  plan.block_vectors = static_cast<int64_t>(plan.threads) * plan.unroll;
  plan.blocks = std::max<int64_t>(1, ceil_div(plan.body_vectors, plan.block_vectors));
  plan.load_bytes = vector_bytes;
  return plan;
}

// ---- EquiNorm weight transform and its backward ----

constexpr int kEquiNormThreads = 256;
// The kernels' __launch_bounds__ minimum.
constexpr int kEquiNormBlocksPerMultiprocessor = 2;
// Rows of at most this many values go to a warp team (eight rows a block), longer rows to the block.
constexpr int64_t kWarpTeamMaxRow = 256;
// The backward's grad_mean finish: a block adds kReduceColumns values of grad_mean, each over
// kReduceSlices interleaved slices of its (slot, tap) partials.
constexpr int kReduceColumns = 32;
constexpr int kReduceSlices = 16;
// float64 partials of a slice of a split row: the forward's six first sums and its part of the exact P_d.
constexpr int64_t kEquiNormSlicePartials = 7;
// float64 sums of a row (or a slice of it) in the backward.
constexpr int64_t kEquiNormGradSums = 3;
// The backward's column partials (groups x slots x row, float64) take at most this share of the
// weight's bytes, wherever a group has enough rows for it.
constexpr int64_t kColumnPartialsShareOfWeight = 2;
// A grad_weight tile keeps at least a warp across its columns (contiguous loads).
constexpr int64_t kMinColumnThreads = 32;
// Rows whose weight and gradient a grad_weight thread loads before their arithmetic: with 16-byte
// loads, 2 blocks x 256 threads x 2 rows x 2 reads x 16 bytes = 32 KiB in flight per multiprocessor.
constexpr int kGradRowsInFlight = 2;

// One team of threads owns one output channel's row of group_channels x taps values, a contiguous
// run in either layout: its sums read the run as 16-byte vectors on the aligned body, scalar on
// the head and tail. With few output channels (fewer team blocks than two waves) a block row is
// split into slices of at least min_block_bytes, each a block of its own: the forward then runs
// three kernels (each slice's first sums, its part of the exact P_d, the output), each block
// adding its row's slice partials in slice order.
// The backward: the same teams and slices add each row's sums; then a block owns a slot of
// rows_per_slot rows of a group and a tile of columns, column_vec adjacent columns a thread
// (aligned vectors; row_lanes threads share a column and take the slot's rows in turn), writes
// grad_weight and adds its columns' grad_mean terms over the slot in registers: one float64
// partial row per slot, no D x C scratch. The slots fill two waves, keep min_block_bytes, and
// keep the partials under 1 / kColumnPartialsShareOfWeight of the weight's bytes; where they
// cannot fill two waves, tiles get narrower. A finish adds each grad_mean value's (slot, tap)
// partials in a fixed order.
struct EquiNormWeightPlan {
  int threads = kEquiNormThreads;
  int blocks_per_multiprocessor = kEquiNormBlocksPerMultiprocessor;
  int team = 32;               // a warp, or the whole block
  int vec = 1;                 // elements per body load: 16 bytes, or 1 where the rows are aligned unlike
  int64_t rows_per_block = 0;
  int64_t row_blocks = 0;      // blocks of whole rows' teams
  int64_t slices = 1;          // blocks per row (block teams only)
  int64_t slice_values = 0;    // a slice's values (a multiple of vec), the last one shorter
  int64_t blocks = 0;          // the forward's: row_blocks x slices
  int64_t load_bytes = 0;
  int64_t forward_workspace_bytes = 0;  // the slices' partials (D, slices, 7) in float64
  // backward: grad_weight by (group, slot, column tile) blocks
  int column_vec = 1;          // elements per load and store
  int64_t column_threads = 0;  // threads of a block across the columns
  int64_t row_lanes = 0;       // threads of a block that share a column
  int64_t column_tiles = 0;
  int64_t slots = 0;           // per group
  int64_t rows_per_slot = 0;
  int64_t column_blocks = 0;
  int64_t column_load_bytes = 0;
  int grad_rows_in_flight = kGradRowsInFlight;
  int64_t mean_values = 0;     // grad_mean's values (C, or C x taps with per-tap means)
  int64_t reduce_blocks = 0;
  int64_t row_partial_bytes = 0;     // (D, slices, 3) float64, rounded up to 256 bytes
  int64_t column_partial_bytes = 0;  // (groups, slots, row) float64
  int64_t backward_workspace_bytes = 0;
};

// The backward's grad_weight tiles for `column_vec`-element vectors: as wide as the row up to a
// block; with slots planned, narrower (more row lanes, each still with a row) until two waves.
inline void plan_equinorm_columns(EquiNormWeightPlan& plan, int64_t row_values, int column_vec, int64_t groups,
                                  const MachineModel& machine) {
  plan.column_vec = column_vec;
  plan.column_threads = std::min<int64_t>(plan.threads, ceil_power_of_two(ceil_div(row_values, column_vec)));
  plan.row_lanes = plan.threads / plan.column_threads;
  plan.column_tiles = ceil_div(row_values, plan.column_threads * column_vec);
  const int64_t wanted = wave_blocks(machine, plan.blocks_per_multiprocessor);
  while (plan.slots > 0 && groups * plan.slots * plan.column_tiles < wanted && plan.column_threads > kMinColumnThreads &&
         2 * plan.row_lanes <= plan.rows_per_slot) {
    plan.column_threads /= 2;
    plan.row_lanes *= 2;
    plan.column_tiles = ceil_div(row_values, plan.column_threads * column_vec);
  }
}

// misalignment_bytes: how far the other rows a kernel reads or writes (out, grad, grad_weight) sit
// from the weight's alignment modulo 16; vectors along a row need every row aligned alike.
// base_misalignment_bytes: the rows' bases past a 16-byte boundary (bits of each), for the
// backward's column vectors. The workspaces depend on neither.
inline EquiNormWeightPlan plan_equinorm_weight(int64_t out_channels, int64_t group_channels, int64_t taps,
                                               int64_t groups, bool channels_last, bool per_tap_means,
                                               int64_t element_bytes, int64_t misalignment_bytes = 0,
                                               int64_t base_misalignment_bytes = 0,
                                               const MachineModel& machine = kHopper) {
  EquiNormWeightPlan plan;
  const int64_t row_values = group_channels * taps;
  plan.team = row_values <= kWarpTeamMaxRow ? 32 : kEquiNormThreads;
  plan.vec = misalignment_bytes % kMaxLoadBytes == 0 ? static_cast<int>(kMaxLoadBytes / element_bytes) : 1;
  plan.load_bytes = plan.vec * element_bytes;
  plan.rows_per_block = plan.threads / plan.team;
  plan.row_blocks = ceil_div(out_channels, plan.rows_per_block);
  plan.slice_values = row_values;
  if (plan.team == kEquiNormThreads) {
    // Two waves over all rows, as long as a slice keeps min_block_bytes.
    const int64_t wanted = ceil_div(wave_blocks(machine, plan.blocks_per_multiprocessor), out_channels);
    const int64_t most = std::max<int64_t>(1, row_values * element_bytes / machine.min_block_bytes);
    const int64_t slices = std::clamp<int64_t>(wanted, 1, most);
    // Whole 16-byte vectors, whatever the rows' alignment, so that the workspace does not depend on it.
    plan.slice_values = round_up(ceil_div(row_values, slices), kMaxLoadBytes / element_bytes);
  }
  plan.slices = ceil_div(row_values, plan.slice_values);
  plan.blocks = plan.row_blocks * plan.slices;
  if (plan.slices > 1) plan.forward_workspace_bytes = out_channels * plan.slices * kEquiNormSlicePartials * 8;

  // Slots from the geometry of full 16-byte column vectors, so that the workspace does not depend
  // on the alignment; two reads (weight and grad) a value.
  const int widest = static_cast<int>(kMaxLoadBytes / element_bytes);
  plan_equinorm_columns(plan, row_values, widest, groups, machine);
  const int64_t outputs_per_group = out_channels / groups;
  const int64_t wanted = ceil_div(wave_blocks(machine, plan.blocks_per_multiprocessor), groups * plan.column_tiles);
  const int64_t tile_bytes = std::min(row_values, plan.column_threads * widest) * element_bytes * 2;
  const int64_t most = std::min({outputs_per_group * element_bytes / (8 * kColumnPartialsShareOfWeight),
                                 outputs_per_group * tile_bytes / machine.min_block_bytes,
                                 ceil_div(outputs_per_group, plan.row_lanes)});
  const int64_t slots = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, most));
  plan.rows_per_slot = ceil_div(outputs_per_group, slots);
  plan.slots = ceil_div(outputs_per_group, plan.rows_per_slot);
  // The widest vector that divides the row and every base's alignment.
  int column_vec = 1;
  for (int vec = widest; vec > 1; vec /= 2) {
    if (row_values % vec == 0 && base_misalignment_bytes % (vec * element_bytes) == 0) {
      column_vec = vec;
      break;
    }
  }
  plan_equinorm_columns(plan, row_values, column_vec, groups, machine);
  plan.column_blocks = groups * plan.slots * plan.column_tiles;
  plan.column_load_bytes = column_vec * element_bytes;
  const int64_t mean_values_per_group = per_tap_means ? group_channels * taps : group_channels;
  plan.mean_values = mean_values_per_group * groups;
  plan.reduce_blocks = ceil_div(plan.mean_values, kReduceColumns);
  plan.row_partial_bytes = round_up(out_channels * plan.slices * kEquiNormGradSums * 8, 256);
  plan.column_partial_bytes = groups * plan.slots * row_values * 8;
  plan.backward_workspace_bytes = plan.row_partial_bytes + plan.column_partial_bytes;
  return plan;
}

// ---- tap_mean: the column sums of x[:rows] seen as a (rows, C x plane) matrix ----

constexpr int kTapMeanThreads = 256;
// The column sums' __launch_bounds__ minimum.
constexpr int kTapMeanBlocksPerMultiprocessor = 4;
// Loads a column thread has in flight, each of vec elements from its own row.
constexpr int kTapMeanUnroll = 4;
// The most row slots: the second kernel adds at most this many partials per column.
constexpr int64_t kTapMeanMaxSlots = 64;

// A thread owns vec adjacent columns and adds its rows in order, one vector load a row; blocks own
// threads x vec columns and, when the columns alone give fewer than two waves, a slot of rows, whose
// partials a second kernel (a thread per column) adds in slot order. vec divides the width, so every
// row starts at the same place of the alignment unit, `head` elements before its first vec-aligned
// value: the threads' columns are rotated by head, and the one thread whose vector would cross the
// row's end reads the row's tail and head as scalars.
struct TapColumnPlan {
  int threads = kTapMeanThreads;
  int blocks_per_multiprocessor = kTapMeanBlocksPerMultiprocessor;
  int unroll = kTapMeanUnroll;
  int vec = 1;
  int64_t head = 0;
  int64_t width = 0;           // C x plane
  int64_t column_blocks = 0;
  int64_t slots = 1;
  int64_t rows_per_slot = 0;
  int64_t blocks = 0;
  int64_t finish_blocks = 0;   // 0: one slot, the column sums are the plane's sums
  int64_t load_bytes = 0;
};

// misalignment_bytes: x's address modulo 16; the slots do not depend on it.
inline TapColumnPlan plan_tap_mean_columns(int64_t rows, int64_t width, int64_t element_bytes,
                                           int64_t misalignment_bytes, const MachineModel& machine = kHopper) {
  TapColumnPlan plan;
  plan.width = width;
  for (int64_t vec = kMaxLoadBytes / element_bytes; vec >= 1; vec /= 2) {
    if (width % vec == 0) {
      plan.vec = static_cast<int>(vec);
      break;
    }
  }
  const int64_t unit_bytes = plan.vec * element_bytes;
  plan.head = (unit_bytes - misalignment_bytes % unit_bytes) % unit_bytes / element_bytes;
  const int64_t block_columns = plan.threads * plan.vec;
  plan.column_blocks = ceil_div(width, block_columns);
  // Two waves, as long as a block streams min_block_bytes.
  const int64_t wanted = ceil_div(wave_blocks(machine, plan.blocks_per_multiprocessor), plan.column_blocks);
  const int64_t block_row_bytes = std::min(width, block_columns) * element_bytes;
  const int64_t most = std::min({kTapMeanMaxSlots, rows,
                                 std::max<int64_t>(1, rows * block_row_bytes / machine.min_block_bytes)});
  const int64_t slots = std::clamp<int64_t>(wanted, 1, most);
  plan.rows_per_slot = ceil_div(rows, slots);
  plan.slots = ceil_div(rows, plan.rows_per_slot);
  plan.blocks = plan.column_blocks * plan.slots;
  plan.finish_blocks = plan.slots > 1 ? ceil_div(width, plan.threads) : 0;
  plan.load_bytes = plan.vec * element_bytes;
  return plan;
}

// ---- tap_mean: the per-tap kernels ----

// Planes of up to this many positions get a warp per (channel, tap), eight a block; longer ones
// the whole block.
constexpr int64_t kTapWarpTeamMaxPlane = 256;

// Most plane positions one lane of a block team adds before the plane is split over more blocks.
constexpr int64_t kTapMaxLanePositions = 32;

// The count tables (a thread per entry of the dims' (kernel, length) matrices), the tap sums (a
// team of lanes per (channel, tap, split) adds the split's run of the channel's plane sums
// weighted by the tap's counts, each lane every team-th position, then the lanes in a fixed tree)
// and the backward (a thread per (channel, plane position) adds its taps' gradients in tap order).
// Block teams split a plane into runs when the pairs alone give fewer than two waves of one block
// per multiprocessor, or a lane would add more than kTapMaxLanePositions positions (the 3-channel
// 224x224 stem with a 7x7 kernel: 147 pairs of 196 positions a lane); a finish kernel, a thread
// per pair, then adds the runs' sums in run order. The grids are one-dimensional: channels and
// taps are bounded by the grid's int range only.
struct TapSumsPlan {
  int threads = kTapMeanThreads;
  int team = 32;               // a warp, or the whole block
  int64_t teams_per_block = 0;
  int64_t pairs = 0;           // channels x taps
  int64_t splits = 1;          // runs of the plane per pair, a team each
  int64_t split_positions = 0; // positions of a run (the last may be shorter)
  int64_t blocks = 0;
  int64_t lane_positions = 0;  // plane positions one lane adds
  int64_t finish_blocks = 0;   // the finish kernel's, with splits only
  int64_t table_blocks = 0;
  int64_t grad_blocks = 0;
};

inline TapSumsPlan plan_tap_mean_taps(int64_t channels, int64_t taps, int64_t plane, int64_t table_entries,
                                      const MachineModel& machine) {
  TapSumsPlan plan;
  plan.team = plane <= kTapWarpTeamMaxPlane ? 32 : plan.threads;
  plan.teams_per_block = plan.threads / plan.team;
  plan.pairs = channels * taps;
  if (plan.team == plan.threads) {
    const int64_t by_lanes = ceil_div(ceil_div(plane, plan.team), kTapMaxLanePositions);
    const int64_t by_waves = ceil_div(wave_blocks(machine, 1), plan.pairs);
    // Every run keeps a position for each lane.
    plan.splits = std::clamp<int64_t>(std::max(by_lanes, by_waves), 1, plane / plan.team);
  }
  plan.split_positions = ceil_div(plane, plan.splits);
  plan.splits = ceil_div(plane, plan.split_positions);
  plan.blocks = ceil_div(plan.pairs * plan.splits, plan.teams_per_block);
  plan.lane_positions = ceil_div(plan.split_positions, plan.team);
  plan.finish_blocks = plan.splits > 1 ? ceil_div(plan.pairs, plan.threads) : 0;
  plan.table_blocks = ceil_div(table_entries, plan.threads);
  plan.grad_blocks = ceil_div(channels * plane, plan.threads);
  return plan;
}

}  // namespace cuda
}  // namespace equinorm
