// Channel statistics on the GPU: mean[c] = mean of x[:rows] over every dim but 1, or (kAbs, the
// "abs_mean" statistic) the mean of |x[:rows]|. |v| is v for v >= 0 and both add in the same order,
// so on non-negative inputs the two give the same bits. With kAbs each thread also notes whether
// it read a value < 0, and the flags follow the sums' path: ORed over the block (a fixed tree, one
// writer per channel), stored per slot beside the partial sums, ORed again by the finishing block.
//
// x is read as (R, C, S): R rows of C channels of S contiguous values (NCHW: R = rows,
// S = spatial; channels_last: R = rows * spatial, S = 1). Two schedules, both reading x once:
//
// - segment (S >= kColumnModeMinSpatial, NCHW with large planes): a block owns one piece of one
//   channel's R * S values, walks them in plane order with 16-byte loads (when S and x allow) so
//   a warp reads contiguous bytes, and reduces them to one partial sum.
// - column (small S: channels_last, or NCHW with small planes): x is an (R, C * S) matrix whose
//   rows are contiguous. A block owns a tile of whole channels' columns and a slot of rows; its
//   threads read the tile row by row (tile_rows rows of tile_columns values per step, contiguous
//   when the tile spans all columns), 16-byte loads where alignment allows, and keep one
//   accumulator per value they load, so every thread's columns stay fixed. The block then adds
//   its tile rows in a fixed tree and each channel's S columns, giving one partial per channel.
//
// Launches: one kernel, preceded by a memset of the finishing counters when a channel's values
// are split over several blocks. Each block stores its partials, then takes a ticket on its
// tile's (or channel's) integer counter; the last block to arrive adds that tile's partials in
// slot order and writes the means. Nothing is added with float atomics and every split depends on
// the shape and x's alignment only, so the means are bit-identical across runs. Accumulation is
// in float (double for double data).
#include <algorithm>

#include "cuda/device_common.cuh"

namespace equinorm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Lets ptxas use up to 64 registers: the unrolled loads stay in registers instead of spilling.
constexpr int kMinBlocksPerSM = 4;
// Loads a thread has in flight before it adds them.
constexpr int kUnroll = 4;
// Planes at least this long are read in segments; shorter ones as columns of an (R, C * S) matrix.
constexpr int64_t kColumnModeMinSpatial = 128;
// Columns of a column tile, when the matrix is wider: a warp still reads >= 256 contiguous bytes.
constexpr int64_t kTargetTileColumns = 128;
// Bytes a block should stream at least, so that the partial sums stay few.
constexpr int64_t kBlockBytes = 32 * 1024;
// Partial sums one finishing block adds at most (channels of its tile x slots).
constexpr int64_t kFinishBudget = 16 * 1024;
constexpr int64_t kMaxSlots = 1024;

// How x is cut into blocks; a function of the shape, the element size and x's alignment only.
struct ChannelPlan {
  bool column_mode = false;
  int vec = 1;                 // elements per load
  int64_t rows = 0;            // R
  int64_t spatial = 0;         // S
  int64_t columns = 0;         // C * S (column mode)
  int64_t tile_columns = 0;    // column mode: a multiple of S
  int64_t tile_rows = 0;       // column mode: rows a block reads per step
  int64_t rows_per_slot = 0;   // column mode: a multiple of tile_rows
  int64_t piece_elements = 0;  // segment mode: a multiple of vec
  int64_t slots = 1;           // partial sums per channel; 1: blocks write the means directly
  int64_t counters = 0;        // finishing counters (tiles or channels)
  int64_t blocks = 0;
  size_t partial_bytes = 0;
  size_t negative_bytes = 0;  // one flag per (slot, channel), for the "abs_mean" statistic
  size_t workspace_bytes = 0;
};

void plan_columns(ChannelPlan& plan, int64_t channels, int64_t element_bytes, const void* x) {
  const int64_t columns = channels * plan.spatial;
  plan.columns = columns;
  for (int64_t vec = kMaxLoadBytes / element_bytes; vec >= 1; vec /= 2) {
    if (!is_aligned(x, vec * element_bytes)) continue;
    const int64_t budget = kThreads * vec;  // values one step of the block reads
    if (columns <= kTargetTileColumns) {
      // One tile of whole rows: each step reads tile_rows * columns contiguous values, a multiple
      // of vec so that every step starts aligned.
      const int64_t row_align = vec / greatest_common_divisor(columns, vec);
      plan.tile_columns = columns;
      plan.tile_rows = budget / columns / row_align * row_align;
    } else {
      // Tiles of whole channels, each row segment starting aligned.
      if (columns % vec != 0) continue;
      const int64_t unit = plan.spatial / greatest_common_divisor(plan.spatial, vec) * vec;
      plan.tile_columns = std::max<int64_t>(1, kTargetTileColumns / unit) * unit;
      if (plan.tile_columns > budget) continue;
      plan.tile_rows = budget / plan.tile_columns;
    }
    if (plan.tile_rows < 1) continue;
    plan.vec = static_cast<int>(vec);
    break;
  }
  const int64_t tiles = ceil_div(columns, plan.tile_columns);
  const int64_t tile_channels = plan.tile_columns / plan.spatial;
  const int64_t row_steps = ceil_div(plan.rows, plan.tile_rows);
  const int64_t strip_bytes = plan.rows * plan.tile_columns * element_bytes;
  const int64_t most_slots =
      std::min({kMaxSlots, std::max<int64_t>(1, kFinishBudget / tile_channels), row_steps});
  const int64_t slots = std::clamp<int64_t>(ceil_div(strip_bytes, kBlockBytes), 1, most_slots);
  plan.rows_per_slot = ceil_div(row_steps, slots) * plan.tile_rows;
  plan.slots = ceil_div(plan.rows, plan.rows_per_slot);
  plan.counters = tiles;
  plan.blocks = tiles * plan.slots;
}

void plan_segments(ChannelPlan& plan, int64_t channels, int64_t element_bytes, const void* x) {
  for (int64_t vec = kMaxLoadBytes / element_bytes; vec >= 1; vec /= 2) {
    if (is_aligned(x, vec * element_bytes) && plan.spatial % vec == 0) {
      plan.vec = static_cast<int>(vec);
      break;
    }
  }
  const int64_t channel_elements = plan.rows * plan.spatial;
  const int64_t pieces = std::clamp<int64_t>(ceil_div(channel_elements * element_bytes, kBlockBytes), 1,
                                             std::min(kMaxSlots, kFinishBudget));
  plan.piece_elements = round_up(ceil_div(channel_elements, pieces), plan.vec);
  plan.slots = ceil_div(channel_elements, plan.piece_elements);
  plan.counters = channels;
  plan.blocks = channels * plan.slots;
}

ChannelPlan plan_channel_mean(const ChannelMeanShape& shape, ElementType type, const void* x) {
  ChannelPlan plan;
  const int64_t element_bytes = static_cast<int64_t>(element_size(type));
  plan.spatial = shape.channels_last ? 1 : shape.spatial;
  plan.rows = shape.channels_last ? shape.rows * shape.spatial : shape.rows;
  plan.column_mode = plan.spatial < kColumnModeMinSpatial;
  if (plan.column_mode) {
    plan_columns(plan, shape.channels, element_bytes, x);
  } else {
    plan_segments(plan, shape.channels, element_bytes, x);
  }
  if (plan.slots > 1) {
    plan.partial_bytes = static_cast<size_t>(round_up(
        plan.slots * shape.channels * static_cast<int64_t>(accumulation_size(type)), 16));
    plan.negative_bytes = static_cast<size_t>(round_up(plan.slots * shape.channels, 16));
    plan.workspace_bytes =
        plan.partial_bytes + plan.negative_bytes + static_cast<size_t>(plan.counters) * sizeof(unsigned int);
  }
  return plan;
}

bool valid_shape(const ChannelMeanShape& shape) {
  return shape.rows >= 1 && shape.channels >= 1 && shape.spatial >= 1;
}

// ---- device side ----

// Where a block's result goes: the means directly (slots == 1), or a partial sum per
// (slot, channel) plus a counter per finishing group.
template <typename acc_t>
struct MeanOutput {
  acc_t* mean;
  bool* negative;  // kAbs only
  acc_t* partials;
  unsigned char* partial_negative;  // kAbs only, laid out as partials
  unsigned int* counters;
  acc_t count;  // values per channel
  int64_t slots;
};

template <typename acc_t>
struct ColumnArgs {
  int64_t rows, columns, spatial, channels;
  int64_t tile_columns, rows_per_slot;
  int tile_rows;
  MeanOutput<acc_t> output;
};

template <typename acc_t>
struct SegmentArgs {
  int64_t channels, spatial;
  int64_t channel_elements, piece_elements;
  MeanOutput<acc_t> output;
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

// Call after the block's partial sums are stored; true in every thread of the block that arrives
// last among the `arrivals` blocks sharing `counter`, once every other block's partials are visible.
__device__ bool arrives_last(unsigned int* counter, int64_t arrivals) {
  __shared__ bool last;
  __threadfence();  // this thread's partials reach device scope before the block is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) == static_cast<unsigned int>(arrivals - 1);
    __threadfence();  // the other blocks' partials are read after their tickets
  }
  __syncthreads();
  return last;
}

// mean[k] = (sum over slots s of partials[k * channel_stride + s * slot_stride]) / count for
// k < channels: slots split over a power-of-two group of lanes, then a butterfly, a fixed order.
template <typename acc_t>
__device__ void finish_means(const acc_t* partials, int64_t channel_stride, int64_t slot_stride, int channels,
                             int64_t slots, acc_t count, acc_t* mean) {
  int lanes = kWarpSize;
  while (lanes > 1 && (lanes * channels > kThreads || lanes / 2 >= slots)) lanes /= 2;
  const int groups = kThreads / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  for (int first = 0; first < channels; first += groups) {  // the same trip count in every thread
    const int channel = first + group;
    acc_t sum = 0;
    if (channel < channels) {
      const acc_t* source = partials + channel * channel_stride;
#pragma unroll 4
      for (int64_t slot = lane; slot < slots; slot += lanes) sum += __ldcg(source + slot * slot_stride);
    }
    sum = group_sum(sum, lanes);
    if (channel < channels && lane == 0) mean[channel] = sum / count;
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

  // This thread's kVec values sit at the same place of every step: tile row `row_offset`,
  // columns from `column`. In a one-tile plan they may run on into the next row, which is
  // contiguous in memory, so one load still covers them.
  const int first = threadIdx.x * kVec;
  const bool owns = first < tile_elements;
  const int row_offset = first / columns;
  const int64_t column = first_column + (first - row_offset * columns);

  acc_t sums[kVec];
  bool negative[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    sums[v] = 0;
    negative[v] = false;
  }
  if (owns) {
    const int64_t unrolled_rows = static_cast<int64_t>(kUnroll) * a.tile_rows;
    int64_t row = row_begin;
    // Whole steps: kUnroll loads in flight, no bounds to test.
    for (; row + unrolled_rows <= row_end; row += unrolled_rows) {
      scalar_t values[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        load_vector<kVec>(x + (row + u * a.tile_rows + row_offset) * a.columns + column, values[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) sums[v] += statistic_term<kAbs>(to_acc(values[u][v]), negative[v]);
      }
    }
    // The slot's last rows, one step at a time; the slot may end inside this thread's values.
    for (; row < row_end; row += a.tile_rows) {
      const int rows_left = static_cast<int>(min(row_end - row, static_cast<int64_t>(a.tile_rows)));
      const int valid = min(kVec, rows_left * columns - first);
      if (valid <= 0) break;
      const scalar_t* source = x + (row + row_offset) * a.columns + column;
      if (valid == kVec) {
        scalar_t values[kVec];
        load_vector<kVec>(source, values);
#pragma unroll
        for (int v = 0; v < kVec; ++v) sums[v] += statistic_term<kAbs>(to_acc(values[v]), negative[v]);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          if (v < valid) sums[v] += statistic_term<kAbs>(load_acc(source + v), negative[v]);
        }
      }
    }
  }

  if (owns) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      tile_sums[first + v] = sums[v];
      if constexpr (kAbs) tile_negative[first + v] = negative[v];
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
  if (out.slots == 1 || !arrives_last(out.counters + tile, out.slots)) return;
  finish_means(out.partials + first_channel, 1, a.channels, tile_channels, out.slots, out.count,
               out.mean + first_channel);
  if constexpr (kAbs) {
    for (int k = threadIdx.x; k < tile_channels; k += kThreads) {
      unsigned char any_negative = 0;
      for (int64_t s = 0; s < out.slots; ++s) any_negative |= __ldcg(out.partial_negative + s * a.channels + first_channel + k);
      out.negative[first_channel + k] = any_negative != 0;
    }
  }
}

template <typename scalar_t, int kVec, bool kAbs>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    segment_mean_kernel(const scalar_t* __restrict__ x, SegmentArgs<acc_type<scalar_t>> a) {
  using acc_t = acc_type<scalar_t>;
  const MeanOutput<acc_t>& out = a.output;
  const int64_t channel = blockIdx.x / out.slots;
  const int64_t piece = blockIdx.x - channel * out.slots;
  const int64_t end = min(a.channel_elements, (piece + 1) * a.piece_elements);

  // index runs over the channel's values in plane order; (sample, offset) follows it without a
  // division per step. S, the piece bounds and index are multiples of kVec, so no load straddles
  // two planes or the piece's end.
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kVec;
  const int64_t step_samples = kStep / a.spatial;
  const int64_t step_offset = kStep - step_samples * a.spatial;
  int64_t index = piece * a.piece_elements + threadIdx.x * kVec;
  int64_t sample = index / a.spatial;
  int64_t offset = index - sample * a.spatial;

  acc_t sums[kUnroll];
  bool negative = false;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) sums[u] = 0;
  auto advance = [&] {
    index += kStep;
    sample += step_samples;
    offset += step_offset;
    if (offset >= a.spatial) {
      offset -= a.spatial;
      ++sample;
    }
  };
  // Whole rounds: kUnroll loads in flight, no bounds to test.
  while (index + (kUnroll - 1) * kStep < end) {
    scalar_t values[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vector<kVec>(x + (sample * a.channels + channel) * a.spatial + offset, values[u]);
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
    load_vector<kVec>(x + (sample * a.channels + channel) * a.spatial + offset, values);
    advance();
#pragma unroll
    for (int v = 0; v < kVec; ++v) tail += statistic_term<kAbs>(to_acc(values[v]), negative);
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

  if (out.slots == 1) {
    if (threadIdx.x == 0) {
      out.mean[channel] = total / out.count;
      if constexpr (kAbs) out.negative[channel] = block_negative;
    }
    return;
  }
  if (threadIdx.x == 0) {
    out.partials[channel * out.slots + piece] = total;
    if constexpr (kAbs) out.partial_negative[channel * out.slots + piece] = block_negative ? 1 : 0;
  }
  if (!arrives_last(out.counters + channel, out.slots)) return;
  finish_means(out.partials + channel * out.slots, out.slots, 1, 1, out.slots, out.count, out.mean + channel);
  if (kAbs && threadIdx.x == 0) {
    unsigned char any_negative = 0;
    for (int64_t s = 0; s < out.slots; ++s) any_negative |= __ldcg(out.partial_negative + channel * out.slots + s);
    out.negative[channel] = any_negative != 0;
  }
}

template <typename scalar_t, bool kAbs>
cudaError_t launch_typed(const ChannelPlan& plan, const ChannelMeanShape& shape, const void* x, void* mean,
                         bool* negative, void* workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  MeanOutput<acc_t> out{};
  out.mean = static_cast<acc_t*>(mean);
  out.negative = negative;
  out.count = static_cast<acc_t>(shape.rows * shape.spatial);
  out.slots = plan.slots;
  if (plan.slots > 1) {
    out.partials = static_cast<acc_t*>(workspace);
    out.partial_negative = reinterpret_cast<unsigned char*>(static_cast<char*>(workspace) + plan.partial_bytes);
    out.counters = reinterpret_cast<unsigned int*>(static_cast<char*>(workspace) + plan.partial_bytes +
                                                   plan.negative_bytes);
    const cudaError_t status =
        cudaMemsetAsync(out.counters, 0, static_cast<size_t>(plan.counters) * sizeof(unsigned int), stream);
    if (status != cudaSuccess) return status;
  }
  const scalar_t* data = static_cast<const scalar_t*>(x);
  return visit_vector_width<scalar_t>(plan.vec, [&](auto width) {
    constexpr int kVec = decltype(width)::value;
    const unsigned int blocks = static_cast<unsigned int>(plan.blocks);
    if (plan.column_mode) {
      ColumnArgs<acc_t> args{plan.rows,         plan.columns,       plan.spatial,
                             shape.channels,    plan.tile_columns,  plan.rows_per_slot,
                             static_cast<int>(plan.tile_rows), out};
      EQUINORM_LAUNCH(blocks, kThreads, 0, stream, column_mean_kernel<scalar_t, kVec, kAbs>)(data, args);
    } else {
      SegmentArgs<acc_t> args{shape.channels, plan.spatial, plan.rows * plan.spatial, plan.piece_elements, out};
      EQUINORM_LAUNCH(blocks, kThreads, 0, stream, segment_mean_kernel<scalar_t, kVec, kAbs>)(data, args);
    }
    return cudaGetLastError();
  });
}

}  // namespace

size_t channel_mean_workspace_bytes(const ChannelMeanShape& shape, ElementType type, const void* x) {
  if (!valid_shape(shape)) return 0;
  return plan_channel_mean(shape, type, x).workspace_bytes;
}

cudaError_t launch_channel_mean(const ChannelMeanShape& shape, ElementType type, const void* x, void* mean,
                                bool* negative, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(shape) || x == nullptr || mean == nullptr) return cudaErrorInvalidValue;
  const ChannelPlan plan = plan_channel_mean(shape, type, x);
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
