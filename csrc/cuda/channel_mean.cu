// Channel statistics on the GPU: mean[c] = mean of x[:rows] over every dim but 1, or (kAbs, the
// "abs_mean" statistic) the mean of |x[:rows]|. |v| is v for v >= 0 and both add in the same order,
// so on non-negative inputs the two give the same bits. With kAbs each thread also notes whether
// it read a value < 0, and the flags follow the sums' path: ORed over the block (a fixed tree, one
// writer per channel), stored per slot beside the partial sums, ORed again by the finish.
//
// x is read as (R, C, S): R rows of C channels of S contiguous values (NCHW: R = rows,
// S = spatial; channels_last: R = rows * spatial, S = 1). Two schedules, both reading x once, both
// planned by plan_channel_mean (cuda/launch_plans.h):
//
// - columns (channels_last, (N, C), and NCHW with small planes when that gives 16-byte loads): x is
//   an (R, C * S) matrix whose rows are contiguous. A block owns a tile of whole channels' columns
//   and a slot of rows; its threads read the tile row by row (tile_rows rows of tile_columns values
//   per step, contiguous when the tile spans all columns) and keep one accumulator per value they
//   load, so every thread's columns stay fixed. Each contiguous run of a step is read with aligned
//   vector loads whatever x's base alignment: the threads' shares are rotated by the run's head,
//   and one thread per run reads its head and tail as scalars. The block then
//   adds its tile rows in a fixed tree and each channel's S columns, giving one partial per channel.
// - planes (NCHW otherwise): a block owns one channel and a slot of its planes' values. Each plane
//   is a scalar head up to its first vector-aligned element, plane_vectors aligned vector loads and
//   a scalar tail; the vectors of consecutive planes form one index space the block's threads walk
//   (a warp reads contiguous bytes), then the heads and tails. So planes of any length (7x7, 17x17,
//   147x147) and any base alignment keep 16-byte loads on their bodies.
//
// Launches: one kernel when a channel's values fit one block; otherwise it stores one partial per
// (slot, channel) and finish_kernel adds them, 64 slots per block, in one level per factor of 64
// (two levels up to 4096 slots). Nothing is added with float atomics, no counter is shared between
// blocks, and every split depends on the shape and x's alignment only, so the means are
// bit-identical across runs. Accumulation is in float (double for double data).
#include <algorithm>

#include "cuda/device_common.cuh"

namespace equinorm {
namespace cuda {
namespace {

constexpr int kThreads = kChannelMeanThreads;
constexpr int kMinBlocksPerSM = kChannelMeanBlocksPerMultiprocessor;
constexpr int kUnroll = kChannelMeanUnroll;

ChannelMeanPlan plan_for(const ChannelMeanShape& shape, ElementType type, const void* x,
                         const MachineModel& machine) {
  const auto misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % kMaxLoadBytes);
  return plan_channel_mean(shape.rows, shape.channels, shape.spatial, shape.channels_last,
                           static_cast<int64_t>(element_size(type)), static_cast<int64_t>(accumulation_size(type)),
                           misalignment, machine);
}

bool valid_shape(const ChannelMeanShape& shape) {
  return shape.rows >= 1 && shape.channels >= 1 && shape.spatial >= 1;
}

// ---- device side ----

// Where a block's result goes: the means directly (slots == 1), or a partial sum per (slot, channel)
// at partials[slot * channels + channel], the finish's input.
template <typename acc_t>
struct MeanOutput {
  acc_t* mean;
  bool* negative;  // kAbs only
  acc_t* partials;
  unsigned char* partial_negative;  // kAbs only, laid out as partials
  acc_t count;  // values per channel
  int64_t slots;
};

template <typename acc_t>
struct ColumnArgs {
  int64_t rows, columns, spatial, channels;
  int64_t tile_columns, rows_per_slot;
  int tile_rows;
  int head;  // elements of every run before its first kVec-aligned one
  MeanOutput<acc_t> output;
};

template <typename acc_t>
struct PlaneArgs {
  int64_t channels, spatial;
  int64_t plane_vectors, plane_scalars;  // per plane
  int64_t vectors, scalars;              // per channel
  int64_t slot_vectors, slot_scalars;
  MeanOutput<acc_t> output;
};

template <typename acc_t>
struct FinishArgs {
  const acc_t* partials;
  const unsigned char* partial_negative;  // kAbs only
  int64_t channels, slots;
  acc_t* next;                    // the next level's partials, or null: this level writes the means
  unsigned char* next_negative;
  acc_t* mean;
  bool* negative;
  acc_t count;
};

// The statistic's term for one value: v, or |v| (kAbs), noting in `negative` a value < 0.
template <bool kAbs, typename acc_t>
__device__ __forceinline__ acc_t statistic_term(acc_t value, bool& negative) {
  if constexpr (kAbs) {
    negative |= value < 0;
    return value < 0 ? -value : value;
  } else {
    return value;
  }
}

// Sum over the block, in a fixed order; the result is in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kThreads / kWarpSize];
  value = group_sum(value, kWarpSize);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int warp = 0; warp < kThreads / kWarpSize; ++warp) total += warp_sums[warp];
  }
  return total;
}

// Thread 0's block total and flag, to the means (one slot) or to the slot's partial.
template <bool kAbs, typename acc_t>
__device__ void store_block_result(const MeanOutput<acc_t>& out, int64_t channels, int64_t channel, int64_t slot,
                                   acc_t total, bool negative) {
  if (threadIdx.x != 0) return;
  if (out.slots == 1) {
    out.mean[channel] = total / out.count;
    if constexpr (kAbs) out.negative[channel] = negative;
  } else {
    out.partials[slot * channels + channel] = total;
    if constexpr (kAbs) out.partial_negative[slot * channels + channel] = negative ? 1 : 0;
  }
}

template <typename scalar_t, int kVec, bool kAbs>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    column_mean_kernel(const scalar_t* __restrict__ x, ColumnArgs<acc_type<scalar_t>> a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t tile_sums[kThreads * kVec];
  __shared__ unsigned char tile_negative[kAbs ? kThreads * kVec : 1];
  const MeanOutput<acc_t>& out = a.output;
  const int64_t tile = blockIdx.x / out.slots;
  const int64_t slot = blockIdx.x - tile * out.slots;
  const int64_t first_column = tile * a.tile_columns;
  const int columns = static_cast<int>(min(a.tile_columns, a.columns - first_column));
  const int tile_elements = a.tile_rows * columns;  // a multiple of kVec
  const int64_t row_begin = slot * a.rows_per_slot;
  const int64_t row_end = min(a.rows, row_begin + a.rows_per_slot);

  // A step reads the tile in runs of contiguous values: the whole step when the tile spans all
  // columns (rows follow each other in memory), else each of its tile_rows row segments. Every run
  // starts at the same place of the kVec alignment unit (plan_channel_mean_columns), `head`
  // elements before its first aligned value. A thread owns kVec run positions that stay fixed from
  // step to step: its share of the run rotated by head, so its vector load starts aligned. The one
  // thread per run whose rotated share crosses the run's end reads the run's tail and head instead,
  // as scalars.
  const int first = threadIdx.x * kVec;
  const bool owns = first < tile_elements;
  const bool contiguous_steps = columns == a.columns;
  const int run = contiguous_steps ? tile_elements : columns;
  const int run_index = first / run;  // the tile row of this thread's run (0 for contiguous steps)
  const int run_offset = first - run_index * run;
  const bool seam = run_offset + a.head + kVec > run;
  // Value v's place in its run, and the tile row (from the step's first) that holds it.
  auto position = [&](int v) {
    const int place = run_offset + a.head + v;
    return place >= run ? place - run : place;
  };
  auto step_row = [&](int v) { return run_index + static_cast<int>(position(v) / a.columns); };
  // The run of this thread's values in the step starting at `row`.
  auto run_start = [&](int64_t row) { return x + (row + run_index) * a.columns + first_column; };

  acc_t sums[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) sums[v] = 0;
  unsigned negative_bits = 0;  // bit v: value v's column saw a value < 0 (kAbs), one register for all
  auto add = [&](int v, acc_t value) {
    bool negative = false;
    sums[v] += statistic_term<kAbs>(value, negative);
    if constexpr (kAbs) negative_bits |= static_cast<unsigned>(negative) << v;
  };
  if (owns && !seam) {
    const int64_t unrolled_rows = static_cast<int64_t>(kUnroll) * a.tile_rows;
    const int rows_needed = step_row(kVec - 1) + 1;  // a step's first rows that hold this thread's values
    int64_t row = row_begin;
    // Whole steps: kUnroll loads in flight, no bounds to test.
    for (; row + unrolled_rows <= row_end; row += unrolled_rows) {
      scalar_t values[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        load_vector<kVec>(run_start(row + u * a.tile_rows) + run_offset + a.head, values[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) add(v, to_acc(values[u][v]));
      }
    }
    // The slot's last rows, one step at a time; the slot may end inside this thread's values.
    for (; row < row_end; row += a.tile_rows) {
      const int rows_left = static_cast<int>(min(row_end - row, static_cast<int64_t>(a.tile_rows)));
      const scalar_t* start = run_start(row) + run_offset + a.head;
      if (rows_needed <= rows_left) {
        scalar_t values[kVec];
        load_vector<kVec>(start, values);
#pragma unroll
        for (int v = 0; v < kVec; ++v) add(v, to_acc(values[v]));
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          if (step_row(v) < rows_left) add(v, load_acc(start + v));
        }
      }
    }
  } else if (owns) {
    // The run's tail and head, one step at a time.
    for (int64_t row = row_begin; row < row_end; row += a.tile_rows) {
      const int rows_left = static_cast<int>(min(row_end - row, static_cast<int64_t>(a.tile_rows)));
      const scalar_t* start = run_start(row);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        if (step_row(v) < rows_left) add(v, load_acc(start + position(v)));
      }
    }
  }

  if (owns) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      tile_sums[run_index * run + position(v)] = sums[v];
      if constexpr (kAbs) tile_negative[run_index * run + position(v)] = (negative_bits >> v) & 1u;
    }
  }
  __syncthreads();
  // Fold the tile rows onto row 0: a fixed binary tree, any row count.
  for (int active = a.tile_rows; active > 1;) {
    const int half = (active + 1) / 2;
    const int moved = (active - half) * columns;
    for (int i = threadIdx.x; i < moved; i += kThreads) {
      tile_sums[i] += tile_sums[i + half * columns];
      if constexpr (kAbs) tile_negative[i] |= tile_negative[i + half * columns];
    }
    __syncthreads();
    active = half;
  }

  const int spatial = static_cast<int>(a.spatial);
  const int tile_channels = columns / spatial;
  const int64_t first_channel = first_column / a.spatial;
  for (int k = threadIdx.x; k < tile_channels; k += kThreads) {
    acc_t total = 0;
    unsigned char any_negative = 0;
    for (int s = 0; s < spatial; ++s) {
      total += tile_sums[k * spatial + s];
      if constexpr (kAbs) any_negative |= tile_negative[k * spatial + s];
    }
    if (out.slots == 1) {
      out.mean[first_channel + k] = total / out.count;
      if constexpr (kAbs) out.negative[first_channel + k] = any_negative != 0;
    } else {
      out.partials[slot * a.channels + first_channel + k] = total;
      if constexpr (kAbs) out.partial_negative[slot * a.channels + first_channel + k] = any_negative;
    }
  }
}

template <typename scalar_t, int kVec, bool kAbs>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    plane_mean_kernel(const scalar_t* __restrict__ x, PlaneArgs<acc_type<scalar_t>> a) {
  using acc_t = acc_type<scalar_t>;
  const MeanOutput<acc_t>& out = a.output;
  const int64_t channel = blockIdx.x / out.slots;
  const int64_t slot = blockIdx.x - channel * out.slots;
  // x's place within a kVec-element alignment unit: a plane starting at element `start` has a head
  // of (-(phase + start)) mod kVec values before its first aligned one.
  const uint64_t phase = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(x) / sizeof(scalar_t));
  auto plane_start = [&](int64_t sample) { return (sample * a.channels + channel) * a.spatial; };
  auto head = [&](int64_t start) {
    return static_cast<int64_t>((0 - (phase + static_cast<uint64_t>(start))) & (kVec - 1));
  };

  // index runs over the channel's vectors in plane order; (sample, vector) follows it without a
  // division per step.
  const int64_t end = min(a.vectors, (slot + 1) * a.slot_vectors);
  int64_t index = slot * a.slot_vectors + threadIdx.x;
  int64_t sample = index / a.plane_vectors;
  int64_t vector = index - sample * a.plane_vectors;
  const int64_t step_samples = kThreads / a.plane_vectors;
  const int64_t step_vectors = kThreads - step_samples * a.plane_vectors;
  auto advance = [&] {
    index += kThreads;
    sample += step_samples;
    vector += step_vectors;
    if (vector >= a.plane_vectors) {
      vector -= a.plane_vectors;
      ++sample;
    }
  };
  auto body = [&] {
    const int64_t start = plane_start(sample);
    return x + start + head(start) + vector * kVec;
  };

  acc_t sums[kUnroll];
  bool negative = false;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) sums[u] = 0;
  // Whole rounds: kUnroll loads in flight, no bounds to test.
  while (index + (kUnroll - 1) * kThreads < end) {
    scalar_t values[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vector<kVec>(body(), values[u]);
      advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) sums[u] += statistic_term<kAbs>(to_acc(values[u][v]), negative);
    }
  }
  acc_t tail = 0;  // fewer than kUnroll loads left
  while (index < end) {
    scalar_t values[kVec];
    load_vector<kVec>(body(), values);
    advance();
#pragma unroll
    for (int v = 0; v < kVec; ++v) tail += statistic_term<kAbs>(to_acc(values[v]), negative);
  }
  // The heads and tails of the slot's share of planes: scalar j of a plane is its value j of the
  // head, or j - head into the tail behind the vectors.
  const int64_t scalars_end = min(a.scalars, (slot + 1) * a.slot_scalars);
  for (int64_t j = slot * a.slot_scalars + threadIdx.x; j < scalars_end; j += kThreads) {
    const int64_t scalar_sample = j / a.plane_scalars, e = j - scalar_sample * a.plane_scalars;
    const int64_t start = plane_start(scalar_sample), plane_head = head(start);
    const int64_t offset = e < plane_head ? e : e + a.plane_vectors * kVec;
    tail += statistic_term<kAbs>(load_acc(x + start + offset), negative);
  }

  acc_t thread_sum = sums[0];
#pragma unroll
  for (int u = 1; u < kUnroll; ++u) thread_sum += sums[u];
  thread_sum += tail;
  bool block_negative = false;  // in thread 0
  if constexpr (kAbs) {
    // A count of the threads that saw a value < 0 (exact in acc_t), then a barrier, since
    // block_sum's shared memory is used again below.
    block_negative = block_sum(static_cast<acc_t>(negative ? 1 : 0)) > 0;
    __syncthreads();
  }
  const acc_t total = block_sum(thread_sum);
  store_block_result<kAbs>(out, a.channels, channel, slot, total, block_negative);
}

// One finish level: kFinishChannels channels per block, each with kFinishLanes lanes that add every
// kFinishLanes-th of the block's (up to kFinishSlotsPerBlock) slots; the lanes' sums are then added
// in lane order. A warp reads 32 adjacent channels of one slot.
template <typename acc_t, bool kAbs>
__global__ void __launch_bounds__(kFinishChannels * kFinishLanes) finish_kernel(FinishArgs<acc_t> a) {
  __shared__ acc_t lane_sums[kFinishLanes][kFinishChannels];
  __shared__ unsigned char lane_negative[kFinishLanes][kFinishChannels];
  const int64_t channel_blocks = (a.channels + kFinishChannels - 1) / kFinishChannels;
  const int64_t group = blockIdx.x / channel_blocks;
  const int channel_lane = threadIdx.x % kFinishChannels, slot_lane = threadIdx.x / kFinishChannels;
  const int64_t channel = (blockIdx.x - group * channel_blocks) * kFinishChannels + channel_lane;
  const int64_t last = min(a.slots, (group + 1) * kFinishSlotsPerBlock);
  acc_t sum = 0;
  unsigned char negative = 0;
  if (channel < a.channels) {
    for (int64_t slot = group * kFinishSlotsPerBlock + slot_lane; slot < last; slot += kFinishLanes) {
      sum += a.partials[slot * a.channels + channel];
      if constexpr (kAbs) negative |= a.partial_negative[slot * a.channels + channel];
    }
  }
  lane_sums[slot_lane][channel_lane] = sum;
  lane_negative[slot_lane][channel_lane] = negative;
  __syncthreads();
  if (slot_lane != 0 || channel >= a.channels) return;
  for (int lane = 1; lane < kFinishLanes; ++lane) {
    sum += lane_sums[lane][channel_lane];
    negative |= lane_negative[lane][channel_lane];
  }
  if (a.next != nullptr) {
    a.next[group * a.channels + channel] = sum;
    if constexpr (kAbs) a.next_negative[group * a.channels + channel] = negative;
  } else {
    a.mean[channel] = sum / a.count;
    if constexpr (kAbs) a.negative[channel] = negative != 0;
  }
}

template <typename scalar_t, bool kAbs>
cudaError_t launch_typed(const ChannelMeanPlan& plan, const ChannelMeanShape& shape, const void* x, void* mean,
                         bool* negative, void* workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  MeanOutput<acc_t> out{};
  out.mean = static_cast<acc_t*>(mean);
  out.negative = negative;
  out.count = static_cast<acc_t>(shape.rows * shape.spatial);
  out.slots = plan.slots;
  // Workspace: two partial buffers, then two flag buffers; finish levels read one and write the other.
  char* base = static_cast<char*>(workspace);
  const size_t flag_bytes = (plan.workspace_bytes - 2 * plan.partial_bytes) / 2;
  acc_t* partials[2] = {reinterpret_cast<acc_t*>(base), reinterpret_cast<acc_t*>(base + plan.partial_bytes)};
  unsigned char* flags[2] = {reinterpret_cast<unsigned char*>(base + 2 * plan.partial_bytes),
                             reinterpret_cast<unsigned char*>(base + 2 * plan.partial_bytes + flag_bytes)};
  if (plan.slots > 1) {
    out.partials = partials[0];
    out.partial_negative = flags[0];
  }
  const scalar_t* data = static_cast<const scalar_t*>(x);
  const cudaError_t status = visit_vector_width<scalar_t>(plan.vec, [&](auto width) {
    constexpr int kVec = decltype(width)::value;
    const unsigned int blocks = static_cast<unsigned int>(plan.blocks);
    if (plan.mode == ChannelMeanMode::kColumns) {
      ColumnArgs<acc_t> args{plan.rows,         plan.columns,       plan.spatial,
                             shape.channels,    plan.tile_columns,  plan.rows_per_slot,
                             static_cast<int>(plan.tile_rows), static_cast<int>(plan.head), out};
      EQUINORM_LAUNCH(blocks, kThreads, 0, stream, column_mean_kernel<scalar_t, kVec, kAbs>)(data, args);
    } else {
      PlaneArgs<acc_t> args{shape.channels,
                            plan.spatial,
                            plan.plane_vectors,
                            plan.plane_scalars,
                            plan.rows * plan.plane_vectors,
                            plan.rows * plan.plane_scalars,
                            plan.slot_vectors,
                            plan.slot_scalars,
                            out};
      EQUINORM_LAUNCH(blocks, kThreads, 0, stream, plane_mean_kernel<scalar_t, kVec, kAbs>)(data, args);
    }
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  for (int level = 0; level < plan.finish_levels; ++level) {
    const bool last = level + 1 == plan.finish_levels;
    FinishArgs<acc_t> args{partials[level % 2], flags[level % 2], shape.channels, plan.finish[level].slots,
                           last ? nullptr : partials[(level + 1) % 2], last ? nullptr : flags[(level + 1) % 2],
                           out.mean, negative, out.count};
    const auto blocks = static_cast<unsigned int>(plan.finish[level].blocks);
    EQUINORM_LAUNCH(blocks, kFinishChannels * kFinishLanes, 0, stream, finish_kernel<acc_t, kAbs>)(args);
    const cudaError_t finished = cudaGetLastError();
    if (finished != cudaSuccess) return finished;
  }
  return cudaSuccess;
}

}  // namespace

size_t channel_mean_workspace_bytes(const ChannelMeanShape& shape, ElementType type, const void* x,
                                    const MachineModel& machine) {
  if (!valid_shape(shape)) return 0;
  return plan_for(shape, type, x, machine).workspace_bytes;
}

cudaError_t launch_channel_mean(const ChannelMeanShape& shape, ElementType type, const void* x, void* mean,
                                bool* negative, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                const MachineModel& machine) {
  if (!valid_shape(shape) || x == nullptr || mean == nullptr) return cudaErrorInvalidValue;
  const ChannelMeanPlan plan = plan_for(shape, type, x, machine);
  if (!fits_grid(plan.blocks)) return cudaErrorInvalidConfiguration;
  if (workspace_bytes < plan.workspace_bytes || (plan.workspace_bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return visit_element_type(type, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if (negative != nullptr) return launch_typed<scalar_t, true>(plan, shape, x, mean, negative, workspace, stream);
    return launch_typed<scalar_t, false>(plan, shape, x, mean, nullptr, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace equinorm
