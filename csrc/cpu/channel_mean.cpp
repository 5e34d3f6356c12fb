// Channel statistics on the CPU: mu_c = mean of x[:rows] (or of |x[:rows]|, kAbs) over every dim
// but 1; with kAbs each task also notes whether its values had one < 0, and the channel's flag is
// the OR of its tasks'. |v| equals v for v >= 0, and both statistics add in the same order, so on
// non-negative inputs they give the same bits.
//
// NCHW: each (sample, channel) plane is summed by one task, then the planes of a channel are
// added in sample order; small planes are summed as columns instead (below). channels_last:
// positions are cut into chunks of a size fixed by the shape, each chunk accumulates a C-vector
// (contiguous, vectorised over channels), and the chunk sums are added in chunk order. Every
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

#include "cpu/reductions.h"
#include "op_checks.h"

namespace equinorm {
namespace cpu {
namespace {

// Elements one parallel task should at least touch, to amortise scheduling.
constexpr int64_t kTaskElements = 1 << 15;
// Elements one channels_last chunk covers: small enough that its per-channel sums stay accurate.
constexpr int64_t kChunkElements = 1 << 14;
constexpr int64_t kMaxChunkPositions = 1024;
// NCHW planes smaller than this are summed as columns of a (samples, C x spatial) matrix.
constexpr int64_t kSmallPlane = 128;
// Rows at least this wide are summed by blocks of kColumnBlock columns, one task each.
constexpr int64_t kWideRow = 4096;
constexpr int64_t kColumnBlock = 1024;

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

// add_row, or with kAbs add_abs_row noting negative values in `negative`.
template <bool kAbs, typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void add_statistic_row(acc_t* sums, uint8_t* negative, const scalar_t* values, int64_t count) {
  if constexpr (kAbs) {
    add_abs_row(sums, negative, values, count);
  } else {
    add_row(sums, values, count);
  }
}

// Column sums of a (rows, width) row-major matrix. Wide rows: tasks own blocks of columns and
// add every row into them. Narrow rows: rows are cut into chunks of a size fixed by the shape,
// each chunk adds its rows into its own width-vector, and the chunk sums are added in chunk
// order. Either way each column is summed in an order fixed by the shape, vectorised along rows.
// With kAbs, sums of magnitudes, and `negative` (width,) set where a column had a value < 0.
template <bool kAbs, typename scalar_t, typename acc_t>
std::vector<acc_t> column_totals(const scalar_t* x, int64_t rows, int64_t width, std::vector<uint8_t>& negative) {
  std::vector<acc_t> total(width, acc_t(0));
  negative.assign(kAbs ? width : 0, 0);
  if (width >= kWideRow) {
    at::parallel_for(0, width, kColumnBlock, [&](int64_t begin, int64_t end) {
      for (int64_t row = 0; row < rows; ++row) {
        add_statistic_row<kAbs>(total.data() + begin, negative.data() + begin, x + row * width + begin, end - begin);
      }
    });
    return total;
  }
  const int64_t chunk = std::clamp<int64_t>(kChunkElements / width, 1, kMaxChunkPositions);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<acc_t> chunk_sums(chunks * width, acc_t(0));
  std::vector<uint8_t> chunk_negative(kAbs ? chunks * width : 0, 0);
  const int64_t grain = std::max<int64_t>(1, kTaskElements / (chunk * width));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* sums = chunk_sums.data() + k * width;
      uint8_t* flags = kAbs ? chunk_negative.data() + k * width : nullptr;
      for (int64_t row = k * chunk; row < std::min(rows, (k + 1) * chunk); ++row) {
        add_statistic_row<kAbs>(sums, flags, x + row * width, width);
      }
    }
  });
  for (int64_t k = 0; k < chunks; ++k) {
    add_row(total.data(), chunk_sums.data() + k * width, width);
    if constexpr (kAbs) {
      for (int64_t j = 0; j < width; ++j) negative[j] |= chunk_negative[k * width + j];
    }
  }
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
