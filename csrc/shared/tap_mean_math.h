// Per-tap input statistics (tap_mean): which input positions a convolution's kernel tap reads,
// for the CPU and CUDA kernels alike.
//
// Along one spatial dim of length L, output o's tap t reads padded coordinate
// p = o * stride + t * dilation - before (p in [-before, L + after)). Padding maps p back to an
// input position (or to nothing, for zero padding). tap_reads(dim, t, j) is how many of the dim's
// output positions make tap t read input position j: the entry (t, j) of the dim's count matrix.
// The sum of x over the samples, S (C, *spatial), contracted with these matrices along every
// spatial dim, gives each tap's sum; the backward contracts with their transposes.
#pragma once

#include <cstdint>

#include "shared/host_device.h"

namespace equinorm {
namespace tap {

// The order is the one the glue parses padding_mode strings into.
enum PaddingMode : int { kZeros = 0, kReflect = 1, kReplicate = 2, kCircular = 3 };

// Kernels see three spatial dims; a Conv1d/2d input gets leading dims of length 1 (kernel 1).
constexpr int kDims = 3;

struct TapDim {
  int64_t length = 1;  // L
  int64_t kernel = 1;
  int64_t stride = 1;
  int64_t dilation = 1;
  int64_t before = 0;  // padding before and after
  int64_t after = 0;
  int64_t outputs = 1;  // output positions along the dim
};

EQUINORM_HOST_DEVICE int64_t output_positions(int64_t length, int64_t kernel, int64_t stride, int64_t dilation,
                                              int64_t before, int64_t after) {
  return (length + before + after - dilation * (kernel - 1) - 1) / stride + 1;
}

// How many of first, first + stride, ..., first + (outputs - 1) * stride lie in [low, high].
EQUINORM_HOST_DEVICE int64_t grid_points_in(int64_t low, int64_t high, int64_t first, int64_t stride,
                                            int64_t outputs) {
  const int64_t last = first + (outputs - 1) * stride;
  if (low < first) low = first;
  if (high > last) high = last;
  if (low > high) return 0;
  return (high - first) / stride - (low - first + stride - 1) / stride + 1;
}

EQUINORM_HOST_DEVICE int64_t grid_point_at(int64_t p, int64_t first, int64_t stride, int64_t outputs) {
  return grid_points_in(p, p, first, stride, outputs);
}

// Entry (t, j) of the dim's count matrix: the output positions at which tap t reads input j.
EQUINORM_HOST_DEVICE int64_t tap_reads(const TapDim& d, int mode, int64_t t, int64_t j) {
  const int64_t first = t * d.dilation - d.before;  // the padded coordinate output 0 reads
  const int64_t last_input = d.length - 1;
  int64_t reads = grid_point_at(j, first, d.stride, d.outputs);
  if (mode == kReflect) {  // p < 0 reads -p, p > L - 1 reads 2 (L - 1) - p (padding < L)
    if (j > 0) reads += grid_point_at(-j, first, d.stride, d.outputs);
    if (j < last_input) reads += grid_point_at(2 * last_input - j, first, d.stride, d.outputs);
  } else if (mode == kReplicate) {  // every p < 0 reads 0, every p > L - 1 reads L - 1
    if (j == 0) reads += grid_points_in(first, -1, first, d.stride, d.outputs);
    if (j == last_input) reads += grid_points_in(d.length, first + (d.outputs - 1) * d.stride, first, d.stride,
                                                 d.outputs);
  } else if (mode == kCircular) {  // p reads p mod L (padding <= L: one wrap at most)
    reads += grid_point_at(j - d.length, first, d.stride, d.outputs);
    reads += grid_point_at(j + d.length, first, d.stride, d.outputs);
  }
  return reads;
}

}  // namespace tap
}  // namespace equinorm
