// ENorm's fused rescaling on the GPU (formulas: csrc/shared/enorm_math.h; program format:
// csrc/enorm_plan.h). Groups are balanced one after the other, each from the tensors as the
// previous groups left them, as the CPU op does.
//
// Launches: one memset of the groups' counters per op call, then two kernels per group:
//   energy    a power-of-two group of lanes owns one channel of one counted entry (lanes take
//             neighbouring values of the channel, or neighbouring channels take neighbouring
//             lanes when the channels are adjacent in memory, so loads coalesce in both layouts)
//             and adds |v|^p over a slice of the channel's values; the butterfly total is stored
//             per (entry, slice, channel). The last block of the group (integer ticket) adds each
//             channel's row and column energies in entry and slice order, computes d, the factors
//             d^power and max |d - 1|.
//   rescale   every entry of the group, each value multiplied by its channel's factor, in
//             storage order (coalesced). Entries naming the same tensor go to separate launches.
// No float atomics: every sum runs in an order fixed by the shapes, so d is bit-identical across
// runs. Energies are added, and values rescaled, in double (em::energy_math_t) for every dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda/device_common.cuh"
#include "shared/enorm_math.h"

namespace equinorm {
namespace cuda {
namespace {

namespace em = equinorm::math;

constexpr int kThreads = 256;
// Entries one launch takes (kernel parameters); longer lists are split over several launches.
constexpr int kMaxLaunchEntries = 16;
// Powers a factor is kept for: -2, -1, 1, 2 (power 0 leaves a tensor unchanged).
constexpr int kPowers = 4;
// Blocks an energy launch aims at, values a slice holds at least, partials the finishing block
// adds at most: slices split long channels when there are few, within the finishing budget.
constexpr int64_t kTargetEnergyBlocks = 256;
constexpr int64_t kMinSliceValues = 2048;
constexpr int64_t kFinishBudget = 16 * 1024;
// Values one rescale block covers (whole outer rows).
constexpr int64_t kRescaleBlockValues = 4096;
constexpr int kUnroll = 4;

__host__ __device__ inline int power_slot(int power) { return power < 0 ? power + 2 : power + 1; }

// An entry as the energy kernel reads it: channel j's values are (o, t) for o < outer_count,
// t < inner, at data + base(j) + o * outer_stride + t * inner_stride.
struct EnergyView {
  const void* data;
  ElementType type;
  bool columns;
  int64_t channels;            // of the group
  int64_t channels_per_group;  // columns: per conv group
  int64_t outer_count;         // outer indices a channel reads (rows: 1)
  int64_t outer_stride, channel_stride, inner, inner_stride;
  int64_t values;              // outer_count * inner
  int64_t slice_values;        // values per slice
  int lanes;                   // per channel, a power of two <= 32
  int64_t slices;
  int64_t first_block;         // of this entry in the launch
  int64_t partial_row;         // first row of its slices in the (slots, channels) partials
};

struct EnergyLaunch {
  EnergyView views[kMaxLaunchEntries];
  int count;
  double p, c;
  int64_t channels;
  double* partials;             // (partial rows, channels)
  int64_t row_partial_rows;     // partial rows [0, this) are row energies, the rest column energies
  int64_t partial_rows;
  unsigned int* counter;
  unsigned int group_blocks;    // blocks of every energy launch of the group
  double* coefficients;         // (channels,)
  double* factors;              // (kPowers, channels)
  double* deviation;            // (1,) or null
};

struct RescaleView {
  void* data;
  ElementType type;
  bool columns;
  int power;
  int64_t outer, outer_stride, outer_per_group, channels_per_group;
  int64_t channel_divisor, channel_modulus;  // columns: i = (r / divisor) % modulus, r the offset in the row
  int64_t rows_per_block;
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
__device__ double channel_energy(const EnergyView& v, int64_t base, int64_t begin, int64_t end, int lane,
                                 double p) {
  using acc_t = em::energy_math_t;
  const scalar_t* data = static_cast<const scalar_t*>(v.data) + base;
  const acc_t exponent = static_cast<acc_t>(p);
  acc_t sums[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) sums[u] = 0;
  // A channel's values are fewer than 2^31 (checked on the host): 32-bit index arithmetic.
  const unsigned inner = static_cast<unsigned>(v.inner), lanes = static_cast<unsigned>(v.lanes);
  const unsigned last = static_cast<unsigned>(end);
  auto offset = [&](unsigned index) {
    const unsigned o = index / inner;
    return static_cast<int64_t>(o) * v.outer_stride + static_cast<int64_t>(index - o * inner) * v.inner_stride;
  };
  unsigned k = static_cast<unsigned>(begin) + lane;
  for (; k + (kUnroll - 1) * lanes < last; k += kUnroll * lanes) {
    acc_t values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) values[u] = static_cast<acc_t>(load_acc(data + offset(k + u * lanes)));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sums[u] += em::energy_term(values[u], exponent);
  }
  for (; k < last; k += lanes) sums[0] += em::energy_term(static_cast<acc_t>(load_acc(data + offset(k))), exponent);
  acc_t total = sums[0];
#pragma unroll
  for (int u = 1; u < kUnroll; ++u) total += sums[u];
  return static_cast<double>(total);
}

__device__ double dispatch_channel_energy(const EnergyView& v, int64_t base, int64_t begin, int64_t end, int lane,
                                          double p) {
  switch (v.type) {
    case ElementType::kHalf:
      return channel_energy<__half>(v, base, begin, end, lane, p);
    case ElementType::kBFloat16:
      return channel_energy<__nv_bfloat16>(v, base, begin, end, lane, p);
    case ElementType::kFloat:
      return channel_energy<float>(v, base, begin, end, lane, p);
    case ElementType::kDouble:
      return channel_energy<double>(v, base, begin, end, lane, p);
  }
  return 0;
}

// Sum of partials[row * channels] over rows [first, last), split over `lanes` lanes, fixed order.
__device__ double sum_partial_rows(const double* partials, int64_t channels, int64_t first, int64_t last, int lane,
                                   int lanes) {
  double sum = 0;
  for (int64_t row = first + lane; row < last; row += lanes) sum += __ldcg(partials + row * channels);
  return group_sum(sum, lanes);
}

// The last energy block of a group: d, the factors and max |d - 1| from every partial.
__device__ void finish_coefficients(const EnergyLaunch& a) {
  int lanes = kWarpSize;
  while (lanes > 1 && (lanes * a.channels > kThreads || lanes / 2 >= a.partial_rows)) lanes /= 2;
  const int groups = kThreads / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  double deviation = 0;
  for (int64_t first = 0; first < a.channels; first += groups) {  // the same trip count in every thread
    const int64_t j = first + group;
    const bool active = j < a.channels;
    const double* column = a.partials + (active ? j : 0);
    const double rows = sum_partial_rows(column, a.channels, 0, active ? a.row_partial_rows : 0, lane, lanes);
    const double cols =
        sum_partial_rows(column, a.channels, a.row_partial_rows, active ? a.partial_rows : 0, lane, lanes);
    if (active && lane == 0) {
      const double d = em::enorm_coefficient(rows, cols, a.p, a.c);
      a.coefficients[j] = d;
      for (int power = -2; power <= 2; ++power) {
        if (power != 0) a.factors[power_slot(power) * a.channels + j] = em::coefficient_power(d, power);
      }
      deviation = fmax(deviation, fabs(d - 1));
    }
  }
  if (a.deviation == nullptr) return;
  __shared__ double warp_max[kThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    deviation = fmax(deviation, __shfl_xor_sync(kFullWarpMask, deviation, offset));
  }
  if (threadIdx.x % kWarpSize == 0) warp_max[threadIdx.x / kWarpSize] = deviation;
  __syncthreads();
  if (threadIdx.x == 0) {
    double largest = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) largest = fmax(largest, warp_max[w]);
    *a.deviation = largest;
  }
}

__global__ void __launch_bounds__(kThreads) enorm_energy_kernel(const __grid_constant__ EnergyLaunch a) {
  const EnergyView& v = a.views[entry_of_block(a.views, a.count)];
  const int64_t block = blockIdx.x - v.first_block;
  const int64_t channel_block = block / v.slices, slice = block - channel_block * v.slices;
  const int lane = threadIdx.x % v.lanes;
  const int64_t j = channel_block * (kThreads / v.lanes) + threadIdx.x / v.lanes;
  // Every lane runs the loop and the butterfly, so the whole warp reaches the shuffles.
  const bool active = j < v.channels;
  int64_t base = 0;
  if (active) {
    if (v.columns) {
      const int64_t group = j / v.channels_per_group;
      base = group * v.outer_count * v.outer_stride + (j - group * v.channels_per_group) * v.channel_stride;
    } else {
      base = j * v.outer_stride;
    }
  }
  const int64_t begin = active ? slice * v.slice_values : 0;
  const int64_t end = active ? min(v.values, begin + v.slice_values) : 0;
  const double energy = group_sum(dispatch_channel_energy(v, base, begin, end, lane, a.p), v.lanes);
  if (active && lane == 0) a.partials[(v.partial_row + slice) * a.channels + j] = energy;

  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(a.counter, 1u) == a.group_blocks - 1;
    __threadfence();
  }
  __syncthreads();
  if (last) finish_coefficients(a);
}

template <typename scalar_t>
__device__ void rescale_rows(const RescaleView& v, const double* factors, int64_t channels) {
  using acc_t = acc_type<scalar_t>;
  using math_t = em::energy_math_t;
  const int64_t first_row = (blockIdx.x - v.first_block) * v.rows_per_block;
  const int64_t rows = min(v.rows_per_block, v.outer - first_row);
  // A block covers fewer than 2^31 values (checked on the host): 32-bit index arithmetic.
  const unsigned count = static_cast<unsigned>(rows * v.outer_stride);
  const unsigned row_size = static_cast<unsigned>(v.outer_stride);
  const unsigned divisor = static_cast<unsigned>(v.channel_divisor), modulus = static_cast<unsigned>(v.channel_modulus);
  scalar_t* data = static_cast<scalar_t*>(v.data) + first_row * v.outer_stride;
  const double* factor = factors + power_slot(v.power) * channels;
  for (unsigned k = threadIdx.x; k < count; k += kThreads) {
    const unsigned row = k / row_size;
    const int64_t o = first_row + row;
    int64_t j = o;
    if (v.columns) j = (o / v.outer_per_group) * v.channels_per_group + ((k - row * row_size) / divisor) % modulus;
    data[k] = from_acc<scalar_t>(static_cast<acc_t>(static_cast<math_t>(to_acc(data[k])) * __ldg(factor + j)));
  }
}

__global__ void __launch_bounds__(kThreads) enorm_rescale_kernel(const __grid_constant__ RescaleLaunch a) {
  const RescaleView& v = a.views[entry_of_block(a.views, a.count)];
  switch (v.type) {
    case ElementType::kHalf:
      rescale_rows<__half>(v, a.factors, a.channels);
      break;
    case ElementType::kBFloat16:
      rescale_rows<__nv_bfloat16>(v, a.factors, a.channels);
      break;
    case ElementType::kFloat:
      rescale_rows<float>(v, a.factors, a.channels);
      break;
    case ElementType::kDouble:
      rescale_rows<double>(v, a.factors, a.channels);
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
  // Channels adjacent in memory: neighbouring lanes take neighbouring channels; otherwise they
  // take neighbouring values of one channel.
  int64_t lanes = std::min<int64_t>(kWarpSize, ceil_power_of_two(v.values));
  if (v.channel_stride == 1) lanes = std::min(lanes, floor_power_of_two(std::max<int64_t>(1, kThreads / v.channels)));
  v.lanes = static_cast<int>(lanes);
  return v;
}

// The counted entries of a group with their slices: rows first, then columns, each in entry order.
struct EnergyPlan {
  std::vector<EnergyView> views;
  int64_t row_partial_rows = 0;
  int64_t partial_rows = 0;
  int64_t blocks = 0;
};

EnergyPlan plan_energy(const EnormEntry* group, int64_t size) {
  EnergyPlan plan;
  for (const bool columns : {false, true}) {
    for (int64_t k = 0; k < size; ++k) {
      if (group[k].counted && group[k].columns == columns) plan.views.push_back(energy_view(group[k]));
    }
  }
  const int64_t channels = plan.views.empty() ? 1 : plan.views.front().channels;
  const int64_t slice_cap =
      std::max<int64_t>(1, kFinishBudget / (channels * std::max<int64_t>(1, static_cast<int64_t>(plan.views.size()))));
  for (EnergyView& v : plan.views) {
    const int64_t channel_blocks = ceil_div(v.channels, kThreads / v.lanes);
    v.slices = std::clamp<int64_t>(kTargetEnergyBlocks / channel_blocks, 1,
                                   std::min(slice_cap, std::max<int64_t>(1, v.values / kMinSliceValues)));
    v.slice_values = ceil_div(v.values, v.slices);
    v.slices = ceil_div(v.values, v.slice_values);
    v.partial_row = plan.partial_rows;
    plan.partial_rows += v.slices;
    if (!v.columns) plan.row_partial_rows = plan.partial_rows;
    v.first_block = plan.blocks;  // within the group; rebased per launch
    plan.blocks += channel_blocks * v.slices;
  }
  return plan;
}

RescaleView rescale_view(const EnormEntry& e) {
  RescaleView v{};
  v.data = e.data;
  v.type = e.type;
  v.columns = e.columns;
  v.power = e.power;
  v.outer = e.outer;
  v.outer_stride = e.outer_stride;
  v.outer_per_group = e.columns ? e.outer / e.groups : 1;
  v.channels_per_group = e.columns ? e.channels_per_group : 1;
  // (c, t) storage: a channel's values are a run of inner; (t, c): channels alternate.
  v.channel_divisor = e.columns && e.inner_stride == 1 ? e.channel_stride : 1;
  v.channel_modulus = e.columns && e.inner_stride == 1 ? e.channels_per_group : e.inner_stride;
  if (!e.columns) v.channel_modulus = 1;
  v.rows_per_block = std::max<int64_t>(1, kRescaleBlockValues / e.outer_stride);
  return v;
}

bool valid_entry(const EnormEntry& e) {
  if (e.data == nullptr || e.outer < 1 || e.inner < 1 || e.outer_stride < 1 || e.power < -2 || e.power > 2) return false;
  // The kernels index a channel's values and a rescale block's values in 32 bits.
  const int64_t channel_values = e.columns ? (e.groups >= 1 ? e.outer / e.groups : 0) * e.inner : e.inner;
  if (channel_values > INT_MAX || std::max(kRescaleBlockValues, e.outer_stride) > INT_MAX) return false;
  if (!e.columns) return true;
  return e.groups >= 1 && e.outer % e.groups == 0 && e.channels_per_group >= 1 && e.channel_stride >= 1 &&
         e.inner_stride >= 1 && (e.inner_stride == 1 || e.channel_stride == 1);
}

struct WorkspaceLayout {
  size_t counters = 0, partials = 0, factors = 0, coefficients = 0, total = 0;
};

WorkspaceLayout workspace_layout(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count) {
  int64_t most_channels = 1, most_partials = 1;
  for (int64_t g = 0, first = 0; g < group_count; first += group_sizes[g], ++g) {
    const EnergyPlan plan = plan_energy(entries + first, group_sizes[g]);
    const int64_t channels = entry_channels(entries[first]);
    most_channels = std::max(most_channels, channels);
    most_partials = std::max(most_partials, plan.partial_rows * channels);
  }
  auto aligned = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  WorkspaceLayout layout;
  layout.counters = 0;
  layout.partials = aligned(static_cast<size_t>(group_count) * sizeof(unsigned int));
  layout.factors = layout.partials + aligned(static_cast<size_t>(most_partials) * sizeof(double));
  layout.coefficients = layout.factors + aligned(static_cast<size_t>(kPowers * most_channels) * sizeof(double));
  layout.total = layout.coefficients + aligned(static_cast<size_t>(most_channels) * sizeof(double));
  return layout;
}

cudaError_t launch_energy(const EnergyPlan& plan, EnergyLaunch args, cudaStream_t stream) {
  args.row_partial_rows = plan.row_partial_rows;
  args.partial_rows = plan.partial_rows;
  args.group_blocks = static_cast<unsigned int>(plan.blocks);
  for (size_t first = 0; first < plan.views.size(); first += kMaxLaunchEntries) {
    const size_t count = std::min<size_t>(kMaxLaunchEntries, plan.views.size() - first);
    const int64_t block_offset = plan.views[first].first_block;
    const int64_t end_block = first + count < plan.views.size() ? plan.views[first + count].first_block : plan.blocks;
    args.count = static_cast<int>(count);
    for (size_t k = 0; k < count; ++k) {
      args.views[k] = plan.views[first + k];
      args.views[k].first_block -= block_offset;
    }
    const int64_t blocks = end_block - block_offset;
    if (!fits_grid(blocks)) return cudaErrorInvalidConfiguration;
    EQUINORM_LAUNCH(static_cast<unsigned int>(blocks), kThreads, 0, stream, enorm_energy_kernel)(args);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
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
    blocks += ceil_div(v.outer, v.rows_per_block);
    args.views[args.count++] = v;
  }
  return flush();
}

}  // namespace

size_t enorm_workspace_bytes(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count) {
  if (entries == nullptr || group_sizes == nullptr || group_count < 1) return 0;
  for (int64_t g = 0; g < group_count; ++g) {
    if (group_sizes[g] < 1) return 0;
  }
  return workspace_layout(entries, group_sizes, group_count).total;
}

cudaError_t launch_enorm(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count, double p,
                         double c, double* coefficients, double* deviations, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
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
  const WorkspaceLayout layout = workspace_layout(entries, group_sizes, group_count);
  if (workspace_bytes < layout.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  unsigned int* counters = reinterpret_cast<unsigned int*>(base + layout.counters);
  cudaError_t status = cudaMemsetAsync(counters, 0, static_cast<size_t>(group_count) * sizeof(unsigned int), stream);
  if (status != cudaSuccess) return status;

  for (int64_t g = 0, first = 0; g < group_count; first += group_sizes[g], ++g) {
    const EnormEntry* group = entries + first;
    const int64_t channels = entry_channels(group[0]);
    EnergyLaunch args{};
    args.p = p;
    args.c = c;
    args.channels = channels;
    args.partials = reinterpret_cast<double*>(base + layout.partials);
    args.counter = counters + g;
    args.factors = reinterpret_cast<double*>(base + layout.factors);
    const bool last_group = g + 1 == group_count;
    args.coefficients = last_group && coefficients != nullptr ? coefficients
                                                              : reinterpret_cast<double*>(base + layout.coefficients);
    args.deviation = deviations != nullptr ? deviations + g : nullptr;
    status = launch_energy(plan_energy(group, group_sizes[g]), args, stream);
    if (status != cudaSuccess) return status;
    status = launch_rescale(group, group_sizes[g], channels, args.factors, stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace equinorm
