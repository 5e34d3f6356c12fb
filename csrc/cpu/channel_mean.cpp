// Channel statistics on the CPU: mu_c = mean of x[:rows] (or of |x[:rows]|, kAbs) over every dim
// but 1; with kAbs each task also notes whether its values had one < 0, and the channel's flag is
// the OR of its tasks'. |v| equals v for v >= 0, and both statistics add in the same order, so on
// non-negative inputs they give the same bits.
//
// NCHW: each (sample, channel) plane is summed by one task, then the planes of a channel are
// added in sample order; small planes are summed as columns instead (below). channels_last: the
// column sums of a (positions, C) matrix, vectorised over channels (cpu/column_sums.h). Every
// split depends on the shape only, so the result does not depend on the thread count.
#include "cpu/channel_mean.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cpu/column_sums.h"
#include "cpu/reductions.h"
#include "op_checks.h"

namespace equinorm {
namespace cpu {
namespace {

// Elements one parallel task should at least touch, to amortise scheduling.
constexpr int64_t kTaskElements = 1 << 15;
// NCHW planes smaller than this are summed as columns of a (samples, C x spatial) matrix.
constexpr int64_t kSmallPlane = 128;

// sums[p] = sum of plane p of `spatial` values (of their magnitudes with kAbs, negative[p] then
// says whether one was < 0), for planes [begin, end).
template <bool kAbs, typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void plane_sums(const scalar_t* x, int64_t spatial, int64_t begin, int64_t end, acc_t* sums,
                                  uint8_t* negative) {
  for (int64_t plane = begin; plane < end; ++plane) {
    if constexpr (kAbs) {
      sums[plane] = contiguous_abs_sum<acc_t>(x + plane * spatial, spatial, negative[plane]);
    } else {
      sums[plane] = contiguous_sum<acc_t>(x + plane * spatial, spatial);
    }
  }
}

// Float planes, the common case, also for AVX2; the lanes are explicit, so both versions add in
// the same order and give identical results.
template <bool kAbs>
EQUINORM_AVX2_CLONES void float_plane_sums(const float* x, int64_t spatial, int64_t begin, int64_t end, float* sums,
                                           uint8_t* negative) {
  plane_sums<kAbs>(x, spatial, begin, end, sums, negative);
}

template <bool kAbs, typename scalar_t, typename acc_t>
void planar_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  const int64_t planes = g.rows * g.channels;
  std::vector<acc_t> sums(planes);
  std::vector<uint8_t> plane_negative(kAbs ? planes : 0);
  const int64_t grain = std::max<int64_t>(1, kTaskElements / g.spatial);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      float_plane_sums<kAbs>(x, g.spatial, begin, end, sums.data(), plane_negative.data());
    } else {
      plane_sums<kAbs>(x, g.spatial, begin, end, sums.data(), plane_negative.data());
    }
  });
  const acc_t count = static_cast<acc_t>(g.rows) * static_cast<acc_t>(g.spatial);
  for (int64_t c = 0; c < g.channels; ++c) {
    acc_t sum = 0;
    for (int64_t n = 0; n < g.rows; ++n) sum += sums[n * g.channels + c];
    mean[c] = sum / count;
    if constexpr (kAbs) {
      uint8_t any = 0;
      for (int64_t n = 0; n < g.rows; ++n) any |= plane_negative[n * g.channels + c];
      negative[c] = any != 0;
    }
  }
}

// The column sums of a (rows, width) row-major matrix (of |x| for kAbs, `negative` then set per
// column that had a value < 0).
template <bool kAbs, typename scalar_t, typename acc_t>
std::vector<acc_t> column_totals(const scalar_t* x, int64_t rows, int64_t width, std::vector<uint8_t>& negative) {
  std::vector<acc_t> total(width);
  negative.resize(kAbs ? width : 0);
  columns::column_sums<kAbs>(x, rows, width, total.data(), negative.data());
  return total;
}

// channels_last: one C-vector per (sample, position).
template <bool kAbs, typename scalar_t, typename acc_t>
void channels_last_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  const int64_t positions = g.rows * g.spatial;
  std::vector<uint8_t> column_negative;
  const std::vector<acc_t> total = column_totals<kAbs, scalar_t, acc_t>(x, positions, g.channels, column_negative);
  for (int64_t c = 0; c < g.channels; ++c) {
    mean[c] = total[c] / static_cast<acc_t>(positions);
    if constexpr (kAbs) negative[c] = column_negative[c] != 0;
  }
}

// NCHW with small planes (7x7, 14x14): a sample is one row of C x spatial values; summing rows
// column-wise is fully vectorised, and each channel's spatial columns are added at the end.
template <bool kAbs, typename scalar_t, typename acc_t>
void small_plane_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  std::vector<uint8_t> column_negative;
  const std::vector<acc_t> total =
      column_totals<kAbs, scalar_t, acc_t>(x, g.rows, g.channels * g.spatial, column_negative);
  const acc_t count = static_cast<acc_t>(g.rows) * static_cast<acc_t>(g.spatial);
  for (int64_t c = 0; c < g.channels; ++c) {
    acc_t sum = 0;
    for (int64_t s = 0; s < g.spatial; ++s) sum += total[c * g.spatial + s];
    mean[c] = sum / count;
    if constexpr (kAbs) {
      uint8_t any = 0;
      for (int64_t s = 0; s < g.spatial; ++s) any |= column_negative[c * g.spatial + s];
      negative[c] = any != 0;
    }
  }
}

template <bool kAbs, typename scalar_t, typename acc_t>
void statistic_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  if (g.channels_last) {
    channels_last_means<kAbs>(x, g, mean, negative);
  } else if (g.spatial < kSmallPlane) {
    small_plane_means<kAbs>(x, g, mean, negative);
  } else {
    planar_means<kAbs>(x, g, mean, negative);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_mean(const at::Tensor& x, int64_t rows, c10::string_view statistic) {
  const bool abs_statistic = parse_abs_statistic(statistic);
  auto [readable, geometry] = channel_input(x, rows);
  TORCH_CHECK(readable.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  auto mean = at::empty({geometry.channels}, x.options().dtype(accumulation_type(x.scalar_type())));
  auto negative = at::empty({abs_statistic ? geometry.channels : 0}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = readable.const_data_ptr<scalar_t>();
    acc_t* means = mean.mutable_data_ptr<acc_t>();
    if (abs_statistic) {
      statistic_means<true>(data, geometry, means, negative.mutable_data_ptr<bool>());
    } else {
      statistic_means<false>(data, geometry, means, nullptr);
    }
  });
  return {mean, negative};
}

TORCH_LIBRARY_IMPL(equinorm_kernels, CPU, m) {
  m.impl("channel_mean", &channel_mean);
}

}  // namespace cpu
}  // namespace equinorm
