// Per-tap input statistics on the CPU (tap_mean and its backward; math in csrc/shared/tap_mean_math.h).
//
// Forward: one read of x[:rows], summed over the samples into S (C, *spatial) (|x| and a flag per
// channel that saw a negative value for abs_mean; a single NCHW sample's "mean" is read where it
// lies), then per channel S is contracted with each spatial dim's (kernel, length) count matrix in
// one read of S (see PeriodicCounts). Backward: the (C, *kernel) gradient contracted with the
// transposed matrices, a (C, *spatial) plane the caller broadcasts over the samples.
//
// x[:rows] is a (rows, C * spatial) matrix (NCHW) or (rows, spatial * C) (channels_last) with
// contiguous rows, summed by column as channel_mean's channels_last inputs are (cpu/column_sums.h):
// splits depend on the shape only, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/column_sums.h"
#include "cpu/reductions.h"
#include "op_checks.h"
#include "tap_geometry.h"

namespace equinorm {
namespace cpu {
namespace {

// Multiply-adds one task of the count-matrix contraction should at least do.
constexpr int64_t kContractionTaskWork = 1 << 20;

// The (kernel, length) count matrix of one dim, or its transpose (length, kernel).
template <typename acc_t>
std::vector<acc_t> count_matrix(const tap::TapDim& d, int mode, bool transposed) {
  std::vector<acc_t> matrix(d.kernel * d.length);
  for (int64_t t = 0; t < d.kernel; ++t) {
    for (int64_t j = 0; j < d.length; ++j) {
      const acc_t reads = static_cast<acc_t>(tap::tap_reads(d, mode, t, j));
      matrix[transposed ? j * d.kernel + t : t * d.length + j] = reads;
    }
  }
  return matrix;
}

// out (outer, rows_out, inner) = matrix (rows_out, rows_in) applied along the middle dim of
// in (outer, rows_in, inner); zero entries of the (sparse) count matrices are skipped.
template <typename acc_t>
void contract_middle(const acc_t* in, int64_t outer, int64_t rows_in, int64_t inner, const acc_t* matrix,
                     int64_t rows_out, acc_t* out) {
  std::fill(out, out + outer * rows_out * inner, acc_t(0));
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t r = 0; r < rows_out; ++r) {
      acc_t* target = out + (o * rows_out + r) * inner;
      for (int64_t j = 0; j < rows_in; ++j) {
        const acc_t weight = matrix[r * rows_in + j];
        if (weight == acc_t(0)) continue;
        const acc_t* source = in + (o * rows_in + j) * inner;
        for (int64_t i = 0; i < inner; ++i) target[i] += weight * source[i];
      }
    }
  }
}

// A forward count matrix (kernel, length) with its periodic part told apart. Away from the
// padding, every output position of a dim reads through the same taps, so column j of the matrix
// depends only on j mod stride there: `pattern` holds those columns (kernel, stride), and columns
// [interior_begin, interior_end) are the run around the middle of the dim equal to theirs; the
// columns outside it (near the borders) are applied one by one.
template <typename acc_t>
struct PeriodicCounts {
  std::vector<acc_t> matrix;   // (kernel, length)
  std::vector<acc_t> pattern;  // (kernel, period)
  int64_t kernel = 1, length = 1, period = 1;
  int64_t interior_begin = 0, interior_end = 0;

  // The first interior column of a residue (interior_end or beyond when it has none).
  int64_t first_interior(int64_t residue) const {
    return interior_begin + ((residue - interior_begin) % period + period) % period;
  }
};

template <typename acc_t>
PeriodicCounts<acc_t> periodic_counts(const tap::TapDim& d, int mode) {
  PeriodicCounts<acc_t> counts;
  counts.matrix = count_matrix<acc_t>(d, mode, /*transposed=*/false);
  const int64_t kernel = d.kernel, length = d.length, period = std::min(d.stride, d.length);
  counts.kernel = kernel, counts.length = length, counts.period = period;
  // Each residue's column is read at the last column of that residue up to the middle.
  const int64_t middle = length / 2;
  counts.pattern.assign(kernel * period, acc_t(0));
  for (int64_t residue = 0; residue < period; ++residue) {
    int64_t reference = middle - ((middle - residue) % period + period) % period;
    if (reference < 0) reference += period;
    for (int64_t t = 0; t < kernel; ++t) counts.pattern[t * period + residue] = counts.matrix[t * length + reference];
  }
  const auto periodic = [&](int64_t j) {
    for (int64_t t = 0; t < kernel; ++t) {
      if (counts.matrix[t * length + j] != counts.pattern[t * period + j % period]) return false;
    }
    return true;
  };
  counts.interior_begin = middle, counts.interior_end = middle + 1;  // the middle column is its own reference
  while (counts.interior_begin > 0 && periodic(counts.interior_begin - 1)) --counts.interior_begin;
  while (counts.interior_end < length && periodic(counts.interior_end)) ++counts.interior_end;
  return counts;
}

// out (outer, kernel, inner) = the count matrix applied along the middle dim of in (outer, length,
// inner), reading `in` once: the interior rows of each residue are first added up (column sums, one
// add per value), and each residue's sum then goes through its pattern column; border rows go
// through their own columns. `residue_sums` is scratch.
template <typename acc_t>
void contract_counts(const acc_t* in, int64_t outer, int64_t inner, const PeriodicCounts<acc_t>& counts, acc_t* out,
                     std::vector<acc_t>& residue_sums) {
  const int64_t kernel = counts.kernel, length = counts.length, period = counts.period;
  residue_sums.resize(period * inner);
  const auto apply_column = [&](acc_t* target, const acc_t* column, int64_t column_stride, const acc_t* values) {
    for (int64_t t = 0; t < kernel; ++t) {
      const acc_t weight = column[t * column_stride];
      if (weight == acc_t(0)) continue;
      for (int64_t i = 0; i < inner; ++i) target[t * inner + i] += weight * values[i];
    }
  };
  for (int64_t o = 0; o < outer; ++o) {
    const acc_t* plane = in + o * length * inner;
    acc_t* target = out + o * kernel * inner;
    std::fill(target, target + kernel * inner, acc_t(0));
    std::fill(residue_sums.begin(), residue_sums.end(), acc_t(0));
    for (int64_t residue = 0; residue < period; ++residue) {
      const int64_t first = counts.first_interior(residue);
      if (first >= counts.interior_end) continue;
      const int64_t rows = (counts.interior_end - first + period - 1) / period;
      acc_t* sums = residue_sums.data() + residue * inner;
      columns::add_block<false>(sums, static_cast<acc_t*>(nullptr), plane + first * inner, period * inner, 0, rows,
                                0, inner);
    }
    for (int64_t j = 0; j < length; ++j) {
      if (j == counts.interior_begin) j = counts.interior_end;
      if (j >= length) break;
      apply_column(target, counts.matrix.data() + j, length, plane + j * inner);
    }
    for (int64_t residue = 0; residue < period; ++residue) {
      apply_column(target, counts.pattern.data() + residue, period, residue_sums.data() + residue * inner);
    }
  }
}

// contract_counts for inner = 1, the last dim: each row's interior values of one residue are added
// in four independent running sums (a single one would wait on every add's latency).
template <typename acc_t>
void contract_counts_along_rows(const acc_t* in, int64_t outer, const PeriodicCounts<acc_t>& counts, acc_t* out) {
  const int64_t kernel = counts.kernel, length = counts.length, period = counts.period;
  for (int64_t o = 0; o < outer; ++o) {
    const acc_t* row = in + o * length;
    acc_t* target = out + o * kernel;
    std::fill(target, target + kernel, acc_t(0));
    for (int64_t residue = 0; residue < period; ++residue) {
      int64_t j = counts.first_interior(residue);
      acc_t sums[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (; j + 3 * period < counts.interior_end; j += 4 * period) {
        sums[0] += row[j];
        sums[1] += row[j + period];
        sums[2] += row[j + 2 * period];
        sums[3] += row[j + 3 * period];
      }
      for (; j < counts.interior_end; j += period) sums[0] += row[j];
      const acc_t sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
      for (int64_t t = 0; t < kernel; ++t) target[t] += counts.pattern[t * period + residue] * sum;
    }
    for (int64_t j = 0; j < length; ++j) {
      if (j == counts.interior_begin) j = counts.interior_end;
      if (j >= length) break;
      for (int64_t t = 0; t < kernel; ++t) target[t] += counts.matrix[t * length + j] * row[j];
    }
  }
}

// The forward: every channel's plane (C, *spatial) contracted along each dim with its count matrix,
// first dim to last (the long rows of the plane stay the vectorised inner loop), divided by count.
template <typename acc_t>
void contract_tap_sums(const acc_t* plane, int64_t channels, const TapGeometry& g, acc_t count, acc_t* out) {
  std::vector<PeriodicCounts<acc_t>> counts;
  int64_t shape[tap::kDims], out_size = 1;
  for (int k = 0; k < tap::kDims; ++k) {
    counts.push_back(periodic_counts<acc_t>(g.dims[k], g.mode));
    shape[k] = g.dims[k].length;
    out_size *= g.dims[k].kernel;
  }
  const int64_t in_size = shape[0] * shape[1] * shape[2];
  // One pass over the plane and small passes over what is left: threads only for planes big
  // enough to repay waking them. A task contracts its channels together, one dim at a time.
  const int64_t channel_work = in_size + out_size * (g.dims[0].kernel + g.dims[1].kernel + g.dims[2].kernel);
  at::parallel_for(0, channels, std::max<int64_t>(1, kContractionTaskWork / channel_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a, b, residue_sums;
    const acc_t* source = plane + begin * in_size;
    int64_t sizes[tap::kDims] = {shape[0], shape[1], shape[2]};
    for (int k = 0; k < tap::kDims; ++k) {
      if (sizes[k] == 1 && counts[k].kernel == 1 && counts[k].matrix[0] == acc_t(1)) continue;  // a Conv1d/2d's added dim
      int64_t outer = end - begin, inner = 1;
      for (int m = 0; m < k; ++m) outer *= sizes[m];
      for (int m = k + 1; m < tap::kDims; ++m) inner *= sizes[m];
      b.resize(outer * counts[k].kernel * inner);
      if (inner == 1) {
        contract_counts_along_rows(source, outer, counts[k], b.data());
      } else {
        contract_counts(source, outer, inner, counts[k], b.data(), residue_sums);
      }
      sizes[k] = counts[k].kernel;
      std::swap(a, b);
      source = a.data();
    }
    for (int64_t i = 0; i < (end - begin) * out_size; ++i) out[begin * out_size + i] = source[i] / count;
  });
}

// The backward: every channel's (C, *kernel) gradient spread over its plane (C, *spatial) through
// the transposed count matrices, last dim to first (so the plane's long rows are the vectorised
// inner loop of the last, largest step), divided by count.
template <typename acc_t>
void spread_tap_gradient(const acc_t* grad, int64_t channels, const TapGeometry& g, acc_t count, acc_t* out) {
  std::vector<acc_t> matrices[tap::kDims];
  int64_t sizes_in[tap::kDims], sizes_out[tap::kDims];
  for (int k = 0; k < tap::kDims; ++k) {
    matrices[k] = count_matrix<acc_t>(g.dims[k], g.mode, /*transposed=*/true);
    sizes_in[k] = g.dims[k].kernel;
    sizes_out[k] = g.dims[k].length;
  }
  const int64_t in_size = sizes_in[0] * sizes_in[1] * sizes_in[2];
  const int64_t out_size = sizes_out[0] * sizes_out[1] * sizes_out[2];
  const int64_t channel_work = (in_size + out_size) * (g.dims[0].kernel + g.dims[1].kernel + g.dims[2].kernel);
  at::parallel_for(0, channels, std::max<int64_t>(1, kContractionTaskWork / channel_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a, b;
    for (int64_t c = begin; c < end; ++c) {
      const acc_t* source = grad + c * in_size;
      int64_t shape[tap::kDims] = {sizes_in[0], sizes_in[1], sizes_in[2]};
      for (int k = tap::kDims - 1; k >= 0; --k) {
        if (shape[k] == 1 && sizes_out[k] == 1 && matrices[k][0] == acc_t(1)) continue;  // a Conv1d/2d's added dim
        int64_t outer = 1, inner = 1;
        for (int m = 0; m < k; ++m) outer *= shape[m];
        for (int m = k + 1; m < tap::kDims; ++m) inner *= shape[m];
        b.resize(outer * sizes_out[k] * inner);
        contract_middle(source, outer, shape[k], inner, matrices[k].data(), sizes_out[k], b.data());
        shape[k] = sizes_out[k];
        std::swap(a, b);
        source = a.data();
      }
      for (int64_t i = 0; i < out_size; ++i) out[c * out_size + i] = source[i] / count;
    }
  });
}

// ``data`` when its type is the accumulation type (float, double), else null.
template <typename acc_t, typename scalar_t>
const acc_t* in_accumulation_type(const scalar_t* data) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return data;
  } else {
    return nullptr;
  }
}

std::tuple<at::Tensor, at::Tensor> tap_mean(const at::Tensor& x, int64_t rows, at::IntArrayRef kernel_size,
                                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                            c10::string_view padding_mode, bool absolute) {
  auto [readable, channel_geometry] = channel_input(x, rows);
  TORCH_CHECK(readable.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  const TapGeometry g = tap_geometry(x.sizes().slice(2), kernel_size, stride, padding, dilation, padding_mode);
  const int64_t channels = channel_geometry.channels, plane = g.plane();
  const auto acc = accumulation_type(x.scalar_type());
  at::Tensor mean = at::empty(tap_mean_shape(channels, kernel_size), x.options().dtype(acc));
  at::Tensor negative = at::zeros({channels}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tap_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t width = channels * plane;
    const scalar_t* data = readable.const_data_ptr<scalar_t>();
    const acc_t count = static_cast<acc_t>(rows) * static_cast<acc_t>(g.outputs());
    // One NCHW sample's plane is its own sum: contracted where it lies, never copied.
    const acc_t* single_plane = in_accumulation_type<acc_t>(data);
    if (single_plane != nullptr && rows == 1 && !absolute && !channel_geometry.channels_last) {
      contract_tap_sums(single_plane, channels, g, count, mean.mutable_data_ptr<acc_t>());
      return;
    }
    // column_sums writes every element: no initialisation here.
    std::unique_ptr<acc_t[]> sample_sums(new acc_t[width]);
    std::vector<uint8_t> negative_columns(absolute ? width : 0);
    if (absolute) {
      columns::column_sums<true>(data, rows, width, sample_sums.get(), negative_columns.data());
    } else {
      columns::column_sums<false>(data, rows, width, sample_sums.get(), negative_columns.data());
    }
    // S as (C, plane): channels_last columns are (plane, C).
    if (channel_geometry.channels_last) {
      std::unique_ptr<acc_t[]> transposed(new acc_t[width]);
      std::vector<uint8_t> transposed_negative(absolute ? width : 0);
      for (int64_t p = 0; p < plane; ++p) {
        for (int64_t c = 0; c < channels; ++c) {
          transposed[c * plane + p] = sample_sums[p * channels + c];
          if (absolute) transposed_negative[c * plane + p] = negative_columns[p * channels + c];
        }
      }
      sample_sums.swap(transposed);
      negative_columns.swap(transposed_negative);
    }
    if (absolute) {
      bool* flags = negative.mutable_data_ptr<bool>();
      for (int64_t c = 0; c < channels; ++c) {
        flags[c] = std::any_of(negative_columns.begin() + c * plane, negative_columns.begin() + (c + 1) * plane,
                               [](uint8_t seen) { return seen != 0; });
      }
    }
    contract_tap_sums(sample_sums.get(), channels, g, count, mean.mutable_data_ptr<acc_t>());
  });
  return {mean, negative};
}

at::Tensor tap_mean_backward(const at::Tensor& grad, at::IntArrayRef spatial, int64_t rows,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, c10::string_view padding_mode) {
  const TapGeometry g = tap_geometry(spatial, kernel_size, stride, padding, dilation, padding_mode);
  check_tap_grad(grad, kernel_size, rows);
  TORCH_CHECK(grad.device().is_cpu(), "grad must be a CPU tensor for the CPU kernel");
  const at::Tensor grad_c = grad.contiguous();
  const int64_t channels = grad.size(0);
  at::Tensor plane = at::empty(tap_plane_shape(channels, spatial), grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "tap_mean_backward_cpu", [&] {
    const scalar_t count = static_cast<scalar_t>(rows) * static_cast<scalar_t>(g.outputs());
    spread_tap_gradient(grad_c.const_data_ptr<scalar_t>(), channels, g, count, plane.mutable_data_ptr<scalar_t>());
  });
  return plane;
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CPU, m) {
  m.impl("tap_mean", &tap_mean);
  m.impl("tap_mean_backward", &tap_mean_backward);
}

}  // namespace cpu
}  // namespace equinorm
