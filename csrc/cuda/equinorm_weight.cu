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
//   equinorm_backward   2 kernels: per output channel d, grad_weight, grad_gain and the row
//                       of contributions to grad_mean (C/groups values, or C/groups x K for
//                       per-tap means); then each value of grad_mean adds its group's rows in a
//                       fixed order.
//
// One team of threads owns one output channel (a row of C/groups x K values): a warp for short
// rows (eight rows per block), the whole block otherwise. Every sum of the forward and of the
// backward's first pass is a sum over the row's values, whatever their channel, so the team
// reads the row as one contiguous run in either layout ((c, t), or (t, c) channels_last): a
// scalar head up to the first vector-aligned element, vectors of kVec elements (16 bytes) on the
// body, a scalar tail; a cursor steps each value's (channel, tap) for its mean. The sums are
// added over the team in a fixed tree. A row is read from global memory once; its second and
// third passes hit the cache. The backward's per-channel contributions to grad_mean (channel
// means over several taps) still take a power-of-two group of lanes per input channel, whose
// butterfly adds the channel's taps.
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

// Plans (teams, lanes, blocks, the grad_mean reduction): plan_equinorm_weight in cuda/launch_plans.h.
constexpr int kThreads = kEquiNormThreads;
// Values a team adds at once at most (the forward's first pass).
constexpr int kMaxTeamSums = 6;
constexpr int kReduceThreads = kReduceColumns * kReduceSlices;
constexpr int kReduceUnroll = 4;

// A weight row seen by the kernels: value (c, t) of row d at d * row_size + c * channel_stride + t * tap_stride.
struct RowGeometry {
  int64_t out_channels;
  int64_t group_channels;
  int64_t taps;
  int64_t outputs_per_group;
  int64_t channel_stride;
  int64_t tap_stride;
  int lanes_per_channel;  // a power of two <= 32
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
  acc_t* mean_terms;  // (D, C/groups)
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

// Calls visit(c, active, lane) for every input channel c of a row, lanes_per_channel lanes per
// channel (lane: the thread's place among them). Every thread of the team makes the same number
// of calls (active is false past the last channel), so visit may use group_sum.
template <int kTeam, typename Visit>
__device__ __forceinline__ void for_each_channel(const RowGeometry& g, Visit&& visit) {
  const int lanes = g.lanes_per_channel;
  const int team_lane = Team<kTeam>::lane();
  const int groups = kTeam / lanes;
  const int group = team_lane / lanes, lane = team_lane % lanes;
  for (int64_t first = 0; first < g.group_channels; first += groups) {
    const int64_t c = first + group;
    visit(c, c < g.group_channels, lane);
  }
}

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

template <typename scalar_t, int kTeam, int kVec>
__global__ void __launch_bounds__(kThreads, kEquiNormBlocksPerMultiprocessor) equinorm_backward_kernel(BackwardArgs<scalar_t> a) {
  using acc_t = em::weight_math_t;
  using operand_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kMaxTeamSums * Team<kTeam>::kWarps];
  const RowGeometry& g = a.geometry;
  const int64_t d = Team<kTeam>::row();
  if (d >= g.out_channels) return;  // only a warp team of the last block; warp teams use no block barrier
  const int lanes = g.lanes_per_channel;
  const int64_t row_size = g.row_size();
  const int team_lane = Team<kTeam>::lane();
  const scalar_t* row = a.weight + d * row_size;
  const scalar_t* grad = a.grad + d * row_size;
  const scalar_t* const rows[2] = {row, grad};
  scalar_t* grad_weight = a.grad_weight + d * row_size;
  const operand_t* mu = a.mean + (d / g.outputs_per_group) * g.mean_values_per_group();

  const acc_t* stats = a.stats + d * em::kStatsColumns;
  const acc_t shift = stats[em::kShift];
  const acc_t scale = stats[em::kScale];
  const acc_t positive_mass = stats[em::kPositiveMass];
  const acc_t value_mass = stats[em::kValueMass];
  const bool exact = stats[em::kUsedExact] != acc_t(0);
  const acc_t gain = a.gain[d];
  // Which values count as positive: u > 0 for the exact P_d, w > 0 for the one-pass estimate.
  auto is_active = [&](acc_t w) { return exact ? w + shift > acc_t(0) : w > acc_t(0); };

  // sum_ct G u, sum_ct G, sum_ct mu_ct [active], each lane adding its own values.
  enum { kGradTimesShifted, kGradSum, kActiveCount };
  acc_t sums[3] = {};
  walk_row<kVec, false>(g, rows, nullptr, 0, row_size, team_lane, kTeam, [&](int64_t m_index, const acc_t (&v)[2]) {
    const acc_t w = v[0], gr = v[1];
    sums[kGradTimesShifted] += gr * (w + shift);
    sums[kGradSum] += gr;
    if (is_active(w)) sums[kActiveCount] += mu[m_index];
    return acc_t(0);
  });
  Team<kTeam>::sum(sums, scratch);

  const acc_t grad_mass = em::grad_positive_mass(sums[kGradTimesShifted], gain, scale, positive_mass);
  const acc_t grad_shift = em::grad_shift(sums[kGradSum], gain, scale, grad_mass, sums[kActiveCount]);
  const acc_t shared_factor = em::shared_mean_factor(grad_shift, value_mass);
  const acc_t gain_times_scale = gain * scale;
  if (team_lane == 0) a.grad_gain[d] = static_cast<operand_t>(scale * sums[kGradTimesShifted]);

  // dL/dw, and this row's terms of dL/dmu: u h per value when every value has its own mean (per-tap
  // means, or one tap per channel); otherwise summed over each channel's taps (a butterfly over
  // the channel's lanes).
  acc_t* terms = a.mean_terms + d * g.mean_values_per_group();
  if (g.per_tap_means || g.taps == 1) {
    walk_row<kVec, true>(g, rows, grad_weight, 0, row_size, team_lane, kTeam,
                         [&](int64_t m_index, const acc_t (&v)[2]) {
                           const acc_t w = v[0], gr = v[1];
                           const bool on = is_active(w);
                           const acc_t u = w + shift;
                           terms[m_index] = em::grad_mean_term(on ? u : acc_t(0), u, grad_mass, shared_factor);
                           return em::grad_weight(gr, gain_times_scale, acc_t(mu[m_index]),
                                                  em::mean_factor(on, grad_mass, shared_factor));
                         });
    return;
  }
  for_each_channel<kTeam>(g, [&](int64_t c, bool active, int lane) {
    acc_t shifted = 0, active_shifted = 0;  // sum_t u, sum_t [active] u
    if (active) {
      for (int64_t t = lane; t < g.taps; t += lanes) {
        const int64_t i = c * g.channel_stride + t * g.tap_stride;
        const acc_t w = load_acc(row + i), gr = load_acc(grad + i), m = mu[c];
        const bool on = is_active(w);
        const acc_t h = em::mean_factor(on, grad_mass, shared_factor);
        grad_weight[i] = from_weight_math<scalar_t>(em::grad_weight(gr, gain_times_scale, m, h));
        const acc_t u = w + shift;
        shifted += u;
        if (on) active_shifted += u;
      }
    }
    shifted = group_sum(shifted, lanes);
    active_shifted = group_sum(active_shifted, lanes);
    if (active && lane == 0) terms[c] = em::grad_mean_term(active_shifted, shifted, grad_mass, shared_factor);
  });
}

// grad_mean[v] = sum over the output channels d of v's group of mean_terms[d, v'] (v' = v's index
// in the group; a value is a channel, or a (channel, tap) for per-tap means, and `group_channels`
// counts a group's values). Slice s adds rows s, s + kReduceSlices, ... in order, into
// kReduceUnroll interleaved accumulators; the slices are then added in slice order.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    sum_mean_terms_kernel(const acc_t* __restrict__ terms, int64_t group_channels, int64_t outputs_per_group,
                          int64_t channels, acc_t* __restrict__ grad_mean) {
  __shared__ acc_t slice_sums[kReduceSlices][kReduceColumns];
  const int column = threadIdx.x % kReduceColumns, slice = threadIdx.x / kReduceColumns;
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * kReduceColumns + column;
  acc_t sums[kReduceUnroll];
#pragma unroll
  for (int u = 0; u < kReduceUnroll; ++u) sums[u] = 0;
  if (channel < channels) {
    const int64_t group = channel / group_channels;
    const acc_t* source = terms + group * outputs_per_group * group_channels + (channel - group * group_channels);
    for (int64_t first = slice; first < outputs_per_group; first += kReduceUnroll * kReduceSlices) {
      acc_t values[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int64_t r = first + u * kReduceSlices;
        values[u] = r < outputs_per_group ? __ldg(source + r * group_channels) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) sums[u] += values[u];
    }
  }
  acc_t total = sums[0];
#pragma unroll
  for (int u = 1; u < kReduceUnroll; ++u) total += sums[u];
  slice_sums[slice][column] = total;
  __syncthreads();
  if (slice == 0 && channel < channels) {
    acc_t sum = 0;
    for (int s = 0; s < kReduceSlices; ++s) sum += slice_sums[s][column];
    grad_mean[channel] = sum;
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

EquiNormWeightPlan plan_for(const WeightShape& s, ElementType type, const MachineModel& machine,
                            int64_t misalignment_bytes = 0) {
  return plan_equinorm_weight(s.out_channels, s.group_channels, s.taps, s.groups, s.channels_last, s.per_tap_means,
                              static_cast<int64_t>(element_size(type)), misalignment_bytes, machine);
}

// Calls visit(std::integral_constant<int, kVec>{}) for the plan's row vector: 16 bytes or one element.
template <typename scalar_t, typename Visit>
cudaError_t visit_row_vector(int vec, Visit&& visit) {
  constexpr int kWidest = max_vector_width<scalar_t>();
  if (vec == kWidest) return visit(std::integral_constant<int, kWidest>{});
  if (vec == 1) return visit(std::integral_constant<int, 1>{});
  return cudaErrorInvalidValue;
}

RowGeometry row_geometry(const WeightShape& s, const EquiNormWeightPlan& plan) {
  RowGeometry g{};
  g.out_channels = s.out_channels;
  g.group_channels = s.group_channels;
  g.taps = s.taps;
  g.outputs_per_group = s.out_channels / s.groups;
  g.channel_stride = s.channels_last ? 1 : s.taps;
  g.tap_stride = s.channels_last ? s.group_channels : 1;
  g.lanes_per_channel = plan.lanes_per_channel;
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
  args.geometry = row_geometry(shape, plan);
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
  args.geometry = row_geometry(shape, plan);
  args.grad = static_cast<const scalar_t*>(grad_out);
  args.weight = static_cast<const scalar_t*>(weight);
  args.mean = static_cast<const operand_t*>(mean);
  args.gain = static_cast<const operand_t*>(gain);
  args.stats = static_cast<const acc_t*>(stats);
  args.grad_weight = static_cast<scalar_t*>(grad_weight);
  args.grad_gain = static_cast<operand_t*>(grad_gain);
  args.mean_terms = static_cast<acc_t*>(workspace);
  if (!fits_grid(plan.row_blocks) || !fits_grid(plan.reduce_blocks)) return cudaErrorInvalidConfiguration;
  const unsigned int grid = static_cast<unsigned int>(plan.row_blocks);
  const cudaError_t status = visit_row_vector<scalar_t>(plan.vec, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (plan.team == kWarpSize) {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, equinorm_backward_kernel<scalar_t, kWarpSize, kVec>)(args);
    } else {
      EQUINORM_LAUNCH(grid, kThreads, 0, stream, equinorm_backward_kernel<scalar_t, kThreads, kVec>)(args);
    }
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  EQUINORM_LAUNCH(static_cast<unsigned int>(plan.reduce_blocks), kReduceThreads, 0, stream,
                  sum_mean_terms_kernel<acc_t>)(args.mean_terms, args.geometry.mean_values_per_group(),
                                                shape.out_channels / shape.groups, plan.mean_values,
                                                static_cast<acc_t*>(grad_mean));
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
  static_assert(sizeof(em::weight_math_t) == sizeof(double), "the plan sizes the contributions as float64");
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
    const int64_t misalignment = relative_misalignment(weight, {grad_out, grad_weight});
    return launch_backward_typed<scalar_t>(shape, plan_for(shape, type, machine, misalignment), grad_out, weight,
                                           mean, gain, stats, grad_weight, grad_mean, grad_gain, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace equinorm
