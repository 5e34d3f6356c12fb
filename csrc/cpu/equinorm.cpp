// EquiNorm's weight transform and its backward on the CPU.
//
// One task owns whole output channels (rows of the weight), so every per-channel sum is
// evaluated in one fixed order: results are bit-identical across runs and thread counts. A row
// is read from memory once; the second and third passes over it hit the cache. The row
// reductions run flat over the row's values against the channel means laid out like the row, as
// `omp simd` loops the compiler vectorises (float rows also for AVX2, picked at load time), in
// the weight math's double precision. The formulas are in csrc/shared/equinorm_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/channel_mean.h"
#include "cpu/reductions.h"
#include "op_checks.h"
#include "op_entry_points.h"
#include "shared/equinorm_math.h"

namespace equinorm {
namespace cpu {
namespace {

namespace em = equinorm::math;

// Values one parallel task should at least touch.
constexpr int64_t kTaskValues = 1 << 14;

int64_t row_grain(const WeightGeometry& g) { return std::max<int64_t>(1, kTaskValues / g.row_size()); }

// Calls visit(c, t, i) for every value of a row in storage order: i is its offset in the row, c
// its input channel and t its tap.
template <typename Visit>
inline void for_each_in_row(const WeightGeometry& g, Visit&& visit) {
  if (g.channels_last) {
    for (int64_t t = 0; t < g.taps; ++t)
      for (int64_t c = 0; c < g.group_channels; ++c) visit(c, t, t * g.group_channels + c);
  } else {
    for (int64_t c = 0; c < g.group_channels; ++c)
      for (int64_t t = 0; t < g.taps; ++t) visit(c, t, c * g.taps + t);
  }
}

// Offset in a group's means of the mean value (c, t) reads: (c, t) per tap, c per channel.
inline int64_t mean_index(const WeightGeometry& g, int64_t c, int64_t t) {
  return g.per_tap_means ? c * g.taps + t : c;
}

// The means laid out like a row of the weight, one row per group: every per-row loop then runs
// flat over the row's values (and vectorises) whatever the layout and the kind of mean.
template <typename acc_t, typename mean_t>
std::vector<acc_t> means_per_value(const mean_t* mean, const WeightGeometry& g) {
  std::vector<acc_t> expanded(g.groups * g.row_size());
  for (int64_t group = 0; group < g.groups; ++group) {
    acc_t* row = expanded.data() + group * g.row_size();
    const mean_t* mu = mean + group * g.mean_values_per_group();
    for_each_in_row(g, [&](int64_t c, int64_t t, int64_t i) { row[i] = static_cast<acc_t>(mu[mean_index(g, c, t)]); });
  }
  return expanded;
}

// A (n,) per-channel operand (gain) in the weight math's precision.
template <typename acc_t, typename value_t>
std::vector<acc_t> widened(const value_t* values, int64_t n) {
  return std::vector<acc_t>(values, values + n);
}

// V_d of every group: the sum of the means over a row's values, clamped away from zero.
template <typename acc_t>
std::vector<acc_t> group_value_masses(const std::vector<acc_t>& mean_per_value, const WeightGeometry& g) {
  std::vector<acc_t> masses(g.groups);
  for (int64_t group = 0; group < g.groups; ++group) {
    const acc_t* row = mean_per_value.data() + group * g.row_size();
    acc_t sum = 0;
    for (int64_t i = 0; i < g.row_size(); ++i) sum += row[i];
    masses[group] = em::value_mass(sum);
  }
  return masses;
}

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* weight;
  const acc_t* mean_per_value;  // (groups, row size)
  const acc_t* gain;
  scalar_t* out;
  acc_t* stats;
  acc_t ratio, eps;
  bool exact;
};

// Lanes of the row reductions: two AVX2 registers per running sum, four sums in flight, so the
// adds do not wait on each other.
template <typename acc_t>
constexpr int kRowLanes = 64 / static_cast<int>(sizeof(acc_t));

// The first pass over a row: sums over its values of mu w, mu [w > 0] w, mu [w > 0], mu [w <= 0].
template <typename acc_t>
struct RowMoments {
  acc_t kernel_sum, positive_sum, positive_count, non_positive_count;
};

template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE RowMoments<acc_t> row_moments(const scalar_t* row, const acc_t* mu, int64_t size) {
  constexpr int kWidth = kRowLanes<acc_t>;
  acc_t kernel[kWidth] = {}, positive[kWidth] = {}, count[kWidth] = {}, non_positive[kWidth] = {};
  const auto add = [&](int j, acc_t w, acc_t m) {
    const acc_t positive_m = w > 0 ? m : acc_t(0);
    kernel[j] += m * w;
    positive[j] += positive_m * w;
    count[j] += positive_m;
    non_positive[j] += m - positive_m;
  };
  int64_t i = 0;
  for (; i + kWidth <= size; i += kWidth) {
#pragma omp simd
    for (int j = 0; j < kWidth; ++j) add(j, static_cast<acc_t>(row[i + j]), mu[i + j]);
  }
  for (int j = 0; i < size; ++i, ++j) add(j, static_cast<acc_t>(row[i]), mu[i]);
  return {combine_lanes<kWidth>(kernel), combine_lanes<kWidth>(positive), combine_lanes<kWidth>(count),
          combine_lanes<kWidth>(non_positive)};
}

template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void forward_row(const ForwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, acc_t value_mass, int64_t d) {
  const int64_t size = g.row_size();
  const scalar_t* row = a.weight + d * size;
  const acc_t* mu = a.mean_per_value + (d / g.outputs_per_group()) * size;
  const auto [kernel_sum, positive_sum, positive_count, non_positive_count] = row_moments(row, mu, size);
  // The means are >= 0, so a mean-weighted count is > 0 exactly when some weight on a seen input
  // (mu > 0) falls in it: these are the "takes both signs" tests of the one-pass estimate.
  const bool sees_positive = positive_count > 0, sees_non_positive = non_positive_count > 0;
  const acc_t shift = em::shift(kernel_sum, value_mass);
  const bool use_exact = a.exact || em::needs_exact_positive_mass(sees_positive, sees_non_positive);
  acc_t positive_mass = em::one_pass_positive_mass(positive_sum, shift, positive_count);
  if (use_exact) {
    positive_mass = 0;
#pragma omp simd reduction(+ : positive_mass)
    for (int64_t i = 0; i < size; ++i) {
      const acc_t u = static_cast<acc_t>(row[i]) + shift;
      positive_mass += mu[i] * (u > 0 ? u : acc_t(0));
    }
  }
  const acc_t scale = em::scale(positive_mass, em::absolute_mass(positive_sum, kernel_sum), a.ratio, a.eps);
  const acc_t factor = a.gain[d] * scale;
  scalar_t* out = a.out + d * size;
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) out[i] = static_cast<scalar_t>(factor * (static_cast<acc_t>(row[i]) + shift));
  em::write_stats(a.stats + d * em::kStatsColumns, shift, scale, positive_mass, value_mass, use_exact);
}

template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void forward_row_range(const ForwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g,
                                         const acc_t* masses, int64_t begin, int64_t end) {
  for (int64_t d = begin; d < end; ++d) forward_row(a, g, masses[d / g.outputs_per_group()], d);
}

EQUINORM_AVX2_CLONES void float_forward_row_range(const ForwardArgs<float, double>& a, const WeightGeometry& g,
                                                  const double* masses, int64_t begin, int64_t end) {
  forward_row_range(a, g, masses, begin, end);
}

template <typename scalar_t, typename acc_t, typename operand_t>
void forward_rows(const scalar_t* weight, const operand_t* mean, const operand_t* gain, scalar_t* out, acc_t* stats,
                  const WeightGeometry& g, acc_t ratio, acc_t eps, bool exact) {
  const std::vector<acc_t> wide_gain = widened<acc_t>(gain, g.out_channels);
  const std::vector<acc_t> mean_per_value = means_per_value<acc_t>(mean, g);
  const std::vector<acc_t> masses = group_value_masses(mean_per_value, g);
  const ForwardArgs<scalar_t, acc_t> args{weight, mean_per_value.data(), wide_gain.data(), out, stats, ratio, eps, exact};
  at::parallel_for(0, g.out_channels, row_grain(g), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      float_forward_row_range(args, g, masses.data(), begin, end);
    } else {
      forward_row_range(args, g, masses.data(), begin, end);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> weight_transform(const at::Tensor& weight, const at::Tensor& mean,
                                                    const at::Tensor& gain, double ratio, int64_t groups,
                                                    bool exact, double eps) {
  auto [readable, geometry] = weight_input(weight, groups);
  check_mean_and_gain(weight, geometry, mean, gain);
  check_ratio_and_eps(ratio, eps);
  TORCH_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor for the CPU kernel");
  at::Tensor out = empty_like_weight(weight, geometry, weight.scalar_type());
  at::Tensor stats = at::empty({geometry.out_channels, em::kStatsColumns}, weight.options().dtype(at::kDouble));
  const at::Tensor mean_c = mean.contiguous(), gain_c = gain.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "equinorm_weight_cpu", [&] {
    using operand_t = at::opmath_type<scalar_t>;
    using acc_t = em::weight_math_t;
    forward_rows(readable.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<operand_t>(),
                 gain_c.const_data_ptr<operand_t>(), out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>(),
                 geometry, static_cast<acc_t>(ratio), static_cast<acc_t>(eps), exact);
  });
  return {out, stats};
}

// ---- backward ----

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad;
  const scalar_t* weight;
  const acc_t* mean_per_value;  // (groups, row size)
  const acc_t* gain;
  const acc_t* stats;
  scalar_t* grad_weight;
  acc_t* grad_gain;  // (D,), in the weight math's precision until the op returns it
};

// What the second pass over a row needs from the first.
template <typename acc_t>
struct RowGradient {
  acc_t shift, gain_times_scale, grad_mass, shared_factor;
  // A weight is active when w + active_shift > 0: u > 0 for the exact P_d (active_shift = b_d),
  // w > 0 for the one-pass estimate (active_shift = 0); one branch-free test for both.
  acc_t active_shift;
};

// dL/dw of one row, and its dL/dmu terms (u h of each value) added to `value_sums`, the running
// sums of the rows' terms in the row's storage order; fold_value_sums later takes them to the
// means' layout. The per-value work runs flat (vectorised) whatever the layout.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void write_row_gradients(const BackwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, int64_t d,
                                           const RowGradient<acc_t>& r, acc_t* value_sums) {
  const int64_t size = g.row_size(), offset = d * size;
  const scalar_t* row = a.weight + offset;
  const scalar_t* grad = a.grad + offset;
  scalar_t* grad_weight = a.grad_weight + offset;
  const acc_t* mu = a.mean_per_value + (d / g.outputs_per_group()) * size;
  const acc_t shift = r.shift, active_shift = r.active_shift, gain_times_scale = r.gain_times_scale;
  const acc_t grad_mass = r.grad_mass, shared_factor = r.shared_factor;
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) {
    const acc_t w = static_cast<acc_t>(row[i]), u = w + shift, m = mu[i];
    const bool active = w + active_shift > 0;
    const acc_t h = em::mean_factor(active, grad_mass, shared_factor);
    grad_weight[i] = static_cast<scalar_t>(em::grad_weight(static_cast<acc_t>(grad[i]), gain_times_scale, m, h));
    value_sums[i] += em::grad_mean_term(active ? u : acc_t(0), u, grad_mass, shared_factor);
  }
}

// mean_grad (one group's dL/dmu values) += value_sums (a row's values in storage order, summed
// over rows of that group), which are then zeroed: per tap they are moved as they are stored;
// for channel means each channel's taps are added up. Once per run of rows rather than per row:
// a channel's taps are a chain of dependent additions, which per row would cost more than the row.
template <typename acc_t>
C10_ALWAYS_INLINE void fold_value_sums(const WeightGeometry& g, acc_t* value_sums, acc_t* mean_grad) {
  const int64_t size = g.row_size();
  if (g.per_tap_means && !g.channels_last) {  // both (c, t)
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) mean_grad[i] += value_sums[i];
  } else if (g.per_tap_means) {  // (t, c) into (c, t)
    for (int64_t t = 0; t < g.taps; ++t)
      for (int64_t c = 0; c < g.group_channels; ++c) mean_grad[c * g.taps + t] += value_sums[t * g.group_channels + c];
  } else if (g.channels_last || g.taps == 1) {  // (t, c): the taps are rows of channels
    for (int64_t t = 0; t < g.taps; ++t) {
      const acc_t* tap = value_sums + t * g.group_channels;
#pragma omp simd
      for (int64_t c = 0; c < g.group_channels; ++c) mean_grad[c] += tap[c];
    }
  } else {  // (c, t): a channel's taps are adjacent
    for (int64_t c = 0; c < g.group_channels; ++c) {
      acc_t sum = 0;
      for (int64_t t = 0; t < g.taps; ++t) sum += value_sums[c * g.taps + t];
      mean_grad[c] += sum;
    }
  }
  std::fill(value_sums, value_sums + size, acc_t(0));
}

template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_row(const BackwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, int64_t d,
                                    acc_t* value_sums) {
  const int64_t size = g.row_size();
  const acc_t* stats = a.stats + d * em::kStatsColumns;
  RowGradient<acc_t> r;
  r.shift = stats[em::kShift];
  r.active_shift = stats[em::kUsedExact] != acc_t(0) ? r.shift : acc_t(0);
  const acc_t scale = stats[em::kScale], gain = a.gain[d];
  const scalar_t* row = a.weight + d * size;
  const scalar_t* grad = a.grad + d * size;
  const acc_t* mu = a.mean_per_value + (d / g.outputs_per_group()) * size;
  const acc_t shift = r.shift, active_shift = r.active_shift;
  acc_t grad_shifted = 0, grad_sum = 0, active_count = 0;
#pragma omp simd reduction(+ : grad_shifted, grad_sum, active_count)
  for (int64_t i = 0; i < size; ++i) {
    const acc_t w = static_cast<acc_t>(row[i]), gr = static_cast<acc_t>(grad[i]), m = mu[i];
    grad_shifted += gr * (w + shift);
    grad_sum += gr;
    active_count += w + active_shift > 0 ? m : acc_t(0);
  }

  r.gain_times_scale = gain * scale;
  r.grad_mass = em::grad_positive_mass(grad_shifted, gain, scale, stats[em::kPositiveMass]);
  const acc_t grad_shift = em::grad_shift(grad_sum, gain, scale, r.grad_mass, active_count);
  r.shared_factor = em::shared_mean_factor(grad_shift, stats[em::kValueMass]);
  a.grad_gain[d] = scale * grad_shifted;
  write_row_gradients(a, g, d, r, value_sums);
}

// dL/dw, dL/dgain and dL/dmu. Rows are cut into chunks of a size fixed by the shape; each chunk
// adds its rows' dL/dmu terms, in row order, into its own (C,) partial sum (through value_sums,
// one row of scratch, folded at the end of each group's run of rows), and the partial sums are
// added in chunk order: the result does not depend on the thread count.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void backward_chunk(const BackwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, int64_t first,
                                      int64_t last, acc_t* value_sums, acc_t* sums) {
  const int64_t per_group = g.outputs_per_group();
  for (int64_t d = first; d < last; ++d) {
    backward_row(a, g, d, value_sums);
    const int64_t group = d / per_group;
    if (d + 1 == last || (d + 1) / per_group != group) {
      fold_value_sums(g, value_sums, sums + group * g.mean_values_per_group());
    }
  }
}

EQUINORM_AVX2_CLONES void float_backward_chunk(const BackwardArgs<float, double>& a, const WeightGeometry& g,
                                               int64_t first, int64_t last, double* value_sums, double* sums) {
  backward_chunk(a, g, first, last, value_sums, sums);
}

// Rows per backward chunk: a task's worth of values, in a number of chunks that is a multiple of
// kChunkMultiple once there is more than one, so that a few threads get equal shares (3 chunks on
// 2 threads would leave one thread a third of the work). A function of the shape alone.
constexpr int64_t kChunkMultiple = 4;

int64_t backward_chunk_rows(const WeightGeometry& g) {
  const int64_t values = g.out_channels * g.row_size();
  if (values <= kTaskValues) return g.out_channels;
  int64_t chunks = (values + kTaskValues - 1) / kTaskValues;
  chunks = std::min(g.out_channels, (chunks + kChunkMultiple - 1) / kChunkMultiple * kChunkMultiple);
  return (g.out_channels + chunks - 1) / chunks;
}

template <typename scalar_t, typename acc_t>
void backward_rows(const BackwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, acc_t* grad_mean) {
  const int64_t channels = g.mean_values_per_group() * g.groups, chunk_rows = backward_chunk_rows(g);
  const int64_t chunks = (g.out_channels + chunk_rows - 1) / chunk_rows;
  std::vector<acc_t> partial(chunks * channels, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> value_sums(g.row_size(), acc_t(0));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* sums = partial.data() + chunk * channels;
      const int64_t first = chunk * chunk_rows, last = std::min(g.out_channels, (chunk + 1) * chunk_rows);
      if constexpr (std::is_same_v<scalar_t, float>) {
        float_backward_chunk(a, g, first, last, value_sums.data(), sums);
      } else {
        backward_chunk(a, g, first, last, value_sums.data(), sums);
      }
    }
  });
  std::fill(grad_mean, grad_mean + channels, acc_t(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const acc_t* sums = partial.data() + chunk * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) grad_mean[c] += sums[c];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> equinorm_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                                                 const at::Tensor& mean, const at::Tensor& gain,
                                                                 const at::Tensor& stats, int64_t groups) {
  auto [readable, geometry] = weight_input(weight, groups);
  check_mean_and_gain(weight, geometry, mean, gain);
  check_stats(stats, weight, geometry, em::kStatsColumns);
  TORCH_CHECK(weight.device().is_cpu() && grad_out.device().is_cpu(), "the CPU kernel needs CPU tensors");
  const at::Tensor grad = grad_in_weight_layout(grad_out, weight, geometry);
  const auto acc = accumulation_type(weight.scalar_type());
  at::Tensor grad_weight = empty_like_weight(weight, geometry, weight.scalar_type());
  at::Tensor grad_gain = at::empty({geometry.out_channels}, weight.options().dtype(acc));
  at::Tensor grad_mean = at::empty(mean.sizes(), weight.options().dtype(at::kDouble));
  const at::Tensor mean_c = mean.contiguous(), gain_c = gain.contiguous(), stats_c = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "equinorm_backward_cpu", [&] {
    using operand_t = at::opmath_type<scalar_t>;
    using acc_t = em::weight_math_t;
    const std::vector<acc_t> mean_per_value = means_per_value<acc_t>(mean_c.const_data_ptr<operand_t>(), geometry);
    const std::vector<acc_t> wide_gain = widened<acc_t>(gain_c.const_data_ptr<operand_t>(), geometry.out_channels);
    std::vector<acc_t> wide_grad_gain(geometry.out_channels);
    const BackwardArgs<scalar_t, acc_t> args{
        grad.const_data_ptr<scalar_t>(),          readable.const_data_ptr<scalar_t>(),
        mean_per_value.data(),                    wide_gain.data(),
        stats_c.const_data_ptr<acc_t>(),          grad_weight.mutable_data_ptr<scalar_t>(),
        wide_grad_gain.data()};
    backward_rows(args, geometry, grad_mean.mutable_data_ptr<acc_t>());
    std::copy(wide_grad_gain.begin(), wide_grad_gain.end(), grad_gain.mutable_data_ptr<operand_t>());
  });
  return {grad_weight, grad_mean, grad_gain};
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CPU, m) {
  using EntryPoints = EquiNormEntryPoints<&channel_mean, &weight_transform>;
  m.impl("equinorm_weight", &EntryPoints::equinorm_weight);
  m.impl("equinorm_forward", &EntryPoints::equinorm_forward);
  m.impl("equinorm_backward", &equinorm_backward);
}

}  // namespace cpu
}  // namespace equinorm
