// Summation helpers of the CPU kernels: fixed evaluation orders, so every result is bit-identical
// across runs and thread counts (work is split by shape only, never by the number of threads).
#pragma once

#include <cstdint>

namespace equinorm {
namespace cpu {

// Independent partial sums the compiler keeps in vector registers.
constexpr int kLanes = 32;

template <typename acc_t>
inline acc_t combine_lanes(acc_t (&lanes)[kLanes]) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// sum of values[0 .. count), accumulated in acc_t.
template <typename acc_t, typename scalar_t>
inline acc_t contiguous_sum(const scalar_t* values, int64_t count) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(values[i + j]);
  }
  for (int j = 0; i < count; ++i, ++j) lanes[j] += static_cast<acc_t>(values[i]);
  return combine_lanes(lanes);
}

// sums[j] += values[j] for j in [0, count): one row of a (rows, count) block added to a running sum.
template <typename acc_t, typename scalar_t>
inline void add_row(acc_t* sums, const scalar_t* values, int64_t count) {
  for (int64_t j = 0; j < count; ++j) sums[j] += static_cast<acc_t>(values[j]);
}

}  // namespace cpu
}  // namespace equinorm
