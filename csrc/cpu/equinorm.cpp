// EquiNorm's weight transform and its backward on the CPU.
//
// One task owns whole output channels (rows of the weight), so every per-channel sum is
// evaluated in one fixed order: results are bit-identical across runs and thread counts. A row
// is read from memory once; the second and third passes over it hit the cache. The formulas are
// in csrc/shared/equinorm_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/channel_mean.h"
#include "op_checks.h"
#include "shared/equinorm_math.h"

namespace equinorm {
namespace cpu {
namespace {

namespace em = equinorm::math;

// Values one parallel task should at least touch.
constexpr int64_t kTaskValues = 1 << 14;

int64_t row_grain(const WeightGeometry& g) { return std::max<int64_t>(1, kTaskValues / g.row_size()); }

// Calls visit(c, t, offset) for every value of a row, in storage order.
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

// M_d of every group: the sum of its input channels' means, clamped away from zero.
template <typename acc_t>
std::vector<acc_t> group_mean_masses(const acc_t* mean, const WeightGeometry& g) {
  std::vector<acc_t> masses(g.groups);
  for (int64_t group = 0; group < g.groups; ++group) {
    acc_t sum = 0;
    for (int64_t c = 0; c < g.group_channels; ++c) sum += mean[group * g.group_channels + c];
    masses[group] = em::mean_mass(sum);
  }
  return masses;
}

// Per-input-channel sums over the taps of one row.
template <typename acc_t>
struct RowSums {
  std::vector<acc_t> kernel, positive, count;  // W_dc, p_dc (or q_dc), n_dc (or #{u > 0})
  explicit RowSums(int64_t channels) : kernel(channels), positive(channels), count(channels) {}
  void clear() {
    std::fill(kernel.begin(), kernel.end(), acc_t(0));
    std::fill(positive.begin(), positive.end(), acc_t(0));
    std::fill(count.begin(), count.end(), acc_t(0));
  }
};

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* weight;
  const acc_t* mean;
  const acc_t* gain;
  scalar_t* out;
  acc_t* stats;
  acc_t ratio, eps;
  bool exact;
};

// sum_c mu_c sum_t max(w + shift, 0): the exact positive mass of one row.
template <typename scalar_t, typename acc_t>
acc_t exact_positive_mass(const scalar_t* row, const acc_t* mu, acc_t shift, const WeightGeometry& g,
                          std::vector<acc_t>& per_channel) {
  std::fill(per_channel.begin(), per_channel.end(), acc_t(0));
  for_each_in_row(g, [&](int64_t c, int64_t, int64_t i) {
    per_channel[c] += std::max(static_cast<acc_t>(row[i]) + shift, acc_t(0));
  });
  acc_t mass = 0;
  for (int64_t c = 0; c < g.group_channels; ++c) mass += mu[c] * per_channel[c];
  return mass;
}

template <typename scalar_t, typename acc_t>
void forward_row(const ForwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, acc_t mean_mass, int64_t d,
                 RowSums<acc_t>& sums) {
  const scalar_t* row = a.weight + d * g.row_size();
  const acc_t* mu = a.mean + (d / g.outputs_per_group()) * g.group_channels;
  sums.clear();
  for_each_in_row(g, [&](int64_t c, int64_t, int64_t i) {
    const acc_t v = static_cast<acc_t>(row[i]);
    sums.kernel[c] += v;
    sums.positive[c] += v > 0 ? v : acc_t(0);
    sums.count[c] += v > 0 ? acc_t(1) : acc_t(0);
  });
  acc_t kernel_sum = 0, positive_sum = 0, positive_count = 0;
  bool sees_positive = false, sees_non_positive = false;
  for (int64_t c = 0; c < g.group_channels; ++c) {
    kernel_sum += mu[c] * sums.kernel[c];
    positive_sum += mu[c] * sums.positive[c];
    positive_count += mu[c] * sums.count[c];
    sees_positive |= mu[c] > 0 && sums.count[c] > 0;
    sees_non_positive |= mu[c] > 0 && sums.count[c] < g.taps;
  }
  const int taps = static_cast<int>(g.taps);
  const acc_t shift = em::shift(kernel_sum, taps, mean_mass);
  const bool use_exact = a.exact || em::needs_exact_positive_mass(sees_positive, sees_non_positive);
  const acc_t positive_mass = use_exact ? exact_positive_mass(row, mu, shift, g, sums.positive)
                                        : em::one_pass_positive_mass(positive_sum, shift, positive_count);
  const acc_t scale = em::scale(positive_mass, em::absolute_mass(positive_sum, kernel_sum), a.ratio, a.eps);
  const acc_t factor = a.gain[d] * scale;
  scalar_t* out = a.out + d * g.row_size();
  for (int64_t i = 0; i < g.row_size(); ++i) out[i] = static_cast<scalar_t>(factor * (static_cast<acc_t>(row[i]) + shift));
  acc_t* stats = a.stats + d * em::kStatsColumns;
  stats[em::kShift] = shift;
  stats[em::kScale] = scale;
  stats[em::kPositiveMass] = positive_mass;
  stats[em::kMeanMass] = mean_mass;
  stats[em::kUsedExact] = use_exact ? acc_t(1) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
void forward_rows(const ForwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g) {
  const std::vector<acc_t> masses = group_mean_masses(a.mean, g);
  at::parallel_for(0, g.out_channels, row_grain(g), [&](int64_t begin, int64_t end) {
    RowSums<acc_t> sums(g.group_channels);
    for (int64_t d = begin; d < end; ++d) forward_row(a, g, masses[d / g.outputs_per_group()], d, sums);
  });
}

std::tuple<at::Tensor, at::Tensor> weight_transform(const at::Tensor& weight, const at::Tensor& mean,
                                                    const at::Tensor& gain, double ratio, int64_t groups,
                                                    bool exact, double eps) {
  auto [readable, geometry] = weight_input(weight, groups);
  check_mean_and_gain(weight, geometry, mean, gain);
  check_ratio_and_eps(ratio, eps);
  TORCH_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor for the CPU kernel");
  const auto acc = accumulation_type(weight.scalar_type());
  at::Tensor out = empty_like_weight(weight, geometry, weight.scalar_type());
  at::Tensor stats = at::empty({geometry.out_channels, em::kStatsColumns}, weight.options().dtype(acc));
  const at::Tensor mean_c = mean.contiguous(), gain_c = gain.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "equinorm_weight_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t, acc_t> args{readable.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(),
                                      gain_c.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
                                      stats.mutable_data_ptr<acc_t>(), static_cast<acc_t>(ratio),
                                      static_cast<acc_t>(eps), exact};
    forward_rows(args, geometry);
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> equinorm_weight(const at::Tensor& weight, const at::Tensor& mean,
                                                   const at::Tensor& gain, double ratio, int64_t groups,
                                                   c10::string_view mode, double eps) {
  return weight_transform(weight, mean, gain, ratio, groups, parse_exact_mode(mode), eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> equinorm_forward(const at::Tensor& x, int64_t rows,
                                                                const at::Tensor& weight, const at::Tensor& gain,
                                                                double ratio, int64_t groups, c10::string_view mode,
                                                                double eps) {
  const bool exact = parse_exact_mode(mode);
  TORCH_CHECK(accumulation_type(x.scalar_type()) == accumulation_type(weight.scalar_type()),
              "x (", x.scalar_type(), ") and weight (", weight.scalar_type(),
              ") must share an accumulation dtype: both float64 or neither");
  at::Tensor mean = channel_mean(x, rows);
  auto [out, stats] = weight_transform(weight, mean, gain, ratio, groups, exact, eps);
  return {out, mean, stats};
}

// ---- backward ----

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad;
  const scalar_t* weight;
  const acc_t* mean;
  const acc_t* gain;
  const acc_t* stats;
  scalar_t* grad_weight;
  acc_t* grad_gain;
  acc_t* mean_terms;  // (D, C/groups): each output channel's contribution to dL/dmu
};

template <typename scalar_t, typename acc_t>
void backward_row(const BackwardArgs<scalar_t, acc_t>& a, const WeightGeometry& g, int64_t d, RowSums<acc_t>& sums) {
  const int64_t offset = d * g.row_size();
  const scalar_t* row = a.weight + offset;
  const scalar_t* grad = a.grad + offset;
  const acc_t* mu = a.mean + (d / g.outputs_per_group()) * g.group_channels;
  const acc_t* stats = a.stats + d * em::kStatsColumns;
  const acc_t shift = stats[em::kShift], scale = stats[em::kScale], positive_mass = stats[em::kPositiveMass];
  const acc_t mean_mass = stats[em::kMeanMass], gain = a.gain[d];
  const bool exact = stats[em::kUsedExact] != acc_t(0);
  // Which values count as positive: u > 0 for the exact P_d, w > 0 for the one-pass estimate.
  auto active = [&](acc_t w) { return exact ? w + shift > 0 : w > 0; };

  sums.clear();
  acc_t grad_times_shifted = 0, grad_sum = 0;
  for_each_in_row(g, [&](int64_t c, int64_t, int64_t i) {
    const acc_t w = static_cast<acc_t>(row[i]), gr = static_cast<acc_t>(grad[i]);
    grad_times_shifted += gr * (w + shift);
    grad_sum += gr;
    sums.kernel[c] += w;
    const bool on = active(w);
    sums.positive[c] += on ? (exact ? w + shift : w) : acc_t(0);
    sums.count[c] += on ? acc_t(1) : acc_t(0);
  });
  acc_t active_count = 0;
  for (int64_t c = 0; c < g.group_channels; ++c) active_count += mu[c] * sums.count[c];
  const int taps = static_cast<int>(g.taps);
  const acc_t grad_mass = em::grad_positive_mass(grad_times_shifted, gain, scale, positive_mass);
  const acc_t grad_shift = em::grad_shift(grad_sum, gain, scale, grad_mass, active_count);
  a.grad_gain[d] = scale * grad_times_shifted;

  scalar_t* grad_weight = a.grad_weight + offset;
  for_each_in_row(g, [&](int64_t c, int64_t, int64_t i) {
    const acc_t w = static_cast<acc_t>(row[i]);
    grad_weight[i] = static_cast<scalar_t>(em::grad_weight(static_cast<acc_t>(grad[i]), active(w), mu[c], gain, scale,
                                                           grad_mass, grad_shift, taps, mean_mass));
  });
  acc_t* terms = a.mean_terms + d * g.group_channels;
  for (int64_t c = 0; c < g.group_channels; ++c) {
    const acc_t positive_part = exact ? sums.positive[c] : sums.positive[c] + shift * sums.count[c];
    terms[c] = em::grad_mean_term(positive_part, sums.kernel[c], grad_mass, grad_shift, shift, taps, mean_mass);
  }
}

// dL/dmu_c: the output channels of c's group added in channel order.
template <typename acc_t>
void reduce_mean_terms(const acc_t* terms, const WeightGeometry& g, acc_t* grad_mean) {
  const int64_t channels = g.group_channels * g.groups;
  at::parallel_for(0, channels, std::max<int64_t>(1, kTaskValues / g.outputs_per_group()),
                   [&](int64_t begin, int64_t end) {
    for (int64_t channel = begin; channel < end; ++channel) {
      const int64_t group = channel / g.group_channels, c = channel % g.group_channels;
      acc_t sum = 0;
      for (int64_t d = group * g.outputs_per_group(); d < (group + 1) * g.outputs_per_group(); ++d) {
        sum += terms[d * g.group_channels + c];
      }
      grad_mean[channel] = sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> equinorm_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                                                 const at::Tensor& mean, const at::Tensor& gain,
                                                                 const at::Tensor& stats, int64_t groups) {
  auto [readable, geometry] = weight_input(weight, groups);
  check_mean_and_gain(weight, geometry, mean, gain);
  check_stats(stats, weight, geometry, em::kStatsColumns);
  TORCH_CHECK(grad_out.sizes() == weight.sizes() && grad_out.scalar_type() == weight.scalar_type(),
              "grad_out must match weight (", weight.sizes(), ", ", weight.scalar_type(), "), got ", grad_out.sizes(),
              ", ", grad_out.scalar_type());
  TORCH_CHECK(weight.device().is_cpu() && grad_out.device().is_cpu(), "the CPU kernel needs CPU tensors");
  const auto format = !geometry.channels_last ? at::MemoryFormat::Contiguous
                      : weight.dim() == 4     ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::ChannelsLast3d;
  const at::Tensor grad = grad_out.contiguous(format);
  const auto acc = accumulation_type(weight.scalar_type());
  at::Tensor grad_weight = empty_like_weight(weight, geometry, weight.scalar_type());
  at::Tensor grad_gain = at::empty({geometry.out_channels}, weight.options().dtype(acc));
  at::Tensor grad_mean = at::empty({geometry.group_channels * geometry.groups}, weight.options().dtype(acc));
  at::Tensor mean_terms = at::empty({geometry.out_channels, geometry.group_channels}, weight.options().dtype(acc));
  const at::Tensor mean_c = mean.contiguous(), gain_c = gain.contiguous(), stats_c = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "equinorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t, acc_t> args{grad.const_data_ptr<scalar_t>(),       readable.const_data_ptr<scalar_t>(),
                                       mean_c.const_data_ptr<acc_t>(),        gain_c.const_data_ptr<acc_t>(),
                                       stats_c.const_data_ptr<acc_t>(),       grad_weight.mutable_data_ptr<scalar_t>(),
                                       grad_gain.mutable_data_ptr<acc_t>(),   mean_terms.mutable_data_ptr<acc_t>()};
    at::parallel_for(0, geometry.out_channels, row_grain(geometry), [&](int64_t begin, int64_t end) {
      RowSums<acc_t> sums(geometry.group_channels);
      for (int64_t d = begin; d < end; ++d) backward_row(args, geometry, d, sums);
    });
    reduce_mean_terms(args.mean_terms, geometry, grad_mean.mutable_data_ptr<acc_t>());
  });
  return {grad_weight, grad_mean, grad_gain};
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CPU, m) {
  m.impl("equinorm_weight", &equinorm_weight);
  m.impl("equinorm_forward", &equinorm_forward);
  m.impl("equinorm_backward", &equinorm_backward);
}

}  // namespace cpu
}  // namespace equinorm
