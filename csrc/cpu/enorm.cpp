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
#include <type_traits>

#include "enorm_plan.h"
#include "shared/enorm_math.h"

namespace equinorm {
namespace cpu {
namespace {

namespace em = equinorm::math;

constexpr int64_t kTaskValues = 1 << 14;

// |v|^p with the exponent's kind fixed at compile time, so the inner loops vectorise.
enum class Exponent { kOne, kTwo, kOther };

template <Exponent kind, typename acc_t>
inline acc_t energy_of(acc_t v, acc_t p) {
  if constexpr (kind == Exponent::kTwo) return v * v;
  else if constexpr (kind == Exponent::kOne) return v < 0 ? -v : v;
  else return em::energy_term(v, p);
}

template <typename Body>
void with_exponent(double p, Body&& body) {
  if (p == 2) body(std::integral_constant<Exponent, Exponent::kTwo>());
  else if (p == 1) body(std::integral_constant<Exponent, Exponent::kOne>());
  else body(std::integral_constant<Exponent, Exponent::kOther>());
}

// Calls visit(i, offset) for the values of channels [first, last) of one outer index, walking
// memory in order: channels inner when they are adjacent (Linear, channels_last), taps inner
// otherwise. Channel i is relative to `first`.
template <typename Visit>
inline void for_each_in_block(const RescaleEntry& e, int64_t first, int64_t last, Visit&& visit) {
  if (e.channel_stride == 1) {
    for (int64_t t = 0; t < e.inner; ++t)
#pragma omp simd
      for (int64_t j = first; j < last; ++j) visit(j - first, j + t * e.inner_stride);
  } else {
    for (int64_t j = first; j < last; ++j)
#pragma omp simd
      for (int64_t t = 0; t < e.inner; ++t) visit(j - first, j * e.channel_stride + t * e.inner_stride);
  }
}

// energy[j] += sum over the values of channel j of |v|^p, for channels [begin, end) of a columns
// entry; the order of the terms of each channel depends on the shape only.
template <Exponent kind, typename scalar_t>
void add_column_energies(const scalar_t* data, const RescaleEntry& e, double p, int64_t begin, int64_t end,
                         double* energy) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t exponent = static_cast<acc_t>(p);
  std::vector<acc_t> sums(end - begin, acc_t(0));
  for (int64_t group = begin / e.channels_per_group; group * e.channels_per_group < end; ++group) {
    const int64_t base = group * e.channels_per_group;
    const int64_t first = std::max(begin, base) - base, last = std::min(end, base + e.channels_per_group) - base;
    acc_t* group_sums = sums.data() + (base + first - begin);
    for (int64_t o = group * e.outer_per_group(); o < (group + 1) * e.outer_per_group(); ++o) {
      const scalar_t* block = data + o * e.outer_stride;
      for_each_in_block(e, first, last, [&](int64_t i, int64_t offset) {
        group_sums[i] += energy_of<kind>(static_cast<acc_t>(block[offset]), exponent);
      });
    }
  }
  for (int64_t j = begin; j < end; ++j) energy[j] += static_cast<double>(sums[j - begin]);
}

// energy[o] += sum of |v|^p over row o, for rows [begin, end) of a rows entry.
template <Exponent kind, typename scalar_t>
void add_row_energies(const scalar_t* data, const RescaleEntry& e, double p, int64_t begin, int64_t end,
                      double* energy) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t exponent = static_cast<acc_t>(p);
  for (int64_t o = begin; o < end; ++o) {
    const scalar_t* row = data + o * e.outer_stride;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < e.inner; ++t) sum += energy_of<kind>(static_cast<acc_t>(row[t]), exponent);
    energy[o] += static_cast<double>(sum);
  }
}

void add_energies(const at::Tensor& t, const RescaleEntry& e, double p, double* energy) {
  const int64_t values_per_channel = e.columns ? e.outer_per_group() * e.inner : e.inner;
  const int64_t grain = std::max<int64_t>(1, kTaskValues / values_per_channel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "enorm_energy_cpu", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    with_exponent(p, [&](auto kind) {
      at::parallel_for(0, e.channels(), grain, [&](int64_t begin, int64_t end) {
        if (e.columns) {
          add_column_energies<decltype(kind)::value>(data, e, p, begin, end, energy);
        } else {
          add_row_energies<decltype(kind)::value>(data, e, p, begin, end, energy);
        }
      });
    });
  });
}

// t[o, j, :] *= factor[j] (columns) or t[o, ...] *= factor[o] (rows), for outer indices [begin, end).
template <typename scalar_t, typename acc_t>
void rescale_blocks(scalar_t* data, const RescaleEntry& e, const acc_t* factor, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    scalar_t* block = data + o * e.outer_stride;
    if (!e.columns) {
      const acc_t f = factor[o];
#pragma omp simd
      for (int64_t t = 0; t < e.inner; ++t) block[t] = static_cast<scalar_t>(static_cast<acc_t>(block[t]) * f);
      continue;
    }
    const acc_t* channel_factor = factor + (o / e.outer_per_group()) * e.channels_per_group;
    for_each_in_block(e, 0, e.channels_per_group, [&](int64_t j, int64_t offset) {
      block[offset] = static_cast<scalar_t>(static_cast<acc_t>(block[offset]) * channel_factor[j]);
    });
  }
}

// Multiplies t along the entry's axis by d^power.
void rescale(at::Tensor& t, const RescaleEntry& e, const std::vector<double>& d) {
  const int64_t values_per_outer = e.columns ? e.channels_per_group * e.inner : e.inner;
  const int64_t grain = std::max<int64_t>(1, kTaskValues / values_per_outer);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "enorm_rescale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> factor(d.size());
    for (size_t j = 0; j < d.size(); ++j) factor[j] = static_cast<acc_t>(em::coefficient_power(d[j], static_cast<int>(e.power)));
    scalar_t* data = t.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, e.outer, grain, [&](int64_t begin, int64_t end) {
      rescale_blocks(data, e, factor.data(), begin, end);
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
