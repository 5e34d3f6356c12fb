// EquiNorm's weight transform and its backward on the GPU (formulas: csrc/shared/equinorm_math.h).
//
// Launches per op:
//   equinorm_weight     1 kernel, or 3 when the plan splits each row over several blocks (few
//                       output channels): each slice's first sums, each slice's part of the
//                       exact P_d, the output; every block adds its row's slice partials itself
//                       in slice order (a deterministic two-stage reduction, no float atomics).
//   equinorm_forward    the channel means (channel_mean.cu; plus its finish when a channel is
//                       split over several blocks), then this transform. Every output channel
//                       needs every mean of its group, a grid-wide dependency, so the transform
//                       starts at a kernel boundary.
//   equinorm_backward   3 kernels: each row's (or row slice's) sums, split as the forward's; then
//                       grad_weight and grad_gain by blocks that own a slot of a group's rows and
//                       a tile of columns, each adding its columns' grad_mean terms u h over its
//                       rows into one partial row (groups x slots x row_size float64, at most
//                       half the weight's bytes where a group has enough rows: no D x C
//                       scratch); then each value of grad_mean adds its slots' partials (and for
//                       channel means its taps) in a fixed order.
// A plan's split (slices, slots, tiles) fixes the order of every sum, so results are
// bit-identical across runs; plans for different machines round differently.
//
// One team of threads owns one output channel (a row of C/groups x K values): a warp for short
// rows (eight rows per block), the whole block otherwise. Every sum of the forward and of the
// backward's first pass is a sum over the row's values, whatever their channel, so the team
// reads the row as one contiguous run in either layout ((c, t), or (t, c) channels_last): a
// scalar head up to the first vector-aligned element, vectors of kVec elements (16 bytes) on the
// body, a scalar tail; a cursor steps each value's (channel, tap) for its mean. The sums are
// added over the team in a fixed tree. A row is read from global memory once; its second and
// third passes hit the cache. The backward's grad_weight kernel reads each row again, as aligned
// vectors of columns that stay with a thread from row to row, so that the thread adds its
// columns' grad_mean terms over its rows in registers.
//
// Determinism: every sum runs in an order fixed by the shape (per-thread loops, butterflies,
// warp totals added in warp order); no float atomics anywhere, so results are bit-identical
// across runs. The math, the stats and the grad_mean terms are in double for every weight dtype
// (em::weight_math_t); mean and gain are read, and grad_gain written, in the accumulation type.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "shared/equinorm_math.h"

namespace equinorm {
namespace cuda {
namespace {

namespace em = equinorm::math;

// A result of the weight math in the weight's dtype, through the accumulation type as on the CPU.
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_weight_math(em::weight_math_t value) {
  return from_acc<scalar_t>(static_cast<acc_type<scalar_t>>(value));
}

// Plans (teams, slices, the grad_weight tiles and slots, the grad_mean finish): plan_equinorm_weight
// in cuda/launch_plans.h.
constexpr int kThreads = kEquiNormThreads;
// Values a team adds at once at most (the forward's first pass).
constexpr int kMaxTeamSums = 6;
constexpr int kReduceThreads = kReduceColumns * kReduceSlices;
constexpr int kReduceUnroll = 4;

// A weight row seen by the kernels: row d is the run of row_size values at d * row_size, stored
// (c, t) or, channels_last, (t, c).
struct RowGeometry {
  int64_t out_channels;
  int64_t group_channels;
  int64_t taps;
  int64_t outputs_per_group;
  bool channels_last;     // a row stored (t, c); else (c, t)
  bool per_tap_means;     // mean holds (C/groups, K) values per group, stored (c, t); else (C/groups,)
  __host__ __device__ int64_t mean_values_per_group() const { return per_tap_means ? group_channels * taps : group_channels; }
  __host__ __device__ int64_t row_size() const { return group_channels * taps; }
};

// The (channel, tap) of a row's values in memory order, stepped one value at a time so that a
// vector of values costs one division: the fast index is the tap ((c, t)) or the channel ((t, c)).
struct MeanCursor {
  int64_t slow, fast, fast_extent;
  __device__ MeanCursor(const RowGeometry& g, int64_t i) : fast_extent(g.channels_last ? g.group_channels : g.taps) {
    slow = i / fast_extent;
    fast = i - slow * fast_extent;
  }
  __device__ int64_t channel(const RowGeometry& g) const { return g.channels_last ? fast : slow; }
  __device__ int64_t tap(const RowGeometry& g) const { return g.channels_last ? slow : fast; }
  // The index in the group's means of the value the cursor is at.
  __device__ int64_t mean_index(const RowGeometry& g) const {
    return g.per_tap_means ? channel(g) * g.taps + tap(g) : channel(g);
  }
  __device__ void next() {
    if (++fast == fast_extent) {
      fast = 0;
      ++slow;
    }
  }
};

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = em::weight_math_t;
  using operand_t = acc_type<scalar_t>;
  RowGeometry geometry;
  const scalar_t* weight;
  const operand_t* mean;
  const operand_t* gain;
  scalar_t* out;
  acc_t* stats;
  acc_t ratio;
  acc_t eps;
  bool exact;
  // rows split over several blocks: (D, slices, kSlicePartials), each slice's first sums and its
  // part of the exact P_d
  int64_t slices;
  int64_t slice_values;
  acc_t* partials;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = em::weight_math_t;
  using operand_t = acc_type<scalar_t>;
  RowGeometry geometry;
  const scalar_t* grad;
  const scalar_t* weight;
  const operand_t* mean;
  const operand_t* gain;
  const acc_t* stats;
  scalar_t* grad_weight;
  operand_t* grad_gain;
  // the rows' sums, (D, slices, kGradSums): rows split as the forward's
  int64_t slices;
  int64_t slice_values;
  acc_t* row_partials;
  // grad_weight: block (group, slot, tile) owns rows_per_slot rows of a group and a tile of
  // column_threads x kCVec columns; its column sums of the grad_mean terms go to column_partials
  // (groups, slots, row_size)
  int64_t slots;
  int64_t rows_per_slot;
  int64_t column_threads;
  int64_t column_tiles;
  acc_t* column_partials;
};

// kTeam threads (a warp or the whole block) working on one row.
template <int kTeam>
struct Team {
  static_assert(kTeam == kWarpSize || kTeam == kThreads, "a team is a warp or the block");
  static constexpr int kRowsPerBlock = kThreads / kTeam;
  static constexpr int kWarps = kTeam / kWarpSize;

  __device__ static int lane() { return static_cast<int>(threadIdx.x) % kTeam; }
  __device__ static int64_t row() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + static_cast<int>(threadIdx.x) / kTeam;
  }

  // Sums each value over the team; every thread of the team gets the same bits. Warp totals are
  // added in warp order. scratch: N * kWarps shared values (unused by warp teams).
  template <int N, typename acc_t>
  __device__ static void sum(acc_t (&values)[N], acc_t* scratch) {
#pragma unroll
    for (int i = 0; i < N; ++i) values[i] = group_sum(values[i], kWarpSize);
    if constexpr (kWarps > 1) {
      const int warp = threadIdx.x / kWarpSize;
      __syncthreads();  // the previous call's readers are done with scratch
      if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) scratch[i * kWarps + warp] = values[i];
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < N; ++i) {
        acc_t total = 0;
        for (int w = 0; w < kWarps; ++w) total += scratch[i * kWarps + w];
        values[i] = total;
      }
    }
  }
};

template <int kVec, typename scalar_t>
__device__ __forceinline__ void store_vector(scalar_t* target, const scalar_t (&values)[kVec]) {
  using Word = typename LoadWord<sizeof(scalar_t) * kVec>::type;
  Word word;
  memcpy(&word, values, sizeof(Word));
  *reinterpret_cast<Word*>(target) = word;
}

// Walks the values [begin, end) of a row, this thread one of `lanes` (its place: `lane`): vectors
// of kVec elements on the body (from the first element aligned to kVec elements of rows[0]), the
// scalar head and tail after them. For each value calls visit(mean_index, values) with the
// value of each of the N rows in the weight-math type; with kStores, stores what visit returns
// to `out` at the same place. Every row (and `out`) must have rows[0]'s alignment modulo kVec
// elements (the launchers choose kVec so).
template <int kVec, bool kStores, int N, typename scalar_t, typename Visit>
__device__ __forceinline__ void walk_row(const RowGeometry& g, const scalar_t* const (&rows)[N],
                                         typename TypeTag<scalar_t>::type* out,
                                         int64_t begin, int64_t end, int lane, int lanes, Visit&& visit) {
  using acc_t = em::weight_math_t;
  const uint64_t phase = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(rows[0] + begin) / sizeof(scalar_t));
  const int64_t head = std::min<int64_t>(end - begin, static_cast<int64_t>((0 - phase) & (kVec - 1)));
  const int64_t body = begin + head, vectors = (end - body) / kVec, tail = body + vectors * kVec;
  for (int64_t v = lane; v < vectors; v += lanes) {
    const int64_t i = body + v * kVec;
    scalar_t loaded[N][kVec];
#pragma unroll
    for (int n = 0; n < N; ++n) load_vector<kVec>(rows[n] + i, loaded[n]);
    MeanCursor cursor(g, i);
    scalar_t results[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc_t values[N];
#pragma unroll
      for (int n = 0; n < N; ++n) values[n] = to_acc(loaded[n][k]);
      const acc_t result = visit(cursor.mean_index(g), values);
      if constexpr (kStores) results[k] = from_weight_math<scalar_t>(result);
      cursor.next();
    }
    if constexpr (kStores) store_vector<kVec>(out + i, results);
  }
  const int64_t scalars = head + (end - tail);
  for (int64_t e = lane; e < scalars; e += lanes) {
    const int64_t i = e < head ? begin + e : tail + (e - head);
    acc_t values[N];
#pragma unroll
    for (int n = 0; n < N; ++n) values[n] = load_acc(rows[n] + i);
    const acc_t result = visit(MeanCursor(g, i).mean_index(g), values);
    if constexpr (kStores) out[i] = from_weight_math<scalar_t>(result);
  }
}

// The forward's first sums over the values of a row (or of a slice of it), each lane adding its
// own: V_d = sum mu_ct, sum mu_ct w, sum mu_ct [w > 0] w, sum mu_ct [w > 0], and how many seen
// values (mu_ct > 0) have a positive weight / a non-positive weight.
enum FirstSum { kMass, kKernel, kPositive, kCount, kSeesPositive, kSeesNonPositive, kFirstSums };
static_assert(kFirstSums <= kMaxTeamSums, "a team adds the first sums at once");
// A slice's partials: its first sums, then its part of the exact P_d.
constexpr int kSlicePartials = kFirstSums + 1;
static_assert(kSlicePartials == kEquiNormSlicePartials, "the plan sizes the slice partials");

__device__ __forceinline__ void add_first_sums(em::weight_math_t (&sums)[kFirstSums], em::weight_math_t m,
                                               em::weight_math_t w) {
  using acc_t = em::weight_math_t;
  sums[kMass] += m;
  sums[kKernel] += m * w;
  if (w > acc_t(0)) {
    sums[kPositive] += m * w;
    sums[kCount] += m;
  }
  if (m > acc_t(0)) sums[w > acc_t(0) ? kSeesPositive : kSeesNonPositive] += acc_t(1);
}

// What a row's first sums decide: V_d, b_d, and whether P_d is the exact one.
struct RowShift {
  em::weight_math_t value_mass, shift;
  bool use_exact;
};

__device__ __forceinline__ RowShift row_shift(const em::weight_math_t (&sums)[kFirstSums], bool exact) {
  using acc_t = em::weight_math_t;
  RowShift r;
  r.value_mass = em::value_mass(sums[kMass]);
  r.shift = em::shift(sums[kKernel], r.value_mass);
  r.use_exact =
      exact || em::needs_exact_positive_mass(sums[kSeesPositive] > acc_t(0), sums[kSeesNonPositive] > acc_t(0));
  return r;
}

template <typename scalar_t>
__device__ __forceinline__ em::weight_math_t row_scale(const ForwardArgs<scalar_t>& a,
                                                       const em::weight_math_t (&sums)[kFirstSums],
                                                       em::weight_math_t positive_mass) {
  return em::scale(positive_mass, em::absolute_mass(sums[kPositive], sums[kKernel]), a.ratio, a.eps);
}

// The part of the exact P_d = sum mu_ct max(u, 0) of one value.
__device__ __forceinline__ em::weight_math_t exact_positive_part(em::weight_math_t m, em::weight_math_t w,
                                                                 em::weight_math_t shift) {
  const em::weight_math_t u = w + shift;
  return u > em::weight_math_t(0) ? m * u : em::weight_math_t(0);
}

template <typename scalar_t, int kTeam, int kVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) equinorm_weight_kernel(ForwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  using operand_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kMaxTeamSums * Team<kTeam>::kWarps];
  const RowGeometry& g = a.geometry;
  const int64_t d = Team<kTeam>::row();
  if (d >= g.out_channels) return;  // only a warp team of the last block; warp teams use no block barrier
  const int64_t row_size = g.row_size();
  const int lane = Team<kTeam>::lane();
  const scalar_t* const row[1] = {a.weight + d * row_size};
  const operand_t* mu = a.mean + (d / g.outputs_per_group) * g.mean_values_per_group();

  acc_t sums[kFirstSums] = {};
  walk_row<kVec, false>(g, row, nullptr, 0, row_size, lane, kTeam, [&](int64_t m_index, const acc_t (&v)[1]) {
    add_first_sums(sums, mu[m_index], v[0]);
    return acc_t(0);
  });
  Team<kTeam>::sum(sums, scratch);

  // The same bits in the whole team, so the branch is uniform.
  const RowShift r = row_shift(sums, a.exact);
  const acc_t shift = r.shift;
  acc_t positive_mass;
  if (r.use_exact) {
    acc_t exact[1] = {};
    walk_row<kVec, false>(g, row, nullptr, 0, row_size, lane, kTeam, [&](int64_t m_index, const acc_t (&v)[1]) {
      exact[0] += exact_positive_part(mu[m_index], v[0], shift);
      return acc_t(0);
    });
    Team<kTeam>::sum(exact, scratch);
    positive_mass = exact[0];
  } else {
    positive_mass = em::one_pass_positive_mass(sums[kPositive], shift, sums[kCount]);
  }
  const acc_t scale = row_scale(a, sums, positive_mass);
  const acc_t factor = a.gain[d] * scale;

  walk_row<kVec, true>(g, row, a.out + d * row_size, 0, row_size, lane, kTeam,
                       [&](int64_t, const acc_t (&v)[1]) { return factor * (v[0] + shift); });
  if (lane == 0) {
    em::write_stats(a.stats + d * em::kStatsColumns, shift, scale, positive_mass, r.value_mass, r.use_exact);
  }
}

// ---- the forward of rows split over several blocks: block b owns slice b % slices of row b / slices ----
// Three kernels: each slice's first sums; each slice's part of the exact P_d (rows that use it);
// the output. Each block adds its row's slice partials itself, in slice order, so every block of
// a row gets the same bits without a kernel of its own for that.

struct RowSlice {
  int64_t row, slice, begin, end;
};

template <typename scalar_t>
__device__ __forceinline__ RowSlice block_slice(const ForwardArgs<scalar_t>& a) {
  RowSlice r;
  r.row = static_cast<int64_t>(blockIdx.x) / a.slices;
  r.slice = static_cast<int64_t>(blockIdx.x) - r.row * a.slices;
  r.begin = r.slice * a.slice_values;
  r.end = std::min(a.geometry.row_size(), r.begin + a.slice_values);
  return r;
}

// sums[k] = partial first + k of the row's slices, added in slice order.
template <int N>
__device__ __forceinline__ void add_slices(const em::weight_math_t* partials, int64_t row, int64_t slices, int first,
                                           em::weight_math_t (&sums)[N]) {
  const em::weight_math_t* source = partials + row * slices * kSlicePartials + first;
  for (int64_t s = 0; s < slices; ++s) {
#pragma unroll
    for (int k = 0; k < N; ++k) sums[k] += source[s * kSlicePartials + k];
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) slice_sums_kernel(ForwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  __shared__ acc_t scratch[kFirstSums * Team<kThreads>::kWarps];
  const RowGeometry& g = a.geometry;
  const RowSlice slice = block_slice(a);
  const scalar_t* const row[1] = {a.weight + slice.row * g.row_size()};
  const acc_type<scalar_t>* mu = a.mean + (slice.row / g.outputs_per_group) * g.mean_values_per_group();
  acc_t sums[kFirstSums] = {};
  walk_row<kVec, false>(g, row, nullptr, slice.begin, slice.end, threadIdx.x, kThreads,
                        [&](int64_t m_index, const acc_t (&v)[1]) {
                          add_first_sums(sums, mu[m_index], v[0]);
                          return acc_t(0);
                        });
  Team<kThreads>::sum(sums, scratch);
  if (threadIdx.x == 0) {
    acc_t* target = a.partials + blockIdx.x * static_cast<int64_t>(kSlicePartials);
    for (int k = 0; k < kFirstSums; ++k) target[k] = sums[k];
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) slice_exact_kernel(ForwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  __shared__ acc_t scratch[Team<kThreads>::kWarps];
  const RowGeometry& g = a.geometry;
  const RowSlice slice = block_slice(a);
  acc_t sums[kFirstSums] = {};
  add_slices(a.partials, slice.row, a.slices, 0, sums);
  const RowShift r = row_shift(sums, a.exact);
  if (!r.use_exact) return;  // the whole block: one row
  const scalar_t* const row[1] = {a.weight + slice.row * g.row_size()};
  const acc_type<scalar_t>* mu = a.mean + (slice.row / g.outputs_per_group) * g.mean_values_per_group();
  acc_t exact[1] = {};
  walk_row<kVec, false>(g, row, nullptr, slice.begin, slice.end, threadIdx.x, kThreads,
                        [&](int64_t m_index, const acc_t (&v)[1]) {
                          exact[0] += exact_positive_part(mu[m_index], v[0], r.shift);
                          return acc_t(0);
                        });
  Team<kThreads>::sum(exact, scratch);
  if (threadIdx.x == 0) a.partials[blockIdx.x * static_cast<int64_t>(kSlicePartials) + kFirstSums] = exact[0];
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) slice_output_kernel(ForwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  const RowGeometry& g = a.geometry;
  const RowSlice slice = block_slice(a);
  acc_t sums[kFirstSums] = {};
  add_slices(a.partials, slice.row, a.slices, 0, sums);
  const RowShift r = row_shift(sums, a.exact);
  acc_t positive_mass;
  if (r.use_exact) {
    acc_t exact[1] = {};
    add_slices(a.partials, slice.row, a.slices, kFirstSums, exact);
    positive_mass = exact[0];
  } else {
    positive_mass = em::one_pass_positive_mass(sums[kPositive], r.shift, sums[kCount]);
  }
  const acc_t scale = row_scale(a, sums, positive_mass);
  const acc_t factor = a.gain[slice.row] * scale;
  const scalar_t* const row[1] = {a.weight + slice.row * g.row_size()};
  walk_row<kVec, true>(g, row, a.out + slice.row * g.row_size(), slice.begin, slice.end, threadIdx.x, kThreads,
                       [&](int64_t, const acc_t (&v)[1]) { return factor * (v[0] + r.shift); });
  if (slice.slice == 0 && threadIdx.x == 0) {
    em::write_stats(a.stats + slice.row * em::kStatsColumns, r.shift, scale, positive_mass, r.value_mass, r.use_exact);
  }
}

// ---- backward ----

// The backward's row sums: sum_ct G u, sum_ct G, sum_ct mu_ct [active].
enum GradSum { kGradTimesShifted, kGradSum, kActiveCount, kGradSums };
static_assert(kGradSums == kEquiNormGradSums, "the plan sizes the row partials");

// Which values count as positive: u > 0 for the exact P_d, w > 0 for the one-pass estimate.
__device__ __forceinline__ bool is_active(bool exact, em::weight_math_t w, em::weight_math_t shift) {
  return exact ? w + shift > em::weight_math_t(0) : w > em::weight_math_t(0);
}

// Each team adds its row's (or its slice's) sums; block b holds the teams of row block b / slices,
// each on slice b % slices of its row (several slices only for block teams).
template <typename scalar_t, int kTeam, int kVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) grad_sums_kernel(BackwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  __shared__ acc_t scratch[kGradSums * Team<kTeam>::kWarps];
  const RowGeometry& g = a.geometry;
  const int64_t row_block = static_cast<int64_t>(blockIdx.x) / a.slices;
  const int64_t slice = static_cast<int64_t>(blockIdx.x) - row_block * a.slices;
  const int64_t d = row_block * Team<kTeam>::kRowsPerBlock + static_cast<int>(threadIdx.x) / kTeam;
  if (d >= g.out_channels) return;  // only a warp team of the last block; warp teams use no block barrier
  const int64_t row_size = g.row_size();
  const int64_t begin = slice * a.slice_values, end = std::min(row_size, begin + a.slice_values);
  const scalar_t* const rows[2] = {a.weight + d * row_size, a.grad + d * row_size};
  const acc_type<scalar_t>* mu = a.mean + (d / g.outputs_per_group) * g.mean_values_per_group();
  const acc_t* stats = a.stats + d * em::kStatsColumns;
  const acc_t shift = stats[em::kShift];
  const bool exact = stats[em::kUsedExact] != acc_t(0);

  acc_t sums[kGradSums] = {};
  walk_row<kVec, false>(g, rows, nullptr, begin, end, Team<kTeam>::lane(), kTeam,
                        [&](int64_t m_index, const acc_t (&v)[2]) {
                          const acc_t w = v[0], gr = v[1];
                          sums[kGradTimesShifted] += gr * (w + shift);
                          sums[kGradSum] += gr;
                          if (is_active(exact, w, shift)) sums[kActiveCount] += mu[m_index];
                          return acc_t(0);
                        });
  Team<kTeam>::sum(sums, scratch);
  if (Team<kTeam>::lane() == 0) {
    acc_t* target = a.row_partials + (d * a.slices + slice) * kGradSums;
    for (int k = 0; k < kGradSums; ++k) target[k] = sums[k];
  }
}

// What every value of row d needs: b_d, the active rule, g_P, g_b / V_d, gain_d s_d, and dL/dgain_d.
struct GradRow {
  em::weight_math_t shift, grad_mass, shared_factor, gain_times_scale, grad_gain;
  bool exact;
};

// From the forward's stats and the row's sums, its slices added in slice order.
template <typename scalar_t>
__device__ __forceinline__ GradRow grad_row(const BackwardArgs<scalar_t>& a, int64_t d) {
  using acc_t = em::weight_math_t;
  const acc_t* stats = a.stats + d * em::kStatsColumns;
  acc_t sums[kGradSums] = {};
  const acc_t* partials = a.row_partials + d * a.slices * kGradSums;
  for (int64_t s = 0; s < a.slices; ++s) {
#pragma unroll
    for (int k = 0; k < kGradSums; ++k) sums[k] += partials[s * kGradSums + k];
  }
  GradRow r;
  r.shift = stats[em::kShift];
  r.exact = stats[em::kUsedExact] != acc_t(0);
  const acc_t scale = stats[em::kScale], gain = a.gain[d];
  r.grad_mass = em::grad_positive_mass(sums[kGradTimesShifted], gain, scale, stats[em::kPositiveMass]);
  const acc_t grad_shift = em::grad_shift(sums[kGradSum], gain, scale, r.grad_mass, sums[kActiveCount]);
  r.shared_factor = em::shared_mean_factor(grad_shift, stats[em::kValueMass]);
  r.gain_times_scale = gain * scale;
  r.grad_gain = scale * sums[kGradTimesShifted];
  return r;
}

// dL/dw of a slot of a group's rows on a tile of columns (kCVec adjacent columns a thread, aligned
// vectors: the row length is a multiple of kCVec), and the tile's column sums over the slot of
// the grad_mean terms u h (for channel means the finish adds a channel's taps). Row lanes take
// rows in turn, two rows' loads in flight at a time; their sums are added in row-lane order.
template <typename scalar_t, int kCVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) grad_weight_kernel(BackwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  __shared__ acc_t lane_terms[kThreads * kCVec];
  const RowGeometry& g = a.geometry;
  const int64_t row_size = g.row_size();
  const int64_t slot_index = static_cast<int64_t>(blockIdx.x) / a.column_tiles;  // group * slots + slot
  const int64_t tile = static_cast<int64_t>(blockIdx.x) - slot_index * a.column_tiles;
  const int64_t group = slot_index / a.slots, slot = slot_index - group * a.slots;
  const int column_threads = static_cast<int>(a.column_threads), row_lanes = kThreads / column_threads;
  const int column_lane = static_cast<int>(threadIdx.x) % column_threads;
  const int row_lane = static_cast<int>(threadIdx.x) / column_threads;
  const int64_t column = (tile * column_threads + column_lane) * kCVec;
  const bool has_columns = column < row_size;
  const int64_t group_first = group * g.outputs_per_group;
  const int64_t first = group_first + slot * a.rows_per_slot;
  const int64_t last = std::min(group_first + g.outputs_per_group, first + a.rows_per_slot);

  // The thread's columns read the same means in every row of the group.
  acc_t means[kCVec] = {};
  if (has_columns) {
    const acc_type<scalar_t>* mu = a.mean + group * g.mean_values_per_group();
    MeanCursor cursor(g, column);
#pragma unroll
    for (int k = 0; k < kCVec; ++k) {
      means[k] = mu[cursor.mean_index(g)];
      cursor.next();
    }
  }
  acc_t terms[kCVec] = {};
  struct RowValues {
    scalar_t w[kCVec], grad[kCVec];
  };
  auto start_row = [&](int64_t d, RowValues& v) {
    const GradRow r = grad_row(a, d);
    if (tile == 0 && column_lane == 0) a.grad_gain[d] = static_cast<acc_type<scalar_t>>(r.grad_gain);
    if (has_columns) {
      load_vector<kCVec>(a.weight + d * row_size + column, v.w);
      load_vector<kCVec>(a.grad + d * row_size + column, v.grad);
    }
    return r;
  };
  auto finish_row = [&](int64_t d, const GradRow& r, const RowValues& v) {
    if (!has_columns) return;
    scalar_t out[kCVec];
#pragma unroll
    for (int k = 0; k < kCVec; ++k) {
      const acc_t wk = to_acc(v.w[k]);
      const bool on = is_active(r.exact, wk, r.shift);
      const acc_t h = em::mean_factor(on, r.grad_mass, r.shared_factor);
      out[k] = from_weight_math<scalar_t>(em::grad_weight(acc_t(to_acc(v.grad[k])), r.gain_times_scale, means[k], h));
      const acc_t u = wk + r.shift;
      terms[k] += em::grad_mean_term(on ? u : acc_t(0), u, r.grad_mass, r.shared_factor);
    }
    store_vector<kCVec>(a.grad_weight + d * row_size + column, out);
  };
  // kGradRowsInFlight rows' loads before their arithmetic, the rows still finished in order.
  static_assert(kGradRowsInFlight == 2, "the loop below starts two rows at a time");
  int64_t d = first + row_lane;
  for (; d + row_lanes < last; d += 2 * row_lanes) {
    RowValues v0, v1;
    const GradRow r0 = start_row(d, v0);
    const GradRow r1 = start_row(d + row_lanes, v1);
    finish_row(d, r0, v0);
    finish_row(d + row_lanes, r1, v1);
  }
  if (d < last) {
    RowValues v;
    const GradRow r = start_row(d, v);
    finish_row(d, r, v);
  }
  if (row_lanes > 1) {  // the same in the whole block
#pragma unroll
    for (int k = 0; k < kCVec; ++k) lane_terms[threadIdx.x * kCVec + k] = terms[k];
    __syncthreads();
    if (row_lane == 0) {
#pragma unroll
      for (int k = 0; k < kCVec; ++k) {
        acc_t total = 0;
        for (int lane = 0; lane < row_lanes; ++lane) {
          total += lane_terms[(lane * column_threads + column_lane) * kCVec + k];
        }
        terms[k] = total;
      }
    }
  }
  if (row_lane == 0 && has_columns) {
    acc_t* target = a.column_partials + slot_index * row_size + column;
#pragma unroll
    for (int k = 0; k < kCVec; ++k) target[k] = terms[k];
  }
}

// grad_mean[v] = the sum over the slots of v's group of the column partials of v's values: the
// value itself for per-tap means, the channel's K taps for channel means. A block adds
// kReduceColumns values; slice s of a value adds its contributions (slot, tap) number s,
// s + kReduceSlices, ... in order, into kReduceUnroll interleaved accumulators; the slices are
// then added in slice order.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    sum_column_partials_kernel(const acc_t* __restrict__ partials, RowGeometry g, int64_t slots, int64_t values,
                               acc_t* __restrict__ grad_mean) {
  __shared__ acc_t slice_sums[kReduceSlices][kReduceColumns];
  const int column = threadIdx.x % kReduceColumns, slice = threadIdx.x / kReduceColumns;
  const int64_t value = static_cast<int64_t>(blockIdx.x) * kReduceColumns + column;
  acc_t sums[kReduceUnroll];
#pragma unroll
  for (int u = 0; u < kReduceUnroll; ++u) sums[u] = 0;
  if (value < values) {
    const int64_t per_group = g.mean_values_per_group();
    const int64_t group = value / per_group, local = value - group * per_group;
    const int64_t taps = g.per_tap_means ? 1 : g.taps;  // columns per value
    const int64_t channel = g.per_tap_means ? local / g.taps : local;
    const int64_t first_tap = g.per_tap_means ? local - channel * g.taps : 0;
    const int64_t contributions = slots * taps;
    const acc_t* source = partials + group * slots * g.row_size();
    for (int64_t first = slice; first < contributions; first += kReduceUnroll * kReduceSlices) {
      acc_t loaded[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int64_t k = first + u * kReduceSlices;
        loaded[u] = acc_t(0);
        if (k < contributions) {
          const int64_t s = k / taps, t = first_tap + (k - s * taps);
          const int64_t place = g.channels_last ? t * g.group_channels + channel : channel * g.taps + t;
          loaded[u] = __ldg(source + s * g.row_size() + place);
        }
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) sums[u] += loaded[u];
    }
  }
  acc_t total = sums[0];
#pragma unroll
  for (int u = 1; u < kReduceUnroll; ++u) total += sums[u];
  slice_sums[slice][column] = total;
  __syncthreads();
  if (slice == 0 && value < values) {
    acc_t sum = 0;
    for (int s = 0; s < kReduceSlices; ++s) sum += slice_sums[s][column];
    grad_mean[value] = sum;
  }
}

// ---- host side ----

bool valid_shape(const WeightShape& s) {
  return s.out_channels >= 1 && s.group_channels >= 1 && s.taps >= 1 && s.taps <= INT_MAX && s.groups >= 1 &&
         s.out_channels % s.groups == 0 && s.group_channels * s.taps >= 2;
}

// The bytes by which the rows a kernel reads or writes beside `weight` sit off weight's place
// modulo 16 (bits of every pointer's offset): vectors need them all aligned alike.
int64_t relative_misalignment(const void* weight, std::initializer_list<const void*> others) {
  uintptr_t bits = 0;
  for (const void* other : others) {
    bits |= (reinterpret_cast<uintptr_t>(other) - reinterpret_cast<uintptr_t>(weight)) % kMaxLoadBytes;
  }
  return static_cast<int64_t>(bits);
}

// The bytes by which the rows' bases sit past a 16-byte boundary (bits of every pointer's).
int64_t base_misalignment(std::initializer_list<const void*> pointers) {
  uintptr_t bits = 0;
  for (const void* pointer : pointers) bits |= reinterpret_cast<uintptr_t>(pointer) % kMaxLoadBytes;
  return static_cast<int64_t>(bits);
}

EquiNormWeightPlan plan_for(const WeightShape& s, ElementType type, const MachineModel& machine,
                            int64_t misalignment_bytes = 0, int64_t base_misalignment_bytes = 0) {
  return plan_equinorm_weight(s.out_channels, s.group_channels, s.taps, s.groups, s.channels_last, s.per_tap_means,
                              static_cast<int64_t>(element_size(type)), misalignment_bytes, base_misalignment_bytes,
                              machine);
}

// Calls visit(std::integral_constant<int, kVec>{}) for the plan's row vector: 16 bytes or one element.
template <typename scalar_t, typename Visit>
cudaError_t visit_row_vector(int vec, Visit&& visit) {
  constexpr int kWidest = max_vector_width<scalar_t>();
  if (vec == kWidest) return visit(std::integral_constant<int, kWidest>{});
  if (vec == 1) return visit(std::integral_constant<int, 1>{});
  return cudaErrorInvalidValue;
}

RowGeometry row_geometry(const WeightShape& s) {
  RowGeometry g{};
  g.out_channels = s.out_channels;
  g.group_channels = s.group_channels;
  g.taps = s.taps;
  g.outputs_per_group = s.out_channels / s.groups;
  g.channels_last = s.channels_last;
  g.per_tap_means = s.per_tap_means;
  return g;
}

template <typename scalar_t>
cudaError_t launch_forward_typed(const WeightShape& shape, const EquiNormWeightPlan& plan, const void* weight,
                                 const void* mean, const void* gain, double ratio, double eps, bool exact, void* out,
                                 void* stats, void* workspace, cudaStream_t stream) {
  using acc_t = em::weight_math_t;
  using operand_t = acc_type<scalar_t>;
  ForwardArgs<scalar_t> args{};
  args.geometry = row_geometry(shape);
  args.weight = static_cast<const scalar_t*>(weight);
  args.mean = static_cast<const operand_t*>(mean);
  args.gain = static_cast<const operand_t*>(gain);
  args.out = static_cast<scalar_t*>(out);
  args.stats = static_cast<acc_t*>(stats);
  args.ratio = static_cast<acc_t>(ratio);
  args.eps = static_cast<acc_t>(eps);
  args.exact = exact;
  args.slices = plan.slices;
  args.slice_values = plan.slice_values;
  args.partials = static_cast<acc_t*>(workspace);
  if (!fits_grid(plan.blocks)) return cudaErrorInvalidConfiguration;
  const unsigned int grid = static_cast<unsigned int>(plan.blocks);
  return visit_row_vector<scalar_t>(plan.vec, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (plan.slices > 1) {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, slice_sums_kernel<scalar_t, kVec>)(args);
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, slice_exact_kernel<scalar_t, kVec>)(args);
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, slice_output_kernel<scalar_t, kVec>)(args);
    } else if (plan.team == kWarpSize) {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, equinorm_weight_kernel<scalar_t, kWarpSize, kVec>)(args);
    } else {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, equinorm_weight_kernel<scalar_t, kThreads, kVec>)(args);
    }
    return cudaGetLastError();
  });
}

template <typename scalar_t>
cudaError_t launch_backward_typed(const WeightShape& shape, const EquiNormWeightPlan& plan, const void* grad_out,
                                  const void* weight, const void* mean, const void* gain, const void* stats,
                                  void* grad_weight, void* grad_mean, void* grad_gain, void* workspace,
                                  cudaStream_t stream) {
  using acc_t = em::weight_math_t;
  using operand_t = acc_type<scalar_t>;
  BackwardArgs<scalar_t> args{};
  args.geometry = row_geometry(shape);
  args.grad = static_cast<const scalar_t*>(grad_out);
  args.weight = static_cast<const scalar_t*>(weight);
  args.mean = static_cast<const operand_t*>(mean);
  args.gain = static_cast<const operand_t*>(gain);
  args.stats = static_cast<const acc_t*>(stats);
  args.grad_weight = static_cast<scalar_t*>(grad_weight);
  args.grad_gain = static_cast<operand_t*>(grad_gain);
  args.slices = plan.slices;
  args.slice_values = plan.slice_values;
  args.row_partials = static_cast<acc_t*>(workspace);
  args.slots = plan.slots;
  args.rows_per_slot = plan.rows_per_slot;
  args.column_threads = plan.column_threads;
  args.column_tiles = plan.column_tiles;
  args.column_partials = reinterpret_cast<acc_t*>(static_cast<char*>(workspace) + plan.row_partial_bytes);
  if (!fits_grid(plan.blocks) || !fits_grid(plan.column_blocks) || !fits_grid(plan.reduce_blocks)) {
    return cudaErrorInvalidConfiguration;
  }
  cudaError_t status = visit_row_vector<scalar_t>(plan.vec, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const unsigned int grid = static_cast<unsigned int>(plan.blocks);
    if (plan.team == kWarpSize) {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, grad_sums_kernel<scalar_t, kWarpSize, kVec>)(args);
    } else {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, grad_sums_kernel<scalar_t, kThreads, kVec>)(args);
    }
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  status = visit_vector_width<scalar_t>(plan.column_vec, [&](auto vec) {
    constexpr int kCVec = decltype(vec)::value;
    EQUINORM_LAUNCH(static_cast<unsigned int>(plan.column_blocks), kThreads, 0, stream,
                    grad_weight_kernel<scalar_t, kCVec>)(args);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  EQUINORM_LAUNCH(static_cast<unsigned int>(plan.reduce_blocks), kReduceThreads, 0, stream,
                  sum_column_partials_kernel<acc_t>)(args.column_partials, args.geometry, plan.slots,
                                                     plan.mean_values, static_cast<acc_t*>(grad_mean));
  return cudaGetLastError();
}

}  // namespace

size_t equinorm_weight_workspace_bytes(const WeightShape& shape, ElementType type, const MachineModel& machine) {
  if (!valid_shape(shape)) return 0;
  return static_cast<size_t>(plan_for(shape, type, machine).forward_workspace_bytes);
}

cudaError_t launch_equinorm_weight(const WeightShape& shape, ElementType type, const void* weight, const void* mean,
                                   const void* gain, double ratio, double eps, bool exact, void* out, void* stats,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                   const MachineModel& machine) {
  const size_t needed = equinorm_weight_workspace_bytes(shape, type, machine);
  if (!valid_shape(shape) || weight == nullptr || mean == nullptr || gain == nullptr || out == nullptr ||
      stats == nullptr || (needed > 0 && (workspace == nullptr || workspace_bytes < needed))) {
    return cudaErrorInvalidValue;
  }
  return visit_element_type(type, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const EquiNormWeightPlan plan = plan_for(shape, type, machine, relative_misalignment(weight, {out}));
    return launch_forward_typed<scalar_t>(shape, plan, weight, mean, gain, ratio, eps, exact, out, stats, workspace,
                                          stream);
  });
}

size_t equinorm_backward_workspace_bytes(const WeightShape& shape, ElementType type, const MachineModel& machine) {
  if (!valid_shape(shape)) return 0;
  static_assert(sizeof(em::weight_math_t) == sizeof(double), "the plan sizes the partial sums as float64");
  return static_cast<size_t>(plan_for(shape, type, machine).backward_workspace_bytes);
}

cudaError_t launch_equinorm_backward(const WeightShape& shape, ElementType type, const void* grad_out,
                                     const void* weight, const void* mean, const void* gain, const void* stats,
                                     void* grad_weight, void* grad_mean, void* grad_gain, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream, const MachineModel& machine) {
  if (!valid_shape(shape) || grad_out == nullptr || weight == nullptr || mean == nullptr || gain == nullptr ||
      stats == nullptr || grad_weight == nullptr || grad_mean == nullptr || grad_gain == nullptr ||
      workspace == nullptr || workspace_bytes < equinorm_backward_workspace_bytes(shape, type, machine)) {
    return cudaErrorInvalidValue;
  }
  return visit_element_type(type, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const EquiNormWeightPlan plan =
        plan_for(shape, type, machine, relative_misalignment(weight, {grad_out, grad_weight}),
                 base_misalignment({weight, grad_out, grad_weight}));
    return launch_backward_typed<scalar_t>(shape, plan, grad_out, weight, mean, gain, stats, grad_weight, grad_mean,
                                           grad_gain, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace equinorm
