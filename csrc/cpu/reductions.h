// Summation helpers of the CPU kernels: fixed evaluation orders, so every result is bit-identical
// across runs and thread counts (work is split by shape only, never by the number of threads).
#pragma once

#include <cmath>
#include <cstdint>

// A function also compiled for AVX2 and picked at load time on CPUs that have it (the package is
// built for the baseline x86-64 ISA). Kernels inline their row loops into such a function.
#if defined(__x86_64__) && defined(__GNUC__)
#define EQUINORM_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EQUINORM_AVX2_CLONES
#endif

namespace equinorm {
namespace cpu {

// Independent partial sums the compiler keeps in vector registers (several loads in flight).
constexpr int kLanes = 32;

template <int kWidth, typename acc_t>
inline acc_t combine_lanes(acc_t (&lanes)[kWidth]) {
  for (int width = kWidth / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// The least of the lanes, folded as combine_lanes folds (vectorised): a running minimum across
// 32 lanes one at a time waits on every comparison, as long as summing a 256-value plane.
template <int kWidth, typename acc_t>
inline acc_t least_of_lanes(acc_t (&lanes)[kWidth]) {
  for (int width = kWidth / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] = lanes[j + width] < lanes[j] ? lanes[j + width] : lanes[j];
  }
  return lanes[0];
}

// sum of values[0 .. count), accumulated in acc_t in kWidth interleaved partial sums.
template <typename acc_t, int kWidth = kLanes, typename scalar_t>
inline acc_t contiguous_sum(const scalar_t* values, int64_t count) {
  acc_t lanes[kWidth] = {};
  int64_t i = 0;
  for (; i + kWidth <= count; i += kWidth) {
    for (int j = 0; j < kWidth; ++j) lanes[j] += static_cast<acc_t>(values[i + j]);
  }
  for (int j = 0; i < count; ++i, ++j) lanes[j] += static_cast<acc_t>(values[i]);
  return combine_lanes<kWidth>(lanes);
}

// contiguous_sum of |values|, in the same order (so equal to it, bit for bit, when no value is < 0);
// sets `negative` to 1 when some value is < 0 (-0.0 is not: its derivative sign counts as +1).
template <typename acc_t, int kWidth = kLanes, typename scalar_t>
inline acc_t contiguous_abs_sum(const scalar_t* values, int64_t count, uint8_t& negative) {
  acc_t lanes[kWidth] = {};
  acc_t lowest[kWidth] = {};
  int64_t i = 0;
  for (; i + kWidth <= count; i += kWidth) {
    for (int j = 0; j < kWidth; ++j) {
      const acc_t value = static_cast<acc_t>(values[i + j]);
      lanes[j] += std::abs(value);
      lowest[j] = value < lowest[j] ? value : lowest[j];
    }
  }
  for (int j = 0; i < count; ++i, ++j) {
    const acc_t value = static_cast<acc_t>(values[i]);
    lanes[j] += std::abs(value);
    lowest[j] = value < lowest[j] ? value : lowest[j];
  }
  negative = least_of_lanes<kWidth>(lowest) < 0 ? 1 : 0;
  return combine_lanes<kWidth>(lanes);
}

// least[j] = min(least[j], values[j]) for j in [0, count).
template <typename acc_t>
inline void lower_to(acc_t* least, const acc_t* values, int64_t count) {
  for (int64_t j = 0; j < count; ++j) least[j] = values[j] < least[j] ? values[j] : least[j];
}

// sums[j] += values[j] for j in [0, count): one row of a (rows, count) block added to a running sum.
template <typename acc_t, typename scalar_t>
inline void add_row(acc_t* sums, const scalar_t* values, int64_t count) {
  for (int64_t j = 0; j < count; ++j) sums[j] += static_cast<acc_t>(values[j]);
}

}  // namespace cpu
}  // namespace equinorm
