// ENorm's fused rescaling on the CPU: for each group, the row and column energies of every
// counted tensor, the coefficients d, then every tensor of the group rescaled in place.
//
// Energies are summed per channel by one task in a fixed order (outer index, then inner), so
// coefficients are bit-identical across runs and thread counts. The formulas are in
// csrc/shared/enorm_math.h; the program format in csrc/enorm_plan.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "enorm_plan.h"
#include "shared/enorm_math.h"

namespace equinorm {
namespace cpu {
namespace {

namespace em = equinorm::math;

constexpr int64_t kTaskValues = 1 << 14;

// energy[j] += sum over the values of channel j of |v|^p, for channels [begin, end).
template <typename scalar_t>
void add_channel_energies(const scalar_t* data, const RescaleEntry& e, double p, int64_t begin, int64_t end,
                          double* energy) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t exponent = static_cast<acc_t>(p);
  std::vector<acc_t> sums(end - begin, acc_t(0));
  for (int64_t group = begin / e.channels_per_group; group * e.channels_per_group < end; ++group) {
    const int64_t first = std::max(begin, group * e.channels_per_group);
    const int64_t last = std::min(end, (group + 1) * e.channels_per_group);
    for (int64_t o = group * e.outer_per_group(); o < (group + 1) * e.outer_per_group(); ++o) {
      for (int64_t j = first; j < last; ++j) {
        const scalar_t* values = data + o * e.outer_stride + (j - group * e.channels_per_group) * e.channel_stride;
        acc_t sum = 0;
        for (int64_t t = 0; t < e.inner; ++t) sum += em::energy_term(static_cast<acc_t>(values[t * e.inner_stride]), exponent);
        sums[j - begin] += sum;
      }
    }
  }
  for (int64_t j = begin; j < end; ++j) energy[j] += static_cast<double>(sums[j - begin]);
}

void add_energies(const at::Tensor& t, const RescaleEntry& e, double p, double* energy) {
  // A rows entry is one channel per outer index; columns read across the outer index.
  const int64_t values_per_channel = e.columns ? e.outer_per_group() * e.inner : e.inner;
  const int64_t grain = std::max<int64_t>(1, kTaskValues / values_per_channel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "enorm_energy_cpu", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    at::parallel_for(0, e.channels(), grain, [&](int64_t begin, int64_t end) {
      if (e.columns) {
        add_channel_energies(data, e, p, begin, end, energy);
      } else {
        RescaleEntry as_channels = e;  // rows: outer index o is channel o
        as_channels.outer = 1;
        as_channels.channels_per_group = e.outer;
        as_channels.channel_stride = e.outer_stride;
        add_channel_energies(data, as_channels, p, begin, end, energy);
      }
    });
  });
}

// t[o, j, :] *= factor[j] (columns) or t[j, ...] *= factor[j] (rows).
void rescale(at::Tensor& t, const RescaleEntry& e, const std::vector<double>& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "enorm_rescale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> factor(d.size());
    for (size_t j = 0; j < d.size(); ++j) factor[j] = static_cast<acc_t>(em::coefficient_power(d[j], static_cast<int>(e.power)));
    scalar_t* data = t.mutable_data_ptr<scalar_t>();
    const int64_t values_per_outer = e.columns ? e.channels_per_group * e.inner : e.inner;
    at::parallel_for(0, e.outer, std::max<int64_t>(1, kTaskValues / values_per_outer), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        scalar_t* block = data + o * e.outer_stride;
        if (!e.columns) {
          for (int64_t t = 0; t < e.inner; ++t) block[t] = static_cast<scalar_t>(static_cast<acc_t>(block[t]) * factor[o]);
          continue;
        }
        const acc_t* channel_factor = factor.data() + (o / e.outer_per_group()) * e.channels_per_group;
        for (int64_t i = 0; i < e.channels_per_group; ++i) {
          scalar_t* values = block + i * e.channel_stride;
          for (int64_t t = 0; t < e.inner; ++t) {
            scalar_t& v = values[t * e.inner_stride];
            v = static_cast<scalar_t>(static_cast<acc_t>(v) * channel_factor[i]);
          }
        }
      }
    });
  });
}

// Balances one group in place; returns its coefficients d.
std::vector<double> balance_group(at::TensorList tensors, const std::vector<RescaleEntry>& group, double p, double c) {
  const int64_t channels = group.front().channels();
  std::vector<double> row_energy(channels, 0.0), column_energy(channels, 0.0);
  for (const auto& e : group) {
    if (e.counted) add_energies(tensors[e.tensor], e, p, (e.columns ? column_energy : row_energy).data());
  }
  std::vector<double> d(channels);
  for (int64_t j = 0; j < channels; ++j) d[j] = em::enorm_coefficient(row_energy[j], column_energy[j], p, c);
  for (const auto& e : group) {
    at::Tensor t = tensors[e.tensor];
    rescale(t, e, d);
  }
  return d;
}

void check_exponents(double p, double c) {
  TORCH_CHECK(std::isfinite(p) && p >= 1, "p must be a finite number >= 1, got ", p);
  TORCH_CHECK(std::isfinite(c) && c > 0, "c must be a positive finite number, got ", c);
}

at::Tensor enorm_group(at::TensorList tensors, c10::IntArrayRef entries, double p, double c) {
  check_exponents(p, c);
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const int64_t records = static_cast<int64_t>(entries.size()) / kEntryFields;
  const auto plan = decode_plan(tensors, entries, {records});
  const std::vector<double> d = balance_group(tensors, plan.front(), p, c);
  return at::tensor(d, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor enorm_cycle(at::TensorList tensors, c10::IntArrayRef entries, c10::IntArrayRef group_sizes, double p,
                       double c) {
  check_exponents(p, c);
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const auto plan = decode_plan(tensors, entries, group_sizes);
  std::vector<double> deviations;
  for (const auto& group : plan) {
    double deviation = 0;
    for (const double d : balance_group(tensors, group, p, c)) deviation = std::max(deviation, std::abs(d - 1));
    deviations.push_back(deviation);
  }
  return at::tensor(deviations, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CPU, m) {
  m.impl("enorm_group_", &enorm_group);
  m.impl("enorm_cycle_", &enorm_cycle);
}

}  // namespace cpu
}  // namespace equinorm
