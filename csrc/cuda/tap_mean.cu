// Per-tap input statistics on the GPU (tap_mean and its backward; math in
// csrc/shared/tap_mean_math.h).
//
// Forward, x[:rows] read once as a (rows, width) matrix with contiguous rows (width = C * plane,
// NCHW or channels_last order):
//   1. column sums: a thread owns vec adjacent columns (16 bytes where the width allows) and adds
//      its rows in order, one aligned vector load a row (|x|, and a negative flag, for abs_mean);
//      blocks own 256 x vec columns and, when the columns alone give fewer than two waves, a slot
//      of rows, whose partial sums
//   2. a second kernel adds in slot order (only when there are several slots).
//   3. the count tables: per spatial dim the (kernel, length) matrix of tap_reads, int32.
//   4. a team per (channel, tap), a warp for planes of up to 256 positions and the block for longer
//      ones, adds the channel's plane weighted by the tap's counts, and the (channel, 0) team also
//      ors the channel's negative flags. Long planes (or too few pairs for two waves) are split
//      into runs, a block each, whose sums
//   5. a finish kernel adds in run order (only when there are several runs).
// Backward: the count tables, then a thread per (channel, plane position) adds the taps'
// gradients times their counts, in tap order.
//
// Launches: forward 3 (one more with row slots, one more with plane runs), backward 2. No atomics;
// every sum has an order fixed by the shape, so results are bit-identical across runs.
#include <algorithm>

#include "cuda/device_common.cuh"
#include "shared/tap_mean_math.h"

namespace equinorm {
namespace cuda {
namespace {

// The column sums' plan: plan_tap_mean_columns in cuda/launch_plans.h.
constexpr int kThreads = kTapMeanThreads;
constexpr int kMinBlocksPerSM = kTapMeanBlocksPerMultiprocessor;
constexpr int kUnroll = kTapMeanUnroll;

struct TapPlan {
  TapColumnPlan columns;
  TapSumsPlan taps;
  int64_t width = 0;   // C * plane
  int64_t slots = 1;   // row slots of the column sums
  int64_t table_entries = 0;
  size_t tables_bytes = 0, plane_bytes = 0, flags_bytes = 0, partial_bytes = 0, partial_flags_bytes = 0;
  size_t run_sums_bytes = 0, run_flags_bytes = 0;  // the plane runs' sums and flags
  size_t workspace_bytes = 0;
};

size_t aligned(size_t bytes) { return static_cast<size_t>(round_up(static_cast<int64_t>(bytes), 16)); }

int64_t table_entries(const TapMeanShape& shape) {
  int64_t entries = 0;
  for (const tap::TapDim& d : shape.dims) entries += d.kernel * d.length;
  return entries;
}

int64_t plane_size(const TapMeanShape& shape) {
  return shape.dims[0].length * shape.dims[1].length * shape.dims[2].length;
}

int64_t tap_count(const TapMeanShape& shape) {
  return shape.dims[0].kernel * shape.dims[1].kernel * shape.dims[2].kernel;
}

int64_t output_count(const TapMeanShape& shape) {
  return shape.dims[0].outputs * shape.dims[1].outputs * shape.dims[2].outputs;
}

// The per-tap kernels' plan (forward and backward alike; the plane runs are the forward's only).
TapSumsPlan taps_plan(const TapMeanShape& shape, const MachineModel& machine) {
  return plan_tap_mean_taps(shape.channels, tap_count(shape), plane_size(shape), table_entries(shape), machine);
}

// misalignment_bytes: x's address modulo 16 (0 for the workspace size, which does not depend on it).
TapPlan plan_tap_mean(const TapMeanShape& shape, size_t element_bytes, size_t accumulation_bytes,
                      int64_t misalignment_bytes, const MachineModel& machine) {
  TapPlan plan;
  plan.columns = plan_tap_mean_columns(shape.rows, shape.channels * plane_size(shape),
                                       static_cast<int64_t>(element_bytes), misalignment_bytes, machine);
  plan.width = plan.columns.width;
  plan.slots = plan.columns.slots;
  plan.table_entries = table_entries(shape);
  plan.taps = taps_plan(shape, machine);
  plan.tables_bytes = aligned(static_cast<size_t>(plan.table_entries) * sizeof(int));
  plan.plane_bytes = aligned(static_cast<size_t>(plan.width) * accumulation_bytes);
  plan.flags_bytes = aligned(static_cast<size_t>(plan.width));
  if (plan.slots > 1) {
    plan.partial_bytes = aligned(static_cast<size_t>(plan.slots * plan.width) * accumulation_bytes);
    plan.partial_flags_bytes = aligned(static_cast<size_t>(plan.slots * plan.width));
  }
  if (plan.taps.splits > 1) {
    plan.run_sums_bytes = aligned(static_cast<size_t>(plan.taps.pairs * plan.taps.splits) * accumulation_bytes);
    plan.run_flags_bytes = aligned(static_cast<size_t>(shape.channels * plan.taps.splits));
  }
  plan.workspace_bytes = plan.tables_bytes + plan.plane_bytes + plan.flags_bytes + plan.partial_bytes +
                         plan.partial_flags_bytes + plan.run_sums_bytes + plan.run_flags_bytes;
  return plan;
}

bool valid_dims(const TapMeanShape& shape) {
  for (const tap::TapDim& d : shape.dims) {
    if (d.length < 1 || d.kernel < 1 || d.stride < 1 || d.dilation < 1 || d.before < 0 || d.after < 0 ||
        d.outputs < 1) {
      return false;
    }
  }
  return shape.channels >= 1 && shape.mode >= tap::kZeros && shape.mode <= tap::kCircular &&
         plane_size(shape) <= INT_MAX && tap_count(shape) <= INT_MAX;
}

// ---- device side ----

// Sum over the block in a fixed order; the result is in thread 0.
template <typename T>
__device__ T block_total(T value) {
  __shared__ T warp_sums[kThreads / kWarpSize];
  value = group_sum(value, kWarpSize);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int warp = 0; warp < kThreads / kWarpSize; ++warp) total += warp_sums[warp];
  }
  __syncthreads();  // warp_sums may be reused by the caller's next reduction
  return total;
}

struct ColumnArgs {
  int64_t rows, width, rows_per_slot;
  int64_t head;  // elements of every row before its first kVec-aligned one
};

// Program (column block, slot): the block's kThreads x kVec columns summed over the slot's rows into
// sums[slot, column]. Thread i's values are the row's columns (i * kVec + head + v) mod width, v <
// kVec: a run that starts at the alignment unit, so one vector load reads them from every row;
// the one thread whose run crosses the row's end reads the row's tail and head as scalars.
template <typename scalar_t, int kVec, bool kAbsolute>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    tap_column_sums_kernel(const scalar_t* __restrict__ x, ColumnArgs a, acc_type<scalar_t>* sums,
                           unsigned char* negative) {
  using acc_t = acc_type<scalar_t>;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (first >= a.width) return;
  const int64_t slot = blockIdx.y;
  const int64_t row_first = slot * a.rows_per_slot;
  const int64_t row_last = min(a.rows, row_first + a.rows_per_slot);
  const int64_t run = first + a.head;
  const bool seam = run + kVec > a.width;
  // first + head + v < 2 * width, since width is a multiple of kVec: one wrap at most.
  auto column_of = [&](int v) { return run + v >= a.width ? run + v - a.width : run + v; };
  auto load_row = [&](int64_t row, scalar_t(&values)[kVec]) {
    const scalar_t* start = x + row * a.width;
    if (!seam) {
      load_vector<kVec>(start + run, values);
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        scalar_t value[1];
        load_vector<1>(start + column_of(v), value);
        values[v] = value[0];
      }
    }
  };
  acc_t sum[kVec];
  bool seen_negative[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    sum[v] = 0;
    seen_negative[v] = false;
  }
  auto add = [&](const scalar_t(&values)[kVec]) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t value = to_acc(values[v]);
      if (kAbsolute) {
        seen_negative[v] = seen_negative[v] || value < acc_t(0);
        sum[v] += value < acc_t(0) ? -value : value;
      } else {
        sum[v] += value;
      }
    }
  };
  int64_t row = row_first;
  for (; row + kUnroll <= row_last; row += kUnroll) {  // kUnroll loads in flight
    scalar_t values[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_row(row + u, values[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) add(values[u]);
  }
  for (; row < row_last; ++row) {
    scalar_t values[kVec];
    load_row(row, values);
    add(values);
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    sums[slot * a.width + column_of(v)] = sum[v];
    if (kAbsolute) negative[slot * a.width + column_of(v)] = seen_negative[v] ? 1 : 0;
  }
}

// plane[column] = sums[0, column] + sums[1, column] + ..., in slot order (flags or-ed).
template <typename acc_t, bool kAbsolute>
__global__ void __launch_bounds__(kThreads) tap_finish_columns_kernel(const acc_t* sums,
                                                                      const unsigned char* negative, int64_t width,
                                                                      int64_t slots, acc_t* plane,
                                                                      unsigned char* plane_negative) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (column >= width) return;
  acc_t total = 0;
  unsigned char seen = 0;
  for (int64_t slot = 0; slot < slots; ++slot) {
    total += __ldcg(sums + slot * width + column);
    if (kAbsolute) seen |= negative[slot * width + column];
  }
  plane[column] = total;
  if (kAbsolute) plane_negative[column] = seen;
}

struct DimTables {
  tap::TapDim dims[tap::kDims];
  int mode;
  int* tables;  // dim k's (kernel, length) matrix at offset[k]
  int64_t offset[tap::kDims];
};

// tables[k][t * length + j] = tap_reads(dims[k], mode, t, j), for every dim k.
__global__ void __launch_bounds__(kThreads) tap_count_tables_kernel(DimTables a, int64_t entries) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= entries) return;
  int k = 0;
  while (k + 1 < tap::kDims && index >= a.offset[k + 1]) ++k;
  const tap::TapDim& d = a.dims[k];
  const int64_t local = index - a.offset[k];
  const int64_t t = local / d.length, j = local - t * d.length;
  a.tables[index] = static_cast<int>(tap::tap_reads(d, a.mode, t, j));
}

struct PlaneGeometry {
  int lengths[tap::kDims];
  int kernels[tap::kDims];
  int64_t offset[tap::kDims];  // of each dim's count table
  int plane;
  int taps;
};

// Sum over each team of kTeam lanes (a warp, or the block) in a fixed order; the result is in the
// team's lane 0. Every lane of the team must call it.
template <int kTeam, typename T>
__device__ T team_total(T value) {
  if constexpr (kTeam == kWarpSize) {
    return group_sum(value, kWarpSize);
  } else {
    return block_total(value);
  }
}

// Where the tap sums go: mean (C x taps, divided by count) and negative (C) with one run per
// plane, else the runs' sums (pairs x splits) and flags (C x splits) for the finish kernel.
template <typename acc_t>
struct TapSumsOutput {
  int64_t splits, split_positions;
  acc_t count;
  acc_t* mean;
  unsigned char* negative;
  acc_t* run_sums;
  unsigned char* run_negative;
};

// Team (channel, tap, run): the run's positions of the channel's plane weighted by the tap's counts.
template <typename acc_t, int kTeam, bool kAbsolute>
__global__ void __launch_bounds__(kThreads) tap_sums_kernel(const acc_t* plane_sums,
                                                            const unsigned char* plane_negative, const int* tables,
                                                            PlaneGeometry g, int64_t channels, bool channels_last,
                                                            TapSumsOutput<acc_t> o) {
  const int64_t team_index = static_cast<int64_t>(blockIdx.x) * (kThreads / kTeam) + threadIdx.x / kTeam;
  const int lane = static_cast<int>(threadIdx.x % kTeam);
  if (team_index >= channels * g.taps * o.splits) return;  // whole teams only: a block team always has one
  const int64_t pair = team_index / o.splits, run = team_index - pair * o.splits;
  const int64_t channel = pair / g.taps;
  const int tap = static_cast<int>(pair - channel * g.taps);
  const int t2 = tap % g.kernels[2], t1 = (tap / g.kernels[2]) % g.kernels[1];
  const int t0 = tap / (g.kernels[2] * g.kernels[1]);
  const int* row0 = tables + g.offset[0] + static_cast<int64_t>(t0) * g.lengths[0];
  const int* row1 = tables + g.offset[1] + static_cast<int64_t>(t1) * g.lengths[1];
  const int* row2 = tables + g.offset[2] + static_cast<int64_t>(t2) * g.lengths[2];
  const bool flags = kAbsolute && tap == 0;
  const int first = static_cast<int>(run * o.split_positions);
  const int end = static_cast<int>(min(static_cast<int64_t>(g.plane), (run + 1) * o.split_positions));
  acc_t sum = 0;
  int seen = 0;
  for (int p = first + lane; p < end; p += kTeam) {
    const int j2 = p % g.lengths[2], rest = p / g.lengths[2];
    const int j1 = rest % g.lengths[1], j0 = rest / g.lengths[1];
    const int reads = __ldg(row0 + j0) * __ldg(row1 + j1) * __ldg(row2 + j2);
    const int64_t index = channels_last ? static_cast<int64_t>(p) * channels + channel : channel * g.plane + p;
    if (reads != 0) sum += static_cast<acc_t>(reads) * __ldcg(plane_sums + index);
    if (flags) seen |= plane_negative[index];
  }
  const acc_t total = team_total<kTeam>(sum);
  if (lane == 0) {
    if (o.splits == 1) {
      o.mean[pair] = total / o.count;
    } else {
      o.run_sums[team_index] = total;
    }
  }
  // A block team's tap is the same for all its threads, a warp team's for its lanes: the flag's
  // reduction is reached by whole teams.
  if (flags) {
    const int any = team_total<kTeam>(seen);
    if (lane == 0) {
      if (o.splits == 1) {
        o.negative[channel] = any != 0 ? 1 : 0;
      } else {
        o.run_negative[channel * o.splits + run] = any != 0 ? 1 : 0;
      }
    }
  }
}

// Thread per (channel, tap): its runs' sums added in run order, divided by count (flags or-ed).
template <typename acc_t, bool kAbsolute>
__global__ void __launch_bounds__(kThreads) tap_finish_runs_kernel(int64_t pairs, int taps, TapSumsOutput<acc_t> o) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pair >= pairs) return;
  acc_t total = 0;
  for (int64_t run = 0; run < o.splits; ++run) total += __ldcg(o.run_sums + pair * o.splits + run);
  o.mean[pair] = total / o.count;
  if (kAbsolute && pair % taps == 0) {
    const int64_t channel = pair / taps;
    unsigned char seen = 0;
    for (int64_t run = 0; run < o.splits; ++run) seen |= o.run_negative[channel * o.splits + run];
    o.negative[channel] = seen != 0 ? 1 : 0;
  }
}

// Thread per (channel, plane position): the taps' gradients times their counts, in tap order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) tap_grad_kernel(const acc_t* grad, const int* tables, PlaneGeometry g,
                                                            int64_t channels, acc_t count, acc_t* out) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= channels * g.plane) return;
  const int64_t channel = index / g.plane;
  const int p = static_cast<int>(index - channel * g.plane);
  const int j2 = p % g.lengths[2], rest = p / g.lengths[2];
  const int j1 = rest % g.lengths[1], j0 = rest / g.lengths[1];
  const acc_t* channel_grad = grad + channel * g.taps;
  acc_t sum = 0;
  int tap = 0;
  for (int t0 = 0; t0 < g.kernels[0]; ++t0) {
    const int reads0 = __ldg(tables + g.offset[0] + static_cast<int64_t>(t0) * g.lengths[0] + j0);
    for (int t1 = 0; t1 < g.kernels[1]; ++t1) {
      const int reads01 = reads0 * __ldg(tables + g.offset[1] + static_cast<int64_t>(t1) * g.lengths[1] + j1);
      for (int t2 = 0; t2 < g.kernels[2]; ++t2, ++tap) {
        const int reads = reads01 * __ldg(tables + g.offset[2] + static_cast<int64_t>(t2) * g.lengths[2] + j2);
        if (reads != 0) sum += static_cast<acc_t>(reads) * __ldg(channel_grad + tap);
      }
    }
  }
  out[index] = sum / count;
}

DimTables dim_tables(const TapMeanShape& shape, int* tables) {
  DimTables a{};
  a.mode = shape.mode;
  a.tables = tables;
  int64_t offset = 0;
  for (int k = 0; k < tap::kDims; ++k) {
    a.dims[k] = shape.dims[k];
    a.offset[k] = offset;
    offset += shape.dims[k].kernel * shape.dims[k].length;
  }
  return a;
}

PlaneGeometry plane_geometry(const TapMeanShape& shape) {
  PlaneGeometry g{};
  int64_t offset = 0;
  for (int k = 0; k < tap::kDims; ++k) {
    g.lengths[k] = static_cast<int>(shape.dims[k].length);
    g.kernels[k] = static_cast<int>(shape.dims[k].kernel);
    g.offset[k] = offset;
    offset += shape.dims[k].kernel * shape.dims[k].length;
  }
  g.plane = static_cast<int>(plane_size(shape));
  g.taps = static_cast<int>(tap_count(shape));
  return g;
}

cudaError_t launch_count_tables(const TapMeanShape& shape, const TapSumsPlan& plan, int* tables,
                                cudaStream_t stream) {
  EQUINORM_LAUNCH(static_cast<unsigned int>(plan.table_blocks), kThreads, 0, stream, tap_count_tables_kernel)(
      dim_tables(shape, tables), table_entries(shape));
  return cudaGetLastError();
}

bool fits_taps_launch(const TapSumsPlan& plan) {
  return fits_grid(plan.blocks) && (plan.splits == 1 || fits_grid(plan.finish_blocks)) &&
         fits_grid(plan.table_blocks) && fits_grid(plan.grad_blocks);
}

template <typename scalar_t, bool kAbsolute>
cudaError_t launch_typed(const TapPlan& plan, const TapMeanShape& shape, const void* x, void* mean, void* negative,
                         char* workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  int* tables = reinterpret_cast<int*>(workspace);
  acc_t* plane = reinterpret_cast<acc_t*>(workspace + plan.tables_bytes);
  unsigned char* plane_negative =
      reinterpret_cast<unsigned char*>(workspace + plan.tables_bytes + plan.plane_bytes);
  char* partial_base = workspace + plan.tables_bytes + plan.plane_bytes + plan.flags_bytes;
  acc_t* sums = plan.slots > 1 ? reinterpret_cast<acc_t*>(partial_base) : plane;
  unsigned char* sums_negative =
      plan.slots > 1 ? reinterpret_cast<unsigned char*>(partial_base + plan.partial_bytes) : plane_negative;
  const TapColumnPlan& columns = plan.columns;
  const ColumnArgs args{shape.rows, columns.width, columns.rows_per_slot, columns.head};
  cudaError_t status = visit_vector_width<scalar_t>(columns.vec, [&](auto width) {
    constexpr int kVec = decltype(width)::value;
    const dim3 grid(static_cast<unsigned int>(columns.column_blocks), static_cast<unsigned int>(columns.slots));
    EQUINORM_LAUNCH(grid, kThreads, 0, stream, tap_column_sums_kernel<scalar_t, kVec, kAbsolute>)(
        static_cast<const scalar_t*>(x), args, sums, sums_negative);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  if (plan.slots > 1) {
    const auto finish_blocks = static_cast<unsigned int>(columns.finish_blocks);
    EQUINORM_LAUNCH(finish_blocks, kThreads, 0, stream, tap_finish_columns_kernel<acc_t, kAbsolute>)(
        sums, sums_negative, plan.width, plan.slots, plane, plane_negative);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  status = launch_count_tables(shape, plan.taps, tables, stream);
  if (status != cudaSuccess) return status;
  char* runs_base = partial_base + plan.partial_bytes + plan.partial_flags_bytes;
  const TapSumsOutput<acc_t> output{
      plan.taps.splits, plan.taps.split_positions,
      static_cast<acc_t>(shape.rows) * static_cast<acc_t>(output_count(shape)),
      static_cast<acc_t*>(mean), static_cast<unsigned char*>(negative),
      reinterpret_cast<acc_t*>(runs_base), reinterpret_cast<unsigned char*>(runs_base + plan.run_sums_bytes)};
  const auto blocks = static_cast<unsigned int>(plan.taps.blocks);
  auto launch_sums = [&](auto team) {
    constexpr int kTeam = decltype(team)::value;
    EQUINORM_LAUNCH(blocks, kThreads, 0, stream, tap_sums_kernel<acc_t, kTeam, kAbsolute>)(
        plane, plane_negative, tables, plane_geometry(shape), shape.channels, shape.channels_last, output);
    return cudaGetLastError();
  };
  status = plan.taps.team == kWarpSize ? launch_sums(std::integral_constant<int, kWarpSize>{})
                                       : launch_sums(std::integral_constant<int, kThreads>{});
  if (status != cudaSuccess || plan.taps.splits == 1) return status;
  EQUINORM_LAUNCH(static_cast<unsigned int>(plan.taps.finish_blocks), kThreads, 0, stream,
                  tap_finish_runs_kernel<acc_t, kAbsolute>)(plan.taps.pairs, static_cast<int>(tap_count(shape)), output);
  return cudaGetLastError();
}

bool fits_launch(const TapPlan& plan) {
  return fits_grid(plan.columns.column_blocks) && fits_grid(ceil_div(plan.width, kThreads)) &&
         plan.slots <= 65535 && fits_taps_launch(plan.taps);
}

}  // namespace

size_t tap_mean_workspace_bytes(const TapMeanShape& shape, ElementType type, const MachineModel& machine) {
  if (!valid_dims(shape) || shape.rows < 1) return 0;
  return plan_tap_mean(shape, element_size(type), accumulation_size(type), 0, machine).workspace_bytes;
}

cudaError_t launch_tap_mean(const TapMeanShape& shape, ElementType type, const void* x, bool absolute, void* mean,
                            void* negative, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                            const MachineModel& machine) {
  if (!valid_dims(shape) || shape.rows < 1 || x == nullptr || mean == nullptr || negative == nullptr) {
    return cudaErrorInvalidValue;
  }
  const auto misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % kMaxLoadBytes);
  const TapPlan plan = plan_tap_mean(shape, element_size(type), accumulation_size(type), misalignment, machine);
  if (!fits_launch(plan)) return cudaErrorInvalidConfiguration;
  if (workspace == nullptr || workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  return visit_element_type(type, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return absolute ? launch_typed<scalar_t, true>(plan, shape, x, mean, negative, base, stream)
                    : launch_typed<scalar_t, false>(plan, shape, x, mean, negative, base, stream);
  });
}

size_t tap_mean_backward_workspace_bytes(const TapMeanShape& shape) {
  if (!valid_dims(shape)) return 0;
  return aligned(static_cast<size_t>(table_entries(shape)) * sizeof(int));
}

cudaError_t launch_tap_mean_backward(const TapMeanShape& shape, ElementType type, const void* grad, void* plane,
                                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_dims(shape) || shape.rows < 1 || grad == nullptr || plane == nullptr ||
      (type != ElementType::kFloat && type != ElementType::kDouble)) {
    return cudaErrorInvalidValue;
  }
  if (workspace == nullptr || workspace_bytes < tap_mean_backward_workspace_bytes(shape)) return cudaErrorInvalidValue;
  const TapSumsPlan plan = taps_plan(shape, kHopper);  // the tables and the backward: no machine in them
  if (!fits_taps_launch(plan)) return cudaErrorInvalidConfiguration;
  int* tables = static_cast<int*>(workspace);
  cudaError_t status = launch_count_tables(shape, plan, tables, stream);
  if (status != cudaSuccess) return status;
  const auto grid = static_cast<unsigned int>(plan.grad_blocks);
  const PlaneGeometry g = plane_geometry(shape);
  if (type == ElementType::kDouble) {
    const double count = static_cast<double>(shape.rows) * static_cast<double>(output_count(shape));
    EQUINORM_LAUNCH(grid, kThreads, 0, stream, tap_grad_kernel<double>)(
        static_cast<const double*>(grad), tables, g, shape.channels, count, static_cast<double*>(plane));
  } else {
    const float count = static_cast<float>(shape.rows) * static_cast<float>(output_count(shape));
    EQUINORM_LAUNCH(grid, kThreads, 0, stream, tap_grad_kernel<float>)(
        static_cast<const float*>(grad), tables, g, shape.channels, count, static_cast<float*>(plane));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace equinorm
