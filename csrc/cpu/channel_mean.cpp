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
// NCHW planes smaller than kSmallPlane are summed as columns of a (samples, C x spatial) matrix,
// and so are planes smaller than kBlockedPlane (up to 22x22) of kBlockedRows samples or more: a
// lone sample's 14x14 planes sum faster one by one, a batch's as columns (a 16x16 plane alone
// costs its folds of 32 lanes as much as its adds). From 32x32 up the columns' sums of a block of
// channels outgrow the cache, and planes one by one are faster again.
constexpr int64_t kSmallPlane = 128;
constexpr int64_t kBlockedPlane = 512;
constexpr int64_t kBlockedRows = 4;

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

// channels_last: one C-vector per (sample, position), summed as the columns of a (positions / k,
// k x C) matrix, k positions to a row, and the k columns of each channel added at the end. Rows
// of a few channels would leave every running sum waiting on its previous add (a (32, 16, 32, 32)
// input summed 2.5x slower than in NCHW); rows of about kChannelsLastRow values stream like NCHW
// rows and take column_sums' unrolled path. The positions past the last full row are summed alone.
constexpr int64_t kChannelsLastRow = 1024;

template <bool kAbs, typename scalar_t, typename acc_t>
void channels_last_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  const int64_t positions = g.rows * g.spatial, channels = g.channels;
  int64_t per_row = std::max<int64_t>(1, kChannelsLastRow / channels);
  if (positions < 2 * per_row) per_row = 1;
  const int64_t wide_rows = positions / per_row, leftover = positions - wide_rows * per_row;
  std::vector<uint8_t> wide_negative, leftover_negative(kAbs ? channels : 0, uint8_t(0));
  const std::vector<acc_t> wide = column_totals<kAbs, scalar_t, acc_t>(x, wide_rows, per_row * channels, wide_negative);
  std::vector<acc_t> rest(channels, acc_t(0));
  if (leftover > 0) {
    rest = column_totals<kAbs, scalar_t, acc_t>(x + wide_rows * per_row * channels, leftover, channels,
                                                leftover_negative);
  }
  for (int64_t c = 0; c < channels; ++c) {
    acc_t total = 0;
    uint8_t any = 0;
    for (int64_t i = 0; i < per_row; ++i) {
      total += wide[i * channels + c];
      if constexpr (kAbs) any |= wide_negative[i * channels + c];
    }
    mean[c] = (total + rest[c]) / static_cast<acc_t>(positions);
    if constexpr (kAbs) negative[c] = (any | leftover_negative[c]) != 0;
  }
}

// sums[c] = the sum of row c of columns (channels, spatial), in column order. Eight channels at a
// time, each its own running sum: one sum at a time would wait on every add's latency.
template <typename acc_t>
C10_ALWAYS_INLINE void add_spatial_columns(const acc_t* columns, int64_t channels, int64_t spatial, acc_t* sums) {
  constexpr int64_t kChains = 8;
  int64_t c0 = 0;
  for (; c0 + kChains <= channels; c0 += kChains) {
    acc_t chain[kChains] = {};
    for (int64_t s = 0; s < spatial; ++s) {
      for (int64_t k = 0; k < kChains; ++k) chain[k] += columns[(c0 + k) * spatial + s];
    }
    for (int64_t k = 0; k < kChains; ++k) sums[c0 + k] = chain[k];
  }
  for (int64_t c = c0; c < channels; ++c) {
    acc_t sum = 0;
    for (int64_t s = 0; s < spatial; ++s) sum += columns[c * spatial + s];
    sums[c] = sum;
  }
}

// NCHW with small planes (7x7 to 22x22): a sample is one row of C x spatial values; summing rows
// column-wise is fully vectorised, and each channel's spatial columns are added at the end. Tasks
// take blocks of channels and do both, so a call wakes the other threads once and the columns'
// sums never leave the task; each column is summed as columns::column_sums sums it.
template <bool kAbs, typename scalar_t, typename acc_t>
void small_plane_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  const int64_t spatial = g.spatial, width = g.channels * spatial;
  const acc_t count = static_cast<acc_t>(g.rows) * static_cast<acc_t>(spatial);
  const int64_t block_channels = columns::channel_block(g.channels), block_size = block_channels * spatial;
  const int64_t blocks = (g.channels + block_channels - 1) / block_channels;
  const int64_t grain = std::max<int64_t>(1, kTaskElements / (g.rows * block_size));
  at::parallel_for(0, blocks, grain, [&](int64_t first_block, int64_t end_block) {
    std::vector<acc_t> total(block_size), partial(columns::block_sum_scratch(g.rows, width, block_size));
    std::vector<acc_t> least(kAbs ? block_size : 0);
    for (int64_t block = first_block; block < end_block; ++block) {
      const int64_t begin = block * block_channels, lanes = std::min(g.channels, begin + block_channels) - begin;
      std::fill(least.begin(), least.end(), acc_t(0));
      columns::block_column_sums<kAbs>(x, g.rows, width, begin * spatial, lanes * spatial, total.data(), least.data(),
                                       partial.data());
      add_spatial_columns(total.data(), lanes, spatial, mean + begin);
      for (int64_t c = 0; c < lanes; ++c) {
        mean[begin + c] /= count;
        if constexpr (kAbs) {
          negative[begin + c] = columns::had_negative(least.data() + c * spatial, spatial, 1);
        }
      }
    }
  });
}

template <bool kAbs, typename scalar_t, typename acc_t>
void statistic_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean, bool* negative) {
  if (g.channels_last) {
    channels_last_means<kAbs>(x, g, mean, negative);
  } else if (g.spatial < kSmallPlane || (g.spatial < kBlockedPlane && g.rows >= kBlockedRows)) {
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
