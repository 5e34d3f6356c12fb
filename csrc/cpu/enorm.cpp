// ENorm's fused rescaling on the CPU: for each group, the row and column energies of every
// counted tensor, the coefficients d, then every tensor of the group rescaled in place.
//
// Every split of the work (rows per task, chunks of column sums) depends on the shape only and
// partial sums are added in a fixed order, so coefficients are bit-identical across runs and
// thread counts. In a cycle, the pass that scales a weight's columns also sums its new row
// energies for the next group. The formulas are in csrc/shared/enorm_math.h; the program format
// in csrc/enorm_plan.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "cpu/reductions.h"
#include "enorm_plan.h"
#include "shared/enorm_math.h"

namespace equinorm {
namespace cpu {
namespace {

namespace em = equinorm::math;

constexpr int64_t kTaskValues = 1 << 14;
// Column energies are summed in at most this many chunks per conv group: their partial sums are
// added serially, so more chunks than threads can use only add work.
constexpr int64_t kMaxColumnChunks = 16;

using em::Exponent;

// Runs body with the exponent's kind as a compile-time constant, so the inner loops vectorise.
template <typename Body>
void with_exponent(double p, Body&& body) {
  switch (em::exponent_kind(p)) {
    case Exponent::kTwo: return body(std::integral_constant<Exponent, Exponent::kTwo>());
    case Exponent::kOne: return body(std::integral_constant<Exponent, Exponent::kOne>());
    default: return body(std::integral_constant<Exponent, Exponent::kOther>());
  }
}

// Every entry's view is a run of contiguous blocks, one per outer index o, of block_size(e)
// values in the same channel pattern: the kernels stream over blocks and look up each value's
// channel (columns) in a table built once per call, so every inner loop is contiguous.
int64_t block_size(const RescaleEntry& e) { return e.columns ? e.channels_per_group * e.inner : e.inner; }

// The channel (within its group) of every value of a columns block.
std::vector<int64_t> channel_of_value(const RescaleEntry& e) {
  std::vector<int64_t> channel(block_size(e));
  for (int64_t i = 0; i < e.channels_per_group; ++i)
    for (int64_t t = 0; t < e.inner; ++t) channel[i * e.channel_stride + t * e.inner_stride] = i;
  return channel;
}

// Lanes of a row's energy sum: independent partial sums in vector registers.
template <typename acc_t>
constexpr int kEnergyLanes = 64 / static_cast<int>(sizeof(acc_t));

// sum of |v|^p over one contiguous row, in kEnergyLanes interleaved partial sums.
template <Exponent kind, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t row_energy(const scalar_t* row, int64_t size, acc_t exponent) {
  constexpr int kWidth = kEnergyLanes<acc_t>;
  acc_t lanes[kWidth] = {};
  int64_t t = 0;
  for (; t + kWidth <= size; t += kWidth) {
#pragma omp simd
    for (int j = 0; j < kWidth; ++j) lanes[j] += em::energy_term_of<kind>(static_cast<acc_t>(row[t + j]), exponent);
  }
  for (int j = 0; t < size; ++t, ++j) lanes[j] += em::energy_term_of<kind>(static_cast<acc_t>(row[t]), exponent);
  return combine_lanes<kWidth>(lanes);
}

// partial[k] = sum over blocks [first, last) of |block[k]|^p.
template <Exponent kind, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void block_energies(const scalar_t* data, int64_t size, int64_t first, int64_t last, acc_t exponent,
                                      acc_t* partial) {
  std::fill(partial, partial + size, acc_t(0));
  for (int64_t o = first; o < last; ++o) {
    const scalar_t* block = data + o * size;
#pragma omp simd
    for (int64_t k = 0; k < size; ++k) partial[k] += em::energy_term_of<kind>(static_cast<acc_t>(block[k]), exponent);
  }
}

template <Exponent kind, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void row_energies(const scalar_t* data, int64_t size, int64_t first, int64_t last, acc_t exponent,
                                    double* energy) {
  for (int64_t o = first; o < last; ++o) energy[o] += static_cast<double>(row_energy<kind>(data + o * size, size, exponent));
}

// Float rows also compiled for AVX2 (picked at load time); other dtypes take the templates.
template <Exponent kind>
EQUINORM_AVX2_CLONES void float_block_energies(const float* data, int64_t size, int64_t first, int64_t last,
                                               double exponent, double* partial) {
  block_energies<kind>(data, size, first, last, exponent, partial);
}

template <Exponent kind>
EQUINORM_AVX2_CLONES void float_row_energies(const float* data, int64_t size, int64_t first, int64_t last,
                                             double exponent, double* energy) {
  row_energies<kind>(data, size, first, last, exponent, energy);
}

template <Exponent kind, typename scalar_t, typename acc_t>
void add_row_energies(const scalar_t* data, const RescaleEntry& e, acc_t exponent, double* energy) {
  const int64_t size = block_size(e), grain = std::max<int64_t>(1, kTaskValues / size);
  at::parallel_for(0, e.outer, grain, [&](int64_t first, int64_t last) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      float_row_energies<kind>(data, size, first, last, exponent, energy);
    } else {
      row_energies<kind>(data, size, first, last, exponent, energy);
    }
  });
}

// Column energies: the blocks of each group are cut into chunks of a size fixed by the shape;
// each chunk sums its blocks value by value into its own partial block, then the partials are
// added in chunk order and folded onto the channels: independent of the thread count.
template <Exponent kind, typename scalar_t, typename acc_t>
void add_column_energies(const scalar_t* data, const RescaleEntry& e, acc_t exponent, double* energy) {
  const int64_t size = block_size(e), per_group = e.outer_per_group();
  const int64_t at_least = std::max<int64_t>((per_group + kMaxColumnChunks - 1) / kMaxColumnChunks, kTaskValues / size);
  const int64_t chunk_blocks = std::clamp<int64_t>(at_least, 1, per_group);
  const int64_t chunks_per_group = (per_group + chunk_blocks - 1) / chunk_blocks;
  std::vector<acc_t> partial(e.groups * chunks_per_group * size);
  at::parallel_for(0, e.groups * chunks_per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t group = chunk / chunks_per_group, first = group * per_group + (chunk % chunks_per_group) * chunk_blocks;
      const int64_t last = std::min(first + chunk_blocks, (group + 1) * per_group);
      acc_t* sums = partial.data() + chunk * size;
      if constexpr (std::is_same_v<scalar_t, float>) {
        float_block_energies<kind>(data, size, first, last, exponent, sums);
      } else {
        block_energies<kind>(data, size, first, last, exponent, sums);
      }
    }
  });
  const std::vector<int64_t> channel = channel_of_value(e);
  for (int64_t group = 0; group < e.groups; ++group) {
    acc_t* total = partial.data() + group * chunks_per_group * size;
    for (int64_t chunk = 1; chunk < chunks_per_group; ++chunk) add_row(total, total + chunk * size, size);
    double* group_energy = energy + group * e.channels_per_group;
    for (int64_t k = 0; k < size; ++k) group_energy[channel[k]] += static_cast<double>(total[k]);
  }
}

void add_energies(const at::Tensor& t, const RescaleEntry& e, double p, double* energy) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "enorm_energy_cpu", [&] {
    using acc_t = em::energy_math_t;
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    with_exponent(p, [&](auto kind) {
      constexpr Exponent kKind = decltype(kind)::value;
      if (e.columns) {
        add_column_energies<kKind>(data, e, static_cast<acc_t>(p), energy);
      } else {
        add_row_energies<kKind>(data, e, static_cast<acc_t>(p), energy);
      }
    });
  });
}

// block[k] *= factor[k] for blocks [first, last); factor holds one block's factors per group.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void scale_blocks(scalar_t* data, int64_t size, int64_t per_group, const acc_t* factor, int64_t first,
                                    int64_t last) {
  for (int64_t o = first; o < last; ++o) {
    scalar_t* block = data + o * size;
    const acc_t* f = factor + (o / per_group) * size;
#pragma omp simd
    for (int64_t k = 0; k < size; ++k) block[k] = static_cast<scalar_t>(static_cast<acc_t>(block[k]) * f[k]);
  }
}

// block *= factor[o] for blocks [first, last).
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void scale_rows(scalar_t* data, int64_t size, const acc_t* factor, int64_t first, int64_t last) {
  for (int64_t o = first; o < last; ++o) {
    scalar_t* row = data + o * size;
    const acc_t f = factor[o];
#pragma omp simd
    for (int64_t t = 0; t < size; ++t) row[t] = static_cast<scalar_t>(static_cast<acc_t>(row[t]) * f);
  }
}

EQUINORM_AVX2_CLONES void float_scale_blocks(float* data, int64_t size, int64_t per_group, const double* factor,
                                             int64_t first, int64_t last) {
  scale_blocks(data, size, per_group, factor, first, last);
}

EQUINORM_AVX2_CLONES void float_scale_rows(float* data, int64_t size, const double* factor, int64_t first, int64_t last) {
  scale_rows(data, size, factor, first, last);
}

// Scales one block (block[k] *= f[k]) and returns sum |new value|^p, the lanes as row_energy's,
// so the sum is the one row_energy would compute from the stored values.
template <Exponent kind, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t scale_block_summing_energy(scalar_t* block, const acc_t* f, int64_t size, acc_t exponent) {
  constexpr int kWidth = kEnergyLanes<acc_t>;
  acc_t lanes[kWidth] = {};
  int64_t k = 0;
  for (; k + kWidth <= size; k += kWidth) {
#pragma omp simd
    for (int j = 0; j < kWidth; ++j) {
      const scalar_t value = static_cast<scalar_t>(static_cast<acc_t>(block[k + j]) * f[k + j]);
      block[k + j] = value;
      lanes[j] += em::energy_term_of<kind>(static_cast<acc_t>(value), exponent);
    }
  }
  for (int j = 0; k < size; ++k, ++j) {
    const scalar_t value = static_cast<scalar_t>(static_cast<acc_t>(block[k]) * f[k]);
    block[k] = value;
    lanes[j] += em::energy_term_of<kind>(static_cast<acc_t>(value), exponent);
  }
  return combine_lanes<kWidth>(lanes);
}

template <Exponent kind, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void scale_blocks_summing_energies(scalar_t* data, int64_t size, int64_t per_group, const acc_t* factor,
                                                     int64_t first, int64_t last, acc_t exponent, double* energy) {
  for (int64_t o = first; o < last; ++o) {
    const acc_t sum = scale_block_summing_energy<kind>(data + o * size, factor + (o / per_group) * size, size, exponent);
    energy[o] += static_cast<double>(sum);
  }
}

template <Exponent kind>
EQUINORM_AVX2_CLONES void float_scale_blocks_summing_energies(float* data, int64_t size, int64_t per_group,
                                                              const double* factor, int64_t first, int64_t last,
                                                              double exponent, double* energy) {
  scale_blocks_summing_energies<kind>(data, size, per_group, factor, first, last, exponent, energy);
}

// The factor of every value of a block, per group (columns), or of every row (rows): d^power.
template <typename acc_t>
std::vector<acc_t> value_factors(const RescaleEntry& e, const std::vector<double>& d) {
  const auto power = [&](int64_t j) { return static_cast<acc_t>(em::coefficient_power(d[j], static_cast<int>(e.power))); };
  if (!e.columns) {
    std::vector<acc_t> factor(e.outer);
    for (int64_t o = 0; o < e.outer; ++o) factor[o] = power(o);
    return factor;
  }
  const int64_t size = block_size(e);
  const std::vector<int64_t> channel = channel_of_value(e);
  std::vector<acc_t> factor(e.groups * size);
  for (int64_t group = 0; group < e.groups; ++group)
    for (int64_t k = 0; k < size; ++k) factor[group * size + k] = power(group * e.channels_per_group + channel[k]);
  return factor;
}

// Scales the values; with row_energy (columns entries only), also adds each row's sum of
// |new value|^p to it, in the same pass.
template <typename scalar_t>
void rescale_values(scalar_t* data, const RescaleEntry& e, const std::vector<double>& d, double p, double* row_energy) {
  using acc_t = em::energy_math_t;
  const int64_t size = block_size(e), grain = std::max<int64_t>(1, kTaskValues / size), per_group = e.outer_per_group();
  const std::vector<acc_t> factor = value_factors<acc_t>(e, d);
  const acc_t* f = factor.data();
  if (row_energy != nullptr) {
    with_exponent(p, [&](auto kind) {
      constexpr Exponent kKind = decltype(kind)::value;
      const acc_t exponent = static_cast<acc_t>(p);
      at::parallel_for(0, e.outer, grain, [&](int64_t first, int64_t last) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          float_scale_blocks_summing_energies<kKind>(data, size, per_group, f, first, last, exponent, row_energy);
        } else {
          scale_blocks_summing_energies<kKind>(data, size, per_group, f, first, last, exponent, row_energy);
        }
      });
    });
    return;
  }
  at::parallel_for(0, e.outer, grain, [&](int64_t first, int64_t last) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (e.columns) float_scale_blocks(data, size, per_group, f, first, last);
      else float_scale_rows(data, size, f, first, last);
    } else {
      if (e.columns) scale_blocks(data, size, per_group, f, first, last);
      else scale_rows(data, size, f, first, last);
    }
  });
}

// Multiplies t along the entry's axis by d^power (and sums its new row energies, see above).
void rescale(at::Tensor& t, const RescaleEntry& e, const std::vector<double>& d, double p, double* row_energy) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "enorm_rescale_cpu", [&] {
    rescale_values(t.mutable_data_ptr<scalar_t>(), e, d, p, row_energy);
  });
}

// Row energies one group's rescale already summed for the next group, by tensor index. A weight
// is a consumer of one group and a producer of the next: the pass that scales its columns also
// sums its new rows, and the next group reads the weight once less.
using KnownRowEnergies = std::unordered_map<int64_t, std::vector<double>>;

int64_t entries_of_tensor(const std::vector<RescaleEntry>& group, int64_t tensor) {
  return std::count_if(group.begin(), group.end(), [&](const RescaleEntry& e) { return e.tensor == tensor; });
}

// Whether rescaling e (of `group`) should sum the row energies `next` counts: e scales columns,
// and its tensor is touched by no other entry of this group and only as counted rows by the next.
bool feeds_next_rows(const RescaleEntry& e, const std::vector<RescaleEntry>& group, const std::vector<RescaleEntry>* next) {
  if (!e.columns || next == nullptr || entries_of_tensor(group, e.tensor) != 1 || entries_of_tensor(*next, e.tensor) != 1)
    return false;
  return std::any_of(next->begin(), next->end(),
                     [&](const RescaleEntry& r) { return r.tensor == e.tensor && !r.columns && r.counted; });
}

// Balances one group in place; returns its coefficients d. `known` holds row energies summed by
// the previous group's rescale (taken, then cleared); `next` (if any) is the group after this one,
// whose row energies this group's rescale then sums into `known`.
std::vector<double> balance_group(at::TensorList tensors, const std::vector<RescaleEntry>& group, double p, double c,
                                  KnownRowEnergies& known, const std::vector<RescaleEntry>* next) {
  const int64_t channels = group.front().channels();
  std::vector<double> row_energy(channels, 0.0), column_energy(channels, 0.0);
  for (const auto& e : group) {
    if (!e.counted) continue;
    const auto summed = e.columns ? known.end() : known.find(e.tensor);
    if (summed == known.end()) {
      add_energies(tensors[e.tensor], e, p, (e.columns ? column_energy : row_energy).data());
    } else {
      for (int64_t o = 0; o < channels; ++o) row_energy[o] += summed->second[o];
    }
  }
  known.clear();
  std::vector<double> d(channels);
  for (int64_t j = 0; j < channels; ++j) d[j] = em::enorm_coefficient(row_energy[j], column_energy[j], p, c);
  for (const auto& e : group) {
    at::Tensor t = tensors[e.tensor];
    double* sums = nullptr;
    if (feeds_next_rows(e, group, next)) sums = known.try_emplace(e.tensor, e.outer, 0.0).first->second.data();
    rescale(t, e, d, p, sums);
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
  KnownRowEnergies none;
  const std::vector<double> d = balance_group(tensors, plan.front(), p, c, none, nullptr);
  return at::tensor(d, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor enorm_cycle(at::TensorList tensors, c10::IntArrayRef entries, c10::IntArrayRef group_sizes, double p,
                       double c) {
  check_exponents(p, c);
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const auto plan = decode_plan(tensors, entries, group_sizes);
  std::vector<double> deviations;
  KnownRowEnergies known;
  for (size_t k = 0; k < plan.size(); ++k) {
    const auto* next = k + 1 < plan.size() ? &plan[k + 1] : nullptr;
    double deviation = 0;
    for (const double d : balance_group(tensors, plan[k], p, c, known, next)) deviation = std::max(deviation, std::abs(d - 1));
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
