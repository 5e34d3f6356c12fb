// Channel statistics on the CPU: mu_c = mean of x[:rows] over every dim but 1.
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

// sums[p] = sum of plane p of `spatial` values, for planes [begin, end).
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void plane_sums(const scalar_t* x, int64_t spatial, int64_t begin, int64_t end, acc_t* sums) {
  for (int64_t plane = begin; plane < end; ++plane) sums[plane] = contiguous_sum<acc_t>(x + plane * spatial, spatial);
}

// Float planes, the common case, also for AVX2; the lanes are explicit, so both versions add in
// the same order and give identical results.
EQUINORM_AVX2_CLONES void float_plane_sums(const float* x, int64_t spatial, int64_t begin, int64_t end, float* sums) {
  plane_sums(x, spatial, begin, end, sums);
}

template <typename scalar_t, typename acc_t>
void planar_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean) {
  const int64_t planes = g.rows * g.channels;
  std::vector<acc_t> sums(planes);
  const int64_t grain = std::max<int64_t>(1, kTaskElements / g.spatial);
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      float_plane_sums(x, g.spatial, begin, end, sums.data());
    } else {
      plane_sums(x, g.spatial, begin, end, sums.data());
    }
  });
  const acc_t count = static_cast<acc_t>(g.rows) * static_cast<acc_t>(g.spatial);
  for (int64_t c = 0; c < g.channels; ++c) {
    acc_t sum = 0;
    for (int64_t n = 0; n < g.rows; ++n) sum += sums[n * g.channels + c];
    mean[c] = sum / count;
  }
}

// Column sums of a (rows, width) row-major matrix. Wide rows: tasks own blocks of columns and
// add every row into them. Narrow rows: rows are cut into chunks of a size fixed by the shape,
// each chunk adds its rows into its own width-vector, and the chunk sums are added in chunk
// order. Either way each column is summed in an order fixed by the shape, vectorised along rows.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> column_totals(const scalar_t* x, int64_t rows, int64_t width) {
  std::vector<acc_t> total(width, acc_t(0));
  if (width >= kWideRow) {
    at::parallel_for(0, width, kColumnBlock, [&](int64_t begin, int64_t end) {
      for (int64_t row = 0; row < rows; ++row) add_row(total.data() + begin, x + row * width + begin, end - begin);
    });
    return total;
  }
  const int64_t chunk = std::clamp<int64_t>(kChunkElements / width, 1, kMaxChunkPositions);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<acc_t> chunk_sums(chunks * width, acc_t(0));
  const int64_t grain = std::max<int64_t>(1, kTaskElements / (chunk * width));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* sums = chunk_sums.data() + k * width;
      for (int64_t row = k * chunk; row < std::min(rows, (k + 1) * chunk); ++row) add_row(sums, x + row * width, width);
    }
  });
  for (int64_t k = 0; k < chunks; ++k) add_row(total.data(), chunk_sums.data() + k * width, width);
  return total;
}

// channels_last: one C-vector per (sample, position).
template <typename scalar_t, typename acc_t>
void channels_last_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean) {
  const int64_t positions = g.rows * g.spatial;
  const std::vector<acc_t> total = column_totals<scalar_t, acc_t>(x, positions, g.channels);
  for (int64_t c = 0; c < g.channels; ++c) mean[c] = total[c] / static_cast<acc_t>(positions);
}

// NCHW with small planes (7x7, 14x14): a sample is one row of C x spatial values; summing rows
// column-wise is fully vectorised, and each channel's spatial columns are added at the end.
template <typename scalar_t, typename acc_t>
void small_plane_means(const scalar_t* x, const ChannelGeometry& g, acc_t* mean) {
  const std::vector<acc_t> total = column_totals<scalar_t, acc_t>(x, g.rows, g.channels * g.spatial);
  const acc_t count = static_cast<acc_t>(g.rows) * static_cast<acc_t>(g.spatial);
  for (int64_t c = 0; c < g.channels; ++c) {
    acc_t sum = 0;
    for (int64_t s = 0; s < g.spatial; ++s) sum += total[c * g.spatial + s];
    mean[c] = sum / count;
  }
}

}  // namespace

at::Tensor channel_mean(const at::Tensor& x, int64_t rows) {
  auto [readable, geometry] = channel_input(x, rows);
  TORCH_CHECK(readable.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  auto mean = at::empty({geometry.channels}, x.options().dtype(accumulation_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = readable.const_data_ptr<scalar_t>();
    if (geometry.channels_last) {
      channels_last_means(data, geometry, mean.mutable_data_ptr<acc_t>());
    } else if (geometry.spatial < kSmallPlane) {
      small_plane_means(data, geometry, mean.mutable_data_ptr<acc_t>());
    } else {
      planar_means(data, geometry, mean.mutable_data_ptr<acc_t>());
    }
  });
  return mean;
}

TORCH_LIBRARY_IMPL(equinorm_kernels, CPU, m) {
  m.impl("channel_mean", &channel_mean);
}

}  // namespace cpu
}  // namespace equinorm
