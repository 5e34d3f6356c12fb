// ENorm's fused rescaling on the GPU (formulas: csrc/shared/enorm_math.h; program format:
// csrc/enorm_plan.h; launch plans: cuda/launch_plans.h). Groups are balanced one after the other,
// each from the tensors as the previous groups left them, as the CPU op does.
//
// Launches per group, no memset:
//   energy    a power-of-two group of lanes owns a unit of one counted entry and adds |v|^p
//             over a slice of its values; the butterfly totals are stored per (entry, slice,
//             channel). A unit is one channel whose values are a run (rows: 16-byte vectors
//             along it, a scalar head up to its first 16-byte boundary and a scalar tail), the
//             16 bytes of adjacent channels of every row (Linear columns, channels_last and 1x1
//             convs: a row's first channels up to its 16-byte boundary and last few are
//             scalar units), or one channel read an element a load (runs of a few taps),
//             neighbouring units on neighbouring lanes where adjacent, so loads coalesce.
//             Slices split long channels over blocks until the group fills two waves.
//   finish    32 channels per block, 8 lanes each, add every channel's row and column energies in
//             entry and slice order and compute d, the factors d^power and max |d - 1| (an
//             integer atomicMax on the non-negative doubles' bits: exact, whatever the order).
//   rescale   every entry of the group, each value multiplied by its channel's factor, in
//             storage order: a scalar head up to the first 16-byte boundary, 16-byte vectors
//             (which may span rows), a scalar tail. A vector's first channel is found once, the
//             others stepped to. Entries naming the same tensor go to separate launches.
// No float atomics: every sum runs in an order fixed by the shapes (and where a tensor's base
// sits past a 16-byte boundary), so d is bit-identical across runs. Energies are added, and values rescaled, in double (em::energy_math_t) for every dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda/device_common.cuh"
#include "shared/enorm_math.h"

namespace equinorm {
namespace cuda {
namespace {

namespace em = equinorm::math;

constexpr int kThreads = kEnormThreads;
constexpr int kMinBlocksPerSM = kEnormBlocksPerMultiprocessor;
// Entries one launch takes (kernel parameters); longer lists are split over several launches.
constexpr int kMaxLaunchEntries = 16;
// Powers a factor is kept for: -2, -1, 1, 2 (power 0 leaves a tensor unchanged).
constexpr int kPowers = 4;
// Values of the widest vector (16 bytes of 2-byte elements): the most channels a lane group owns.
constexpr int kMaxVec = 8;

__host__ __device__ inline int power_slot(int power) { return power < 0 ? power + 2 : power + 1; }

// An entry as the energy kernel reads it: channel j's values are (o, t) for o < outer_count,
// t < inner, at data + base(j) + o * outer_stride + t * inner_stride. Its lane groups (units) own
// one channel each, or (kAdjacent) a row's head channels, vectors of vec channels, tail channels.
struct EnergyView {
  const void* data;
  ElementType type;
  bool columns;
  EnergyLayout layout;         // plan_enorm_energy's: how the units load
  int vec;                     // values of a vector load (kRun, kAdjacent)
  int64_t channels;            // of the group
  int64_t channels_per_group;  // columns: per conv group
  int64_t outer_count;         // outer indices a channel reads (rows: 1)
  int64_t outer_stride, channel_stride, inner, inner_stride;
  int64_t values;              // outer_count * inner
  int64_t head, body, tail;    // kAdjacent: a row's units
  int64_t units;
  int64_t slice_values;        // values per slice (kRun: slice_vectors vectors)
  int64_t slice_vectors;
  int lanes;                   // per unit, a power of two <= 32
  int64_t slices;
  int64_t first_block;         // of this entry in the launch
  int64_t partial_row;         // first row of its slices in the (slots, channels) partials
};

struct EnergyLaunch {
  EnergyView views[kMaxLaunchEntries];
  int count;
  double p;
  int64_t channels;
  double* partials;             // (partial rows, channels)
  double* deviation;            // cleared by the group's first launch (the finish takes its max), or null
};

struct FinishLaunch {
  double p, c;
  int64_t channels;
  const double* partials;
  int64_t row_partial_rows;     // partial rows [0, this) are row energies, the rest column energies
  int64_t partial_rows;
  double* coefficients;         // (channels,)
  double* factors;              // (kPowers, channels)
  double* deviation;            // (1,) or null
};

struct RescaleView {
  void* data;
  ElementType type;
  bool columns;
  int power;
  int vec;
  int64_t row_values;  // values of a row (outer_stride); the entry is `outer` rows, one contiguous run
  int64_t outer_per_group, channels_per_group;
  int64_t channel_divisor, channel_modulus;  // columns: i = (r / divisor) % modulus, r the offset in the row
  int64_t head, body_vectors, tail, block_vectors, blocks;  // plan_enorm_rescale
  int64_t first_block;
};

struct RescaleLaunch {
  RescaleView views[kMaxLaunchEntries];
  int count;
  int64_t channels;
  const double* factors;
};

// The entry a block works on: the last one whose first block is <= blockIdx.x.
template <typename View>
__device__ int entry_of_block(const View (&views)[kMaxLaunchEntries], int count) {
  int k = 0;
  while (k + 1 < count && views[k + 1].first_block <= static_cast<int64_t>(blockIdx.x)) ++k;
  return k;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t load_element(const scalar_t* source) {
  scalar_t value[1];
  load_vector<1>(source, value);
  return value[0];
}

// |value|^p, the exponent's kind fixed at compile time: no test of p in the inner loops, and
// pow's registers only in the kernel for p other than 1 and 2.
template <em::Exponent kKind, typename scalar_t>
__device__ __forceinline__ em::energy_math_t term(scalar_t value, em::energy_math_t exponent) {
  return em::energy_term_of<kKind>(static_cast<em::energy_math_t>(to_acc(value)), exponent);
}

// Where value `index` of a channel lies from its first: index = o * inner + t over the outer
// rows o and the inner values t. A channel's values are fewer than 2^31 (checked on the host), so
// the index arithmetic is 32-bit.
__device__ __forceinline__ int64_t value_offset(const EnergyView& v, unsigned inner, unsigned index) {
  const unsigned o = index / inner;
  return static_cast<int64_t>(o) * v.outer_stride + static_cast<int64_t>(index - o * inner) * v.inner_stride;
}

// One channel's values [begin, end), one element a load, kLoads loads in flight (as many bytes as
// a vector thread's kEnergyUnroll 16-byte loads need to cover the latency: kEnergyScalarBytes).
template <em::Exponent kKind, typename scalar_t>
__device__ double strided_channel_energy(const EnergyView& v, int64_t base, int64_t begin, int64_t end, int lane,
                                         double p) {
  using acc_t = em::energy_math_t;
  constexpr int kLoads = kEnergyScalarBytes / static_cast<int>(sizeof(scalar_t)) > kEnergyUnroll
                             ? kEnergyScalarBytes / static_cast<int>(sizeof(scalar_t))
                             : kEnergyUnroll;
  const scalar_t* data = static_cast<const scalar_t*>(v.data) + base;
  const acc_t exponent = static_cast<acc_t>(p);
  acc_t sums[kEnergyUnroll];
#pragma unroll
  for (int u = 0; u < kEnergyUnroll; ++u) sums[u] = 0;
  const unsigned inner = static_cast<unsigned>(v.inner), lanes = static_cast<unsigned>(v.lanes);
  const unsigned last = static_cast<unsigned>(end);
  unsigned k = static_cast<unsigned>(begin) + lane;
  for (; k + (kLoads - 1) * lanes < last; k += kLoads * lanes) {
    scalar_t values[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) values[u] = load_element(data + value_offset(v, inner, k + u * lanes));
#pragma unroll
    for (int u = 0; u < kLoads; ++u) sums[u % kEnergyUnroll] += term<kKind>(values[u], exponent);
  }
  for (; k < last; k += lanes) sums[0] += term<kKind>(load_element(data + value_offset(v, inner, k)), exponent);
  acc_t total = sums[0];
#pragma unroll
  for (int u = 1; u < kEnergyUnroll; ++u) total += sums[u];
  return static_cast<double>(total);
}

// One channel's run of values (rows): a scalar head up to its first kVec-aligned value and a
// scalar tail, both added by the first slice, and the slice's share of the aligned vectors between.
template <em::Exponent kKind, typename scalar_t, int kVec>
__device__ double run_channel_energy(const EnergyView& v, int64_t base, int64_t slice, int lane, double p) {
  using acc_t = em::energy_math_t;
  const scalar_t* run = static_cast<const scalar_t*>(v.data) + base;
  const acc_t exponent = static_cast<acc_t>(p);
  const unsigned values = static_cast<unsigned>(v.values), lanes = static_cast<unsigned>(v.lanes);
  const unsigned phase = static_cast<unsigned>(reinterpret_cast<uintptr_t>(run) / sizeof(scalar_t) % kVec);
  const unsigned head = min(values, (kVec - phase) % kVec);
  const unsigned vectors = (values - head) / kVec;
  const unsigned tail_first = head + vectors * kVec;
  acc_t sums[kEnergyUnroll];
#pragma unroll
  for (int u = 0; u < kEnergyUnroll; ++u) sums[u] = 0;
  if (slice == 0) {
    for (unsigned q = lane; q < head + (values - tail_first); q += lanes) {
      sums[0] += term<kKind>(load_element(run + (q < head ? q : tail_first + (q - head))), exponent);
    }
  }
  const scalar_t* body = run + head;
  const unsigned first = static_cast<unsigned>(slice * v.slice_vectors);
  const unsigned last = min(vectors, first + static_cast<unsigned>(v.slice_vectors));
  unsigned k = first + lane;
  for (; k + (kEnergyUnroll - 1) * lanes < last; k += kEnergyUnroll * lanes) {
    scalar_t loaded[kEnergyUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kEnergyUnroll; ++u) load_vector<kVec>(body + (k + u * lanes) * kVec, loaded[u]);
#pragma unroll
    for (int u = 0; u < kEnergyUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sums[u] += term<kKind>(loaded[u][e], exponent);
    }
  }
  for (; k < last; k += lanes) {
    scalar_t loaded[kVec];
    load_vector<kVec>(body + k * kVec, loaded);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sums[0] += term<kKind>(loaded[e], exponent);
  }
  acc_t total = sums[0];
#pragma unroll
  for (int u = 1; u < kEnergyUnroll; ++u) total += sums[u];
  return static_cast<double>(total);
}

// kVec adjacent channels' values [begin, end), one vector of the kVec channels a load.
template <em::Exponent kKind, typename scalar_t, int kVec>
__device__ void adjacent_channels_energy(const EnergyView& v, int64_t base, int64_t begin, int64_t end, int lane,
                                         double p, double (&energies)[kMaxVec]) {
  using acc_t = em::energy_math_t;
  const scalar_t* data = static_cast<const scalar_t*>(v.data) + base;
  const acc_t exponent = static_cast<acc_t>(p);
  acc_t sums[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) sums[e] = 0;
  const unsigned inner = static_cast<unsigned>(v.inner), lanes = static_cast<unsigned>(v.lanes);
  const unsigned last = static_cast<unsigned>(end);
  unsigned k = static_cast<unsigned>(begin) + lane;
  for (; k + (kEnergyUnroll - 1) * lanes < last; k += kEnergyUnroll * lanes) {
    scalar_t loaded[kEnergyUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kEnergyUnroll; ++u) load_vector<kVec>(data + value_offset(v, inner, k + u * lanes), loaded[u]);
#pragma unroll
    for (int u = 0; u < kEnergyUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sums[e] += term<kKind>(loaded[u][e], exponent);
    }
  }
  for (; k < last; k += lanes) {
    scalar_t loaded[kVec];
    load_vector<kVec>(data + value_offset(v, inner, k), loaded);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sums[e] += term<kKind>(loaded[e], exponent);
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) energies[e] = static_cast<double>(sums[e]);
}

// The energies of a unit's `width` channels, as its entry's layout loads them.
template <em::Exponent kKind, typename scalar_t>
__device__ void unit_energy(const EnergyView& v, int64_t base, int width, int64_t slice, int64_t begin, int64_t end,
                            int lane, double p, double (&energies)[kMaxVec]) {
  constexpr int kVec = max_vector_width<scalar_t>();
  if (v.layout == EnergyLayout::kRun) {
    energies[0] = run_channel_energy<kKind, scalar_t, kVec>(v, base, slice, lane, p);
  } else if (width == kVec) {
    adjacent_channels_energy<kKind, scalar_t, kVec>(v, base, begin, end, lane, p, energies);
  } else {
    energies[0] = strided_channel_energy<kKind, scalar_t>(v, base, begin, end, lane, p);
  }
}

template <em::Exponent kKind>
__device__ void dispatch_unit_energy(const EnergyView& v, int64_t base, int width, int64_t slice, int64_t begin,
                                     int64_t end, int lane, double p, double (&energies)[kMaxVec]) {
  switch (v.type) {
    case ElementType::kHalf:
      return unit_energy<kKind, __half>(v, base, width, slice, begin, end, lane, p, energies);
    case ElementType::kBFloat16:
      return unit_energy<kKind, __nv_bfloat16>(v, base, width, slice, begin, end, lane, p, energies);
    case ElementType::kFloat:
      return unit_energy<kKind, float>(v, base, width, slice, begin, end, lane, p, energies);
    case ElementType::kDouble:
      return unit_energy<kKind, double>(v, base, width, slice, begin, end, lane, p, energies);
  }
}

template <em::Exponent kKind>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) enorm_energy_kernel(const __grid_constant__ EnergyLaunch a) {
  if (a.deviation != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *a.deviation = 0;
  const EnergyView& v = a.views[entry_of_block(a.views, a.count)];
  const int64_t block = blockIdx.x - v.first_block;
  const int64_t unit_block = block / v.slices, slice = block - unit_block * v.slices;
  const int lane = threadIdx.x % v.lanes;
  const int64_t unit = unit_block * (kThreads / v.lanes) + threadIdx.x / v.lanes;
  const bool active = unit < v.units;
  // The unit's first channel j (of the group), its channels and where channel j's values start.
  int64_t j = unit, base = 0;
  int width = 1;
  if (active) {
    if (v.layout == EnergyLayout::kAdjacent) {
      const int64_t row_units = v.head + v.body + v.tail;
      const int64_t group = unit / row_units, u = unit - group * row_units;
      const bool vector = u >= v.head && u < v.head + v.body;
      const int64_t i = u < v.head ? u : vector ? v.head + (u - v.head) * v.vec : v.head + v.body * v.vec + (u - v.head - v.body);
      width = vector ? v.vec : 1;
      j = group * v.channels_per_group + i;
      base = group * v.outer_count * v.outer_stride + i * v.channel_stride;
    } else if (v.columns) {
      const int64_t group = j / v.channels_per_group;
      base = group * v.outer_count * v.outer_stride + (j - group * v.channels_per_group) * v.channel_stride;
    } else {
      base = j * v.outer_stride;
    }
  }
  const int64_t begin = slice * v.slice_values;
  const int64_t end = min(v.values, begin + v.slice_values);
  double energies[kMaxVec];
#pragma unroll
  for (int e = 0; e < kMaxVec; ++e) energies[e] = 0;
  if (active) dispatch_unit_energy<kKind>(v, base, width, slice, begin, end, lane, a.p, energies);
  // Every lane reaches the butterflies, so the whole warp meets at the shuffles.
#pragma unroll
  for (int e = 0; e < kMaxVec; ++e) energies[e] = group_sum(energies[e], v.lanes);
  if (active && lane == 0) {
#pragma unroll
    for (int e = 0; e < kMaxVec; ++e) {
      if (e < width) a.partials[(v.partial_row + slice) * a.channels + j + e] = energies[e];
    }
  }
}

// kFinishChannels channels per block, kFinishLanes lanes each adding every kFinishLanes-th partial
// row; the lanes' sums are then added in lane order, so a warp reads 32 adjacent channels of a row.
__global__ void __launch_bounds__(kFinishChannels * kFinishLanes) enorm_finish_kernel(const FinishLaunch a) {
  __shared__ double lane_rows[kFinishLanes][kFinishChannels];
  __shared__ double lane_columns[kFinishLanes][kFinishChannels];
  const int channel_lane = threadIdx.x % kFinishChannels, row_lane = threadIdx.x / kFinishChannels;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kFinishChannels + channel_lane;
  double rows = 0, cols = 0;
  if (j < a.channels) {
    for (int64_t r = row_lane; r < a.row_partial_rows; r += kFinishLanes) rows += a.partials[r * a.channels + j];
    for (int64_t r = a.row_partial_rows + row_lane; r < a.partial_rows; r += kFinishLanes) {
      cols += a.partials[r * a.channels + j];
    }
  }
  lane_rows[row_lane][channel_lane] = rows;
  lane_columns[row_lane][channel_lane] = cols;
  __syncthreads();
  if (row_lane != 0) return;  // warp 0 goes on, all its lanes together
  double deviation = 0;
  if (j < a.channels) {
    for (int lane = 1; lane < kFinishLanes; ++lane) {
      rows += lane_rows[lane][channel_lane];
      cols += lane_columns[lane][channel_lane];
    }
    const double d = em::enorm_coefficient(rows, cols, a.p, a.c);
    a.coefficients[j] = d;
    for (int power = -2; power <= 2; ++power) {
      if (power != 0) a.factors[power_slot(power) * a.channels + j] = em::coefficient_power(d, power);
    }
    deviation = fabs(d - 1);
  }
  if (a.deviation == nullptr) return;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    deviation = fmax(deviation, __shfl_xor_sync(kFullWarpMask, deviation, offset));
  }
  // Non-negative doubles order as their bits do, so the integer maximum is the exact one.
  if (channel_lane == 0) {
    unsigned long long bits;
    memcpy(&bits, &deviation, sizeof(bits));
    atomicMax(reinterpret_cast<unsigned long long*>(a.deviation), bits);
  }
}

// kVec consecutive values: stored whole, as load_vector reads them.
template <int kVec, typename scalar_t>
__device__ __forceinline__ void store_vector(scalar_t* target, const scalar_t (&values)[kVec]) {
  using Word = typename LoadWord<sizeof(scalar_t) * kVec>::type;
  Word word;
  memcpy(&word, values, sizeof(Word));
  *reinterpret_cast<Word*>(target) = word;
}

// The factor of one value and of the values after it: located once (divisions), then stepped value
// by value. Along a row the columns' channel index i = (r / divisor) % modulus steps by one every
// `divisor` values; a row's end starts the next row at channel 0 (and, every outer_per_group rows,
// the next conv group's channels).
struct RescaleCursor {
  int64_t row, group_first;
  unsigned r, i, step, group_row;

  __device__ RescaleCursor(const RescaleView& v, int64_t first_row, unsigned offset_in_row) {
    const unsigned row_values = static_cast<unsigned>(v.row_values);
    const unsigned rows_on = offset_in_row / row_values;
    row = first_row + rows_on;
    r = offset_in_row - rows_on * row_values;
    const unsigned divisor = static_cast<unsigned>(v.channel_divisor);
    i = (r / divisor) % static_cast<unsigned>(v.channel_modulus);
    step = r % divisor;
    const int64_t group = v.columns ? row / v.outer_per_group : row;
    group_first = group * v.channels_per_group;
    group_row = static_cast<unsigned>(row - group * v.outer_per_group);
  }

  __device__ int64_t factor_index(const RescaleView& v) const { return v.columns ? group_first + i : row; }

  __device__ void advance(const RescaleView& v) {
    if (++r == static_cast<unsigned>(v.row_values)) {
      r = i = step = 0;
      ++row;
      if (++group_row == static_cast<unsigned>(v.outer_per_group)) {
        group_row = 0;
        group_first += v.channels_per_group;
      }
    } else if (++step == static_cast<unsigned>(v.channel_divisor)) {
      step = 0;
      if (++i == static_cast<unsigned>(v.channel_modulus)) i = 0;
    }
  }
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t rescaled(scalar_t value, double factor) {
  using acc_t = acc_type<scalar_t>;
  using math_t = em::energy_math_t;
  return from_acc<scalar_t>(static_cast<acc_t>(static_cast<math_t>(to_acc(value)) * factor));
}

// The value at index n of the entry, on its own (head and tail).
template <typename scalar_t>
__device__ void rescale_scalar(const RescaleView& v, const double* factor, int64_t n) {
  scalar_t* data = static_cast<scalar_t*>(v.data);
  const int64_t row = n / v.row_values;
  const RescaleCursor cursor(v, row, static_cast<unsigned>(n - row * v.row_values));
  data[n] = rescaled(data[n], __ldg(factor + cursor.factor_index(v)));
}

// The block's block_vectors aligned vectors of the body, each thread kRescaleUnroll loads in flight;
// the first block also rescales the head, the last the tail.
template <typename scalar_t, int kVec>
__device__ void rescale_run(const RescaleView& v, const double* factors, int64_t channels) {
  const double* factor = factors + power_slot(v.power) * channels;
  const int64_t block = blockIdx.x - v.first_block;
  if (block == 0 && threadIdx.x < v.head) rescale_scalar<scalar_t>(v, factor, threadIdx.x);
  const int64_t tail_first = v.head + v.body_vectors * kVec;
  if (block == v.blocks - 1 && threadIdx.x < v.tail) {
    rescale_scalar<scalar_t>(v, factor, tail_first + threadIdx.x);
  }
  const int64_t first_vector = block * v.block_vectors;
  // A block covers fewer than 2^31 values and a row is shorter than 2^31: 32-bit offsets from its first row.
  const unsigned vectors = static_cast<unsigned>(min(v.block_vectors, v.body_vectors - first_vector));
  const int64_t block_first = v.head + first_vector * kVec;
  const int64_t first_row = block_first / v.row_values;
  const unsigned first_offset = static_cast<unsigned>(block_first - first_row * v.row_values);
  scalar_t* data = static_cast<scalar_t*>(v.data) + block_first;
  auto rescale = [&](unsigned k, scalar_t (&values)[kVec]) {
    RescaleCursor cursor(v, first_row, first_offset + k * kVec);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      values[e] = rescaled(values[e], __ldg(factor + cursor.factor_index(v)));
      cursor.advance(v);
    }
  };
  unsigned k = threadIdx.x;
  for (; k + (kRescaleUnroll - 1) * kThreads < vectors; k += kRescaleUnroll * kThreads) {
    scalar_t values[kRescaleUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kRescaleUnroll; ++u) load_vector<kVec>(data + (k + u * kThreads) * kVec, values[u]);
#pragma unroll
    for (int u = 0; u < kRescaleUnroll; ++u) {
      rescale(k + u * kThreads, values[u]);
      store_vector<kVec>(data + (k + u * kThreads) * kVec, values[u]);
    }
  }
  for (; k < vectors; k += kThreads) {
    scalar_t values[kVec];
    load_vector<kVec>(data + k * kVec, values);
    rescale(k, values);
    store_vector<kVec>(data + k * kVec, values);
  }
}

template <typename scalar_t>
__device__ void dispatch_rescale_width(const RescaleView& v, const double* factors, int64_t channels) {
  switch (v.vec) {
    case 8:
      if constexpr (max_vector_width<scalar_t>() >= 8) rescale_run<scalar_t, 8>(v, factors, channels);
      break;
    case 4:
      if constexpr (max_vector_width<scalar_t>() >= 4) rescale_run<scalar_t, 4>(v, factors, channels);
      break;
    case 2:
      if constexpr (max_vector_width<scalar_t>() >= 2) rescale_run<scalar_t, 2>(v, factors, channels);
      break;
    default:
      rescale_run<scalar_t, 1>(v, factors, channels);
  }
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) enorm_rescale_kernel(const __grid_constant__ RescaleLaunch a) {
  const RescaleView& v = a.views[entry_of_block(a.views, a.count)];
  switch (v.type) {
    case ElementType::kHalf:
      dispatch_rescale_width<__half>(v, a.factors, a.channels);
      break;
    case ElementType::kBFloat16:
      dispatch_rescale_width<__nv_bfloat16>(v, a.factors, a.channels);
      break;
    case ElementType::kFloat:
      dispatch_rescale_width<float>(v, a.factors, a.channels);
      break;
    case ElementType::kDouble:
      dispatch_rescale_width<double>(v, a.factors, a.channels);
      break;
  }
}

// ---- host side ----

int64_t entry_channels(const EnormEntry& e) { return e.columns ? e.channels_per_group * e.groups : e.outer; }

EnergyView energy_view(const EnormEntry& e) {
  EnergyView v{};
  v.data = e.data;
  v.type = e.type;
  v.columns = e.columns;
  v.channels = entry_channels(e);
  v.channels_per_group = e.columns ? e.channels_per_group : 1;
  v.outer_count = e.columns ? e.outer / e.groups : 1;
  v.outer_stride = e.outer_stride;
  v.channel_stride = e.columns ? e.channel_stride : e.outer_stride;
  v.inner = e.inner;
  v.inner_stride = e.inner_stride;
  v.values = v.outer_count * v.inner;
  return v;
}

// The counted entries of a group with their slices (plan_enorm_energy): rows first, then columns,
// each in entry order.
struct GroupEnergy {
  std::vector<EnergyView> views;
  int64_t row_partial_rows = 0;
  int64_t partial_rows = 0;
  int64_t blocks = 0;
  int64_t finish_blocks = 0;
};

EnergyEntry energy_entry(const EnergyView& v) {
  EnergyEntry e;
  e.channels = v.channels;
  e.values = v.values;
  e.element_bytes = static_cast<int64_t>(element_size(v.type));
  if (!v.columns) {
    e.layout = EnergyLayout::kRun;
  } else if (v.channel_stride == 1) {
    e.layout = EnergyLayout::kAdjacent;
    e.row_channels = v.channels_per_group;
    // Rows start at base + o * outer_stride + t * inner_stride (and a group's at a multiple of outer_stride).
    e.row_stride_gcd = greatest_common_divisor(v.outer_stride, v.inner > 1 ? v.inner_stride : 0);
    e.misalignment_bytes = static_cast<int64_t>(reinterpret_cast<uintptr_t>(v.data) % kMaxLoadBytes);
  }
  return e;
}

GroupEnergy plan_energy(const EnormEntry* group, int64_t size, const MachineModel& machine) {
  GroupEnergy energy;
  std::vector<EnergyEntry> shapes;
  for (const bool columns : {false, true}) {
    for (int64_t k = 0; k < size; ++k) {
      if (!group[k].counted || group[k].columns != columns) continue;
      const EnergyView v = energy_view(group[k]);
      energy.views.push_back(v);
      shapes.push_back(energy_entry(v));
    }
  }
  const EnergyPlan plan = plan_enorm_energy(shapes, entry_channels(group[0]), machine);
  for (size_t k = 0; k < energy.views.size(); ++k) {
    EnergyView& v = energy.views[k];
    const EnergySlices& slices = plan.entries[k];
    v.layout = slices.layout;
    v.vec = slices.vec;
    v.head = slices.head;
    v.body = slices.body;
    v.tail = slices.tail;
    v.units = slices.units;
    v.lanes = slices.lanes;
    v.slices = slices.slices;
    v.slice_values = slices.slice_values;
    v.slice_vectors = slices.slice_vectors;
    v.partial_row = energy.partial_rows;
    energy.partial_rows += v.slices;
    if (!v.columns) energy.row_partial_rows = energy.partial_rows;
    v.first_block = energy.blocks;  // within the group; rebased per launch
    energy.blocks += slices.blocks;
  }
  energy.finish_blocks = plan.finish_blocks;
  return energy;
}

RescaleView rescale_view(const EnormEntry& e) {
  RescaleView v{};
  v.data = e.data;
  v.type = e.type;
  v.columns = e.columns;
  v.power = e.power;
  v.row_values = e.outer_stride;
  v.outer_per_group = e.columns ? e.outer / e.groups : 1;
  v.channels_per_group = e.columns ? e.channels_per_group : 1;
  // (c, t) storage: a channel's values are a run of inner; (t, c): channels alternate.
  v.channel_divisor = e.columns && e.inner_stride == 1 ? e.channel_stride : 1;
  v.channel_modulus = e.columns && e.inner_stride == 1 ? e.channels_per_group : e.inner_stride;
  if (!e.columns) v.channel_modulus = 1;
  const auto misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(e.data) % kMaxLoadBytes);
  const RescalePlan plan = plan_enorm_rescale(e.outer, e.outer_stride, static_cast<int64_t>(element_size(e.type)),
                                              misalignment);
  v.vec = plan.vec;
  v.head = plan.head;
  v.body_vectors = plan.body_vectors;
  v.tail = plan.tail;
  v.block_vectors = plan.block_vectors;
  v.blocks = plan.blocks;
  return v;
}

bool valid_entry(const EnormEntry& e) {
  if (e.data == nullptr || e.outer < 1 || e.inner < 1 || e.outer_stride < 1 || e.power < -2 || e.power > 2) return false;
  // The kernels index a channel's values, and a rescale block's values from its first row, in 32 bits.
  const int64_t channel_values = e.columns ? (e.groups >= 1 ? e.outer / e.groups : 0) * e.inner : e.inner;
  if (channel_values > INT_MAX || e.outer_stride > INT_MAX) return false;
  if (!e.columns) return true;
  return e.groups >= 1 && e.outer % e.groups == 0 && e.channels_per_group >= 1 && e.channel_stride >= 1 &&
         e.inner_stride >= 1 && (e.inner_stride == 1 || e.channel_stride == 1);
}

struct WorkspaceLayout {
  size_t partials = 0, factors = 0, coefficients = 0, total = 0;
};

WorkspaceLayout workspace_layout(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count,
                                 const MachineModel& machine) {
  int64_t most_channels = 1, most_partials = 1;
  for (int64_t g = 0, first = 0; g < group_count; first += group_sizes[g], ++g) {
    const GroupEnergy energy = plan_energy(entries + first, group_sizes[g], machine);
    const int64_t channels = entry_channels(entries[first]);
    most_channels = std::max(most_channels, channels);
    most_partials = std::max(most_partials, energy.partial_rows * channels);
  }
  auto aligned = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  WorkspaceLayout layout;
  layout.partials = 0;
  layout.factors = layout.partials + aligned(static_cast<size_t>(most_partials) * sizeof(double));
  layout.coefficients = layout.factors + aligned(static_cast<size_t>(kPowers * most_channels) * sizeof(double));
  layout.total = layout.coefficients + aligned(static_cast<size_t>(most_channels) * sizeof(double));
  return layout;
}

// The group's energy launches (at most kMaxLaunchEntries entries each), then its finish.
cudaError_t launch_energy(const GroupEnergy& energy, EnergyLaunch args, FinishLaunch finish, cudaStream_t stream) {
  for (size_t first = 0; first < energy.views.size(); first += kMaxLaunchEntries) {
    const size_t count = std::min<size_t>(kMaxLaunchEntries, energy.views.size() - first);
    const int64_t block_offset = energy.views[first].first_block;
    const int64_t end_block =
        first + count < energy.views.size() ? energy.views[first + count].first_block : energy.blocks;
    args.count = static_cast<int>(count);
    for (size_t k = 0; k < count; ++k) {
      args.views[k] = energy.views[first + k];
      args.views[k].first_block -= block_offset;
    }
    if (first > 0) args.deviation = nullptr;  // cleared once, before the finish
    const int64_t blocks = end_block - block_offset;
    if (!fits_grid(blocks)) return cudaErrorInvalidConfiguration;
    const unsigned int grid = static_cast<unsigned int>(blocks);
    switch (em::exponent_kind(args.p)) {
      case em::Exponent::kTwo:
        EQUINORM_LAUNCH(grid, kThreads, 0, stream, enorm_energy_kernel<em::Exponent::kTwo>)(args);
        break;
      case em::Exponent::kOne:
        EQUINORM_LAUNCH(grid, kThreads, 0, stream, enorm_energy_kernel<em::Exponent::kOne>)(args);
        break;
      default:
        EQUINORM_LAUNCH(grid, kThreads, 0, stream, enorm_energy_kernel<em::Exponent::kOther>)(args);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  finish.row_partial_rows = energy.row_partial_rows;
  finish.partial_rows = energy.partial_rows;
  if (!fits_grid(energy.finish_blocks)) return cudaErrorInvalidConfiguration;
  EQUINORM_LAUNCH(static_cast<unsigned int>(energy.finish_blocks), kFinishChannels * kFinishLanes, 0, stream,
                  enorm_finish_kernel)(finish);
  return cudaGetLastError();
}

cudaError_t launch_rescale(const EnormEntry* group, int64_t size, int64_t channels, const double* factors,
                           cudaStream_t stream) {
  RescaleLaunch args{};
  args.channels = channels;
  args.factors = factors;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (args.count == 0) return cudaSuccess;
    if (!fits_grid(blocks)) return cudaErrorInvalidConfiguration;
    EQUINORM_LAUNCH(static_cast<unsigned int>(blocks), kThreads, 0, stream, enorm_rescale_kernel)(args);
    args.count = 0;
    blocks = 0;
    return cudaGetLastError();
  };
  for (int64_t k = 0; k < size; ++k) {
    if (group[k].power == 0) continue;
    // A tensor named twice in one launch would be read and written by two blocks at once.
    bool repeated = false;
    for (int i = 0; i < args.count; ++i) repeated |= args.views[i].data == group[k].data;
    if (repeated || args.count == kMaxLaunchEntries) {
      const cudaError_t status = flush();
      if (status != cudaSuccess) return status;
    }
    RescaleView v = rescale_view(group[k]);
    v.first_block = blocks;
    blocks += v.blocks;
    args.views[args.count++] = v;
  }
  return flush();
}

}  // namespace

size_t enorm_workspace_bytes(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count,
                             const MachineModel& machine) {
  if (entries == nullptr || group_sizes == nullptr || group_count < 1) return 0;
  for (int64_t g = 0; g < group_count; ++g) {
    if (group_sizes[g] < 1) return 0;
  }
  return workspace_layout(entries, group_sizes, group_count, machine).total;
}

cudaError_t launch_enorm(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count, double p,
                         double c, double* coefficients, double* deviations, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream, const MachineModel& machine) {
  if (entries == nullptr || group_sizes == nullptr || group_count < 1 || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  for (int64_t g = 0, first = 0; g < group_count; first += group_sizes[g], ++g) {
    if (group_sizes[g] < 1) return cudaErrorInvalidValue;
    bool counts_rows = false, counts_columns = false;
    for (int64_t k = first; k < first + group_sizes[g]; ++k) {
      if (!valid_entry(entries[k]) || entry_channels(entries[k]) != entry_channels(entries[first])) {
        return cudaErrorInvalidValue;
      }
      (entries[k].columns ? counts_columns : counts_rows) |= entries[k].counted;
    }
    if (!counts_rows || !counts_columns) return cudaErrorInvalidValue;
  }
  const WorkspaceLayout layout = workspace_layout(entries, group_sizes, group_count, machine);
  if (workspace_bytes < layout.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);

  for (int64_t g = 0, first = 0; g < group_count; first += group_sizes[g], ++g) {
    const EnormEntry* group = entries + first;
    const int64_t channels = entry_channels(group[0]);
    double* partials = reinterpret_cast<double*>(base + layout.partials);
    double* factors = reinterpret_cast<double*>(base + layout.factors);
    double* deviation = deviations != nullptr ? deviations + g : nullptr;
    EnergyLaunch energy{};
    energy.p = p;
    energy.channels = channels;
    energy.partials = partials;
    energy.deviation = deviation;
    FinishLaunch finish{};
    finish.p = p;
    finish.c = c;
    finish.channels = channels;
    finish.partials = partials;
    finish.factors = factors;
    const bool last_group = g + 1 == group_count;
    finish.coefficients = last_group && coefficients != nullptr ? coefficients
                                                                : reinterpret_cast<double*>(base + layout.coefficients);
    finish.deviation = deviation;
    cudaError_t status = launch_energy(plan_energy(group, group_sizes[g], machine), energy, finish, stream);
    if (status != cudaSuccess) return status;
    status = launch_rescale(group, group_sizes[g], channels, factors, stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace equinorm
