// Per-tap input statistics on the CPU (tap_mean and its backward; math in csrc/shared/tap_mean_math.h).
//
// Forward: one read of x[:rows] (|x| and a flag per channel that saw a negative value for
// abs_mean). Along each spatial dim, the lines (rows, columns) away from the padding repeat their
// counts with the stride (PeriodicCounts), so a plane's values only need adding up in a few groups
// of lines before they meet the count matrices. Conv1d/2d inputs (see "Conv1d/2d geometries"):
// NCHW planes with long rows are read where they lie, the others through the samples' sum S with
// the channels in vector lanes. Conv3d inputs: S (C, *spatial) contracted dim by dim. Backward:
// the (C, *kernel) gradient contracted with the transposed count matrices, a (C, *spatial) plane
// the caller broadcasts over the samples.
//
// S is the column sums of x[:rows] as a (rows, C * spatial) matrix (NCHW) or (rows, spatial * C)
// (channels_last), as channel_mean sums its channels_last inputs (cpu/column_sums.h). Every split
// depends on the shape only, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/column_sums.h"
#include "cpu/reductions.h"
#include "cpu/transpose.h"
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

// The forward of a 3-D geometry: every channel's plane (C, *spatial) contracted along each dim
// with its count matrix, first dim to last (the long rows of the plane stay the vectorised inner
// loop), divided by count.
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

// ---- Conv1d/2d geometries ----------------------------------------------------------------------
//
// Every plane of a geometry has the same count structure, planned once (PlaneCounts). A plane's
// rows fall into row groups: the interior rows of each residue (mod the row stride), added up, and
// each border row by itself; its columns into column groups likewise.
//
// - NCHW with rows of kPlaneRowLength or more: each channel's planes are read where they lie, a few
//   samples at a time, into the channel's row groups (float32 interiors as one flat run into registers),
//   whose values are then added into their (row group, column group) and contracted as below.
// - Shorter NCHW rows and channels_last: per-row work on rows of 7 or 14 values would cost more than
//   the values, so the samples are summed column-wise first into S, one plane per channel, whose
//   positions are added into their (row group, column group) with the channels in vector lanes
//   (8 x 8 tiles of channels x positions for NCHW); the group sums are then contracted. Both are
//   done per block of channels in one parallel pass (blocked_tap_means).

// Elements one parallel task should at least read.
constexpr int64_t kPlaneTaskElements = 1 << 14;
constexpr int64_t kPlaneRowLength = 24;
constexpr int kMaxKernel = 64;  // per dim, checked by plane_path_applies
// Float planes' interior rows are added flat in up to kMaxFlatVectors vectors of kFlatLanes.
constexpr int64_t kFlatLanes = 8;
constexpr int64_t kMaxFlatVectors = 16;

// The lines (rows or columns) of one dim in groups: the interior lines of each residue form one
// group (they share their counts), every border line is a group of its own.
template <typename acc_t>
struct LineGroups {
  std::vector<int64_t> group_of;  // (length)
  std::vector<acc_t> counts;      // (groups, kernel): a group's counts, one per tap
  int64_t groups = 0, kernel = 1;
};

template <typename acc_t>
LineGroups<acc_t> line_groups(const PeriodicCounts<acc_t>& lines) {
  LineGroups<acc_t> groups;
  groups.kernel = lines.kernel;
  groups.groups = lines.period;
  for (int64_t residue = 0; residue < lines.period; ++residue) {
    for (int64_t t = 0; t < lines.kernel; ++t) groups.counts.push_back(lines.pattern[t * lines.period + residue]);
  }
  groups.group_of.resize(lines.length);
  for (int64_t j = 0; j < lines.length; ++j) {
    if (j >= lines.interior_begin && j < lines.interior_end) {
      groups.group_of[j] = j % lines.period;
      continue;
    }
    groups.group_of[j] = groups.groups++;
    for (int64_t t = 0; t < lines.kernel; ++t) groups.counts.push_back(lines.matrix[t * lines.length + j]);
  }
  return groups;
}

// The (H, W) count structure every plane of a Conv1d/2d geometry shares.
template <typename acc_t>
struct PlaneCounts {
  PeriodicCounts<acc_t> rows;
  LineGroups<acc_t> row_groups, column_groups;
  std::vector<int64_t> first_rows;   // per row residue, its first interior row (none: interior_end)
  std::vector<int64_t> border_rows;  // rows outside the interior, in order (row groups period, ...)
  int64_t height = 1, width = 1, kernel_rows = 1, kernel_columns = 1;
  // The interior rows as one run of values: its row residues and columns repeat every
  // flat_vectors * kFlatLanes values (0: too long a period); fold_residue (flat_rows) is the row
  // residue of each of the period's rows.
  int64_t flat_vectors = 0, flat_rows = 0;
  std::vector<int64_t> fold_residue;
  // Position p = r * W + j is in group row_groups.group_of[r] * column_groups.groups + column_groups.group_of[j].
  std::vector<int64_t> position_group;
  int64_t position_groups = 0;
  // Value (g, j) of a plane's row groups (row groups, W) is in position group
  // g * column_groups.groups + column_groups.group_of[j].
  std::vector<int64_t> row_group_position_group;

  int64_t taps() const { return kernel_rows * kernel_columns; }
  int64_t plane() const { return height * width; }
};

template <typename acc_t>
PlaneCounts<acc_t> plane_counts(const TapGeometry& g) {
  PlaneCounts<acc_t> counts;
  counts.rows = periodic_counts<acc_t>(g.dims[1], g.mode);
  const PeriodicCounts<acc_t> columns = periodic_counts<acc_t>(g.dims[2], g.mode);
  counts.row_groups = line_groups(counts.rows);
  counts.column_groups = line_groups(columns);
  counts.height = g.dims[1].length, counts.width = g.dims[2].length;
  counts.kernel_rows = g.dims[1].kernel, counts.kernel_columns = g.dims[2].kernel;
  for (int64_t residue = 0; residue < counts.rows.period; ++residue) {
    counts.first_rows.push_back(counts.rows.first_interior(residue));
  }
  for (int64_t r = 0; r < counts.height; ++r) {
    if (r < counts.rows.interior_begin || r >= counts.rows.interior_end) counts.border_rows.push_back(r);
  }
  counts.position_groups = counts.row_groups.groups * counts.column_groups.groups;
  for (int64_t r = 0; r < counts.height; ++r) {
    for (int64_t j = 0; j < counts.width; ++j) {
      counts.position_group.push_back(counts.row_groups.group_of[r] * counts.column_groups.groups +
                                      counts.column_groups.group_of[j]);
    }
  }
  for (int64_t g = 0; g < counts.row_groups.groups; ++g) {
    for (int64_t j = 0; j < counts.width; ++j) {
      counts.row_group_position_group.push_back(g * counts.column_groups.groups + counts.column_groups.group_of[j]);
    }
  }
  const int64_t repeat = counts.rows.period * counts.width;  // values after which the residues repeat
  const int64_t period = std::lcm(repeat, kFlatLanes);
  if (period <= kMaxFlatVectors * kFlatLanes) {
    counts.flat_vectors = period / kFlatLanes;
    counts.flat_rows = period / counts.width;
    for (int64_t q = 0; q < counts.flat_rows; ++q) {
      counts.fold_residue.push_back((counts.rows.interior_begin + q) % counts.rows.period);
    }
  }
  return counts;
}

// The plane counts of a geometry, built once per thread for the last kPlanCache geometries it
// met (a model calls a few geometries over and over; building them costs as much as reading a
// small input).
constexpr size_t kPlanCache = 16;

inline bool same_plane_geometry(const TapGeometry& a, const TapGeometry& b) {
  if (a.mode != b.mode) return false;
  for (int k = 1; k < tap::kDims; ++k) {
    const tap::TapDim &x = a.dims[k], &y = b.dims[k];
    if (x.length != y.length || x.kernel != y.kernel || x.stride != y.stride || x.dilation != y.dilation ||
        x.before != y.before || x.after != y.after) {
      return false;
    }
  }
  return true;
}

template <typename acc_t>
std::shared_ptr<const PlaneCounts<acc_t>> cached_plane_counts(const TapGeometry& g) {
  thread_local std::vector<std::pair<TapGeometry, std::shared_ptr<const PlaneCounts<acc_t>>>> plans;
  thread_local size_t next_slot = 0;
  for (const auto& plan : plans) {
    if (same_plane_geometry(plan.first, g)) return plan.second;
  }
  auto counts = std::make_shared<const PlaneCounts<acc_t>>(plane_counts<acc_t>(g));
  if (plans.size() < kPlanCache) {
    plans.emplace_back(g, counts);
  } else {
    plans[next_slot] = {g, counts};
    next_slot = (next_slot + 1) % kPlanCache;
  }
  return counts;
}

// Whether a geometry goes through the plane kernels: Conv1d/2d (a first dim whose one value is
// read once: length and kernel 1, no padding), kernels of at most kMaxKernel taps per dim.
bool plane_path_applies(const TapGeometry& g) {
  const tap::TapDim& first = g.dims[0];
  return first.length == 1 && first.kernel == 1 && first.before == 0 && first.after == 0 &&
         g.dims[1].kernel <= kMaxKernel && g.dims[2].kernel <= kMaxKernel;
}

// target (W) = row (of |x| with kAbs, lowest lowered to the least value), or target += row.
template <bool kAbs, bool kAdd, typename acc_t, typename value_t>
C10_ALWAYS_INLINE void take_row(const value_t* row, int64_t width, acc_t* target, acc_t& lowest) {
  acc_t least = lowest;
  for (int64_t j = 0; j < width; ++j) {
    const acc_t value = columns::term<kAbs, acc_t>(row[j], least);
    target[j] = kAdd ? target[j] + value : value;
  }
  lowest = least;
}

// target (W) += rows[0], rows[step], rows[2 step], rows[3 step], added in that order, the running
// sum loaded and stored once.
template <bool kAbs, typename acc_t, typename value_t>
C10_ALWAYS_INLINE void add_four_rows(const value_t* rows, int64_t width, int64_t step, acc_t* target, acc_t& lowest) {
  acc_t least = lowest;
  const value_t* a = rows;
  const value_t* b = a + step;
  const value_t* c = b + step;
  const value_t* d = c + step;
  for (int64_t j = 0; j < width; ++j) {
    acc_t sum = target[j];
    sum += columns::term<kAbs, acc_t>(a[j], least);
    sum += columns::term<kAbs, acc_t>(b[j], least);
    sum += columns::term<kAbs, acc_t>(c[j], least);
    sum += columns::term<kAbs, acc_t>(d[j], least);
    target[j] = sum;
  }
  lowest = least;
}

// groups (row groups, W) of one plane (of |x| with kAbs, lowest lowered to its least value). Each
// interior residue's rows are added in row order, four at a time; the residues take turns within
// every 4 x period rows, so the plane is read front to back whatever the stride.
template <bool kAbs, typename acc_t, typename value_t>
C10_ALWAYS_INLINE void plane_row_groups(const value_t* plane, const PlaneCounts<acc_t>& counts, acc_t* groups,
                                        acc_t& lowest) {
  const int64_t width = counts.width, period = counts.rows.period;
  const int64_t begin = counts.rows.interior_begin, end = counts.rows.interior_end;
  // Rows begin + i, i < period, have residue (begin + i) mod period, as every period rows later.
  const int64_t first_residue = begin % period;
  const auto residue_sums = [&](int64_t i) {
    const int64_t residue = first_residue + i;
    return groups + (residue < period ? residue : residue - period) * width;
  };
  for (int64_t residue = 0; residue < period; ++residue) {  // residues without interior rows: zeros
    if (counts.first_rows[residue] >= end) std::fill(groups + residue * width, groups + (residue + 1) * width, acc_t(0));
  }
  for (int64_t i = 0; i < std::min(period, end - begin); ++i) {
    take_row<kAbs, false>(plane + (begin + i) * width, width, residue_sums(i), lowest);
  }
  int64_t row = begin + period;
  for (; row + 4 * period <= end; row += 4 * period) {
    for (int64_t i = 0; i < period; ++i) {
      add_four_rows<kAbs>(plane + (row + i) * width, width, period * width, residue_sums(i), lowest);
    }
  }
  for (int64_t i = 0; row < end; ++row, i = i + 1 == period ? 0 : i + 1) {
    take_row<kAbs, true>(plane + row * width, width, residue_sums(i), lowest);
  }
  for (size_t b = 0; b < counts.border_rows.size(); ++b) {
    const int64_t r = counts.border_rows[b];
    take_row<kAbs, false>(plane + r * width, width, groups + (period + static_cast<int64_t>(b)) * width, lowest);
  }
}

// Channels whose position groups are summed together (kChannelBlock x position groups values, in
// cache); a channel's sums are the same whichever block it falls in.
constexpr int64_t kChannelBlock = 32;

// groups (position groups, lanes) += the values of channels [begin, begin + lanes), each added to
// its position's group (group_of, one per position) in position order, in runs of one group
// (transposes::add_position_runs) where the channels are not adjacent. sums is (plane, C) with
// position_major, else (C, plane).
template <typename acc_t>
C10_ALWAYS_INLINE void add_position_groups(const acc_t* sums, int64_t channels, bool position_major,
                                           const int64_t* group_of, int64_t plane, int64_t begin, int64_t lanes,
                                           acc_t* groups) {
  if (position_major) {
    for (int64_t p = 0; p < plane; ++p) {
      acc_t* target = groups + group_of[p] * lanes;
      const acc_t* values = sums + p * channels + begin;
      for (int64_t c = 0; c < lanes; ++c) target[c] += values[c];
    }
    return;
  }
  int64_t c0 = 0;
  if constexpr (std::is_same_v<acc_t, float>) {  // 8 channels x 8 positions a tile, where AVX2 is there
    c0 = transposes::add_tile_columns(sums + begin * plane, lanes, plane, group_of, groups, lanes);
  }
  for (int64_t c = c0; c < lanes; ++c) {
    const acc_t* values = sums + (begin + c) * plane;
    for (int64_t p = 0; p < plane; p += transposes::kTile) {
      transposes::add_position_runs(values + p, std::min(transposes::kTile, plane - p), group_of + p, groups + c,
                                    lanes);
    }
  }
}

// A task's buffers for the position groups of a block of channels and their contraction, reused
// from block to block.
template <typename acc_t>
struct GroupScratch {
  std::vector<acc_t> groups, row_taps, taps;
};

// mean (C, kh, kw) of channels [begin, begin + lanes) from their position groups (groups, lanes):
// through the column groups' counts, then the row groups', divided by count; channels in lanes.
template <typename acc_t>
C10_ALWAYS_INLINE void group_taps(const acc_t* groups, const PlaneCounts<acc_t>& counts, acc_t count, int64_t begin,
                                  int64_t lanes, GroupScratch<acc_t>& scratch, acc_t* mean) {
  const LineGroups<acc_t>& rows = counts.row_groups;
  const LineGroups<acc_t>& columns = counts.column_groups;
  const int64_t kh = counts.kernel_rows, kw = counts.kernel_columns;
  std::vector<acc_t>& row_taps = scratch.row_taps;  // (row groups, kw, lanes)
  row_taps.assign(rows.groups * kw * lanes, acc_t(0));
  for (int64_t g = 0; g < rows.groups; ++g) {
    for (int64_t h = 0; h < columns.groups; ++h) {
      const acc_t* source = groups + (g * columns.groups + h) * lanes;
      for (int64_t u = 0; u < kw; ++u) {
        const acc_t weight = columns.counts[h * kw + u];
        if (weight == acc_t(0)) continue;
        acc_t* target = row_taps.data() + (g * kw + u) * lanes;
        for (int64_t c = 0; c < lanes; ++c) target[c] += weight * source[c];
      }
    }
  }
  std::vector<acc_t>& taps = scratch.taps;  // (kh, kw, lanes)
  taps.assign(kh * kw * lanes, acc_t(0));
  for (int64_t g = 0; g < rows.groups; ++g) {
    for (int64_t t = 0; t < kh; ++t) {
      const acc_t weight = rows.counts[g * kh + t];
      if (weight == acc_t(0)) continue;
      for (int64_t u = 0; u < kw; ++u) {
        const acc_t* source = row_taps.data() + (g * kw + u) * lanes;
        acc_t* target = taps.data() + (t * kw + u) * lanes;
        for (int64_t c = 0; c < lanes; ++c) target[c] += weight * source[c];
      }
    }
  }
  const int64_t k = kh * kw;
  for (int64_t c = 0; c < lanes; ++c) {
    for (int64_t t = 0; t < k; ++t) mean[(begin + c) * k + t] = taps[t * lanes + c] / count;
  }
}

// A channel's running state while its samples are read: the row groups summed so far, or for
// float planes added flat (below) the flat running sums and the border rows summed so far.
template <typename acc_t>
struct ChannelState {
  acc_t* groups;  // (row groups, W)
  acc_t* flat;    // (flat_vectors * kFlatLanes)
  acc_t least;
};

// Adds samples [first, end) of one float channel (sample n's plane at x + n * sample_stride) to
// its flat state: each plane's interior rows, whose row residues and columns repeat every
// kVectors * kFlatLanes values, as one run into that many running sums (kept in registers from
// plane to plane while each is read as a single stream), and its border rows to their groups.
template <bool kAbs, int kVectors>
C10_ALWAYS_INLINE void add_flat_samples(const float* x, int64_t sample_stride, int64_t first, int64_t end,
                                        const PlaneCounts<float>& counts, ChannelState<float>& state) {
  constexpr int kPeriod = kVectors * kFlatLanes;
  const int64_t width = counts.width, period = counts.rows.period;
  const int64_t values = (counts.rows.interior_end - counts.rows.interior_begin) * width;
  float sums[kPeriod];
  float least[kFlatLanes] = {};
  int64_t first_start = 0;  // sample 0's values already in the sums
  if (first > 0) {
    for (int k = 0; k < kPeriod; ++k) sums[k] = state.flat[k];
  } else if (values >= kPeriod) {
    // Sample 0's first values start the sums: zeroing them first, a memset per channel, took an
    // eighth of this kernel's time on 128 x 28 x 28 inputs.
    const float* run = x + counts.rows.interior_begin * width;
    for (int k = 0; k < kPeriod; ++k) sums[k] = columns::term<kAbs, float>(run[k], least[k % kFlatLanes]);
    first_start = kPeriod;
  } else {
    for (int k = 0; k < kPeriod; ++k) sums[k] = 0.0f;
  }
  for (int64_t n = first; n < end; ++n) {
    const float* plane = x + n * sample_stride;
    const float* run = plane + counts.rows.interior_begin * width;
    int64_t i = n == 0 ? first_start : 0;
    for (; i + kPeriod <= values; i += kPeriod) {
      for (int k = 0; k < kPeriod; ++k) sums[k] += columns::term<kAbs, float>(run[i + k], least[k % kFlatLanes]);
    }
    for (int k = 0; i < values; ++i, ++k) sums[k] += columns::term<kAbs, float>(run[i], least[k % kFlatLanes]);
    for (size_t b = 0; b < counts.border_rows.size(); ++b) {
      const float* row = plane + counts.border_rows[b] * width;
      float* target = state.groups + (period + static_cast<int64_t>(b)) * width;
      if (n == 0) {
        take_row<kAbs, false>(row, width, target, state.least);
      } else {
        take_row<kAbs, true>(row, width, target, state.least);
      }
    }
  }
  for (int k = 0; k < kPeriod; ++k) state.flat[k] = sums[k];
  for (int k = 0; k < kFlatLanes; ++k) state.least = least[k] < state.least ? least[k] : state.least;
}

// The flat running sums folded into the interior residues' column sums, in row order: the first
// `period` rows (flat_rows >= period) are one of each residue, and set its sums.
C10_ALWAYS_INLINE void fold_flat(const PlaneCounts<float>& counts, ChannelState<float>& state) {
  const int64_t width = counts.width, period = counts.rows.period;
  for (int64_t q = 0; q < counts.flat_rows; ++q) {
    float* target = state.groups + counts.fold_residue[q] * width;
    const float* source = state.flat + q * width;
    if (q < period) {
      for (int64_t j = 0; j < width; ++j) target[j] = source[j];
    } else {
      for (int64_t j = 0; j < width; ++j) target[j] += source[j];
    }
  }
}

// Adds samples [first, end) of one channel to its row groups (scratch: a plane's row groups).
template <bool kAbs, typename acc_t, typename value_t>
C10_ALWAYS_INLINE void add_samples(const value_t* x, int64_t sample_stride, int64_t first, int64_t end,
                                   const PlaneCounts<acc_t>& counts, ChannelState<acc_t>& state, acc_t* scratch) {
  const int64_t size = counts.row_groups.groups * counts.width;
  for (int64_t n = first; n < end; ++n) {
    plane_row_groups<kAbs>(x + n * sample_stride, counts, n == 0 ? state.groups : scratch, state.least);
    if (n > 0) {
      for (int64_t i = 0; i < size; ++i) state.groups[i] += scratch[i];
    }
  }
}

// Samples a task reads of one channel before the next: a channel's state stays in registers over
// them, while x is still read as that many contiguous streams (one per sample).
constexpr int64_t kSampleStreams = 4;

// mean (C, kh, kw) of channels [begin, begin + lanes) from their row groups (lanes, row groups, W):
// each value added into its (row group, column group), kChannelBlock channels at a time in vector
// lanes, then contracted as the grouped path's. Per channel, a row group's W values would
// otherwise meet kw dot products and the sums kh scalar updates each.
template <typename acc_t>
C10_ALWAYS_INLINE void row_groups_taps(const acc_t* row_groups, const PlaneCounts<acc_t>& counts, acc_t count,
                                       int64_t begin, int64_t lanes, acc_t* mean) {
  const int64_t size = counts.row_groups.groups * counts.width;
  GroupScratch<acc_t> scratch;
  for (int64_t first = 0; first < lanes; first += kChannelBlock) {
    const int64_t block = std::min(lanes - first, kChannelBlock);
    scratch.groups.assign(counts.position_groups * block, acc_t(0));
    add_position_groups(row_groups, lanes, false, counts.row_group_position_group.data(), size, first, block,
                        scratch.groups.data());
    group_taps(scratch.groups.data(), counts, count, begin + first, block, scratch, mean);
  }
}

// mean (C, kh, kw) and, with kAbs, negative (C) of channels [begin, end) of NCHW x[:rows]: the
// samples kSampleStreams at a time, within them each channel's planes in turn (so each sample's
// planes of these channels are one contiguous run of x), every channel's state carried from
// sample to sample; then the row groups contracted (row_groups_taps).
template <bool kAbs, int kVectors, typename acc_t, typename value_t>
C10_ALWAYS_INLINE void planar_channels(const value_t* x, int64_t rows, int64_t channels,
                                       const PlaneCounts<acc_t>& counts, acc_t count, int64_t begin, int64_t end,
                                       acc_t* mean, bool* negative) {
  const int64_t size = counts.row_groups.groups * counts.width, flat = kVectors * kFlatLanes;
  const int64_t lanes = end - begin, plane = counts.plane();
  // Every channel's row groups, flat sums and least value, in one buffer; set by the first sample
  // before they are read: no initialisation.
  const std::unique_ptr<acc_t[]> buffer(new acc_t[lanes * (size + flat + 1) + (kVectors > 0 ? 0 : size)]);
  acc_t* const groups = buffer.get();
  acc_t* const flat_sums = groups + lanes * size;
  acc_t* const least = flat_sums + lanes * flat;
  acc_t* const scratch = least + lanes;
  const auto state_of = [&](int64_t lane) {
    return ChannelState<acc_t>{groups + lane * size, flat_sums + lane * flat, least[lane]};
  };
  std::fill(least, least + lanes, acc_t(0));
  for (int64_t n = 0; n < rows; n += kSampleStreams) {
    const int64_t last = std::min(rows, n + kSampleStreams);
    for (int64_t c = begin; c < end; ++c) {
      const value_t* source = x + c * plane;
      ChannelState<acc_t> state = state_of(c - begin);
      if constexpr (kVectors > 0) {
        add_flat_samples<kAbs, kVectors>(source, channels * plane, n, last, counts, state);
      } else {
        add_samples<kAbs>(source, channels * plane, n, last, counts, state, scratch);
      }
      least[c - begin] = state.least;
    }
  }
  for (int64_t c = begin; c < end; ++c) {
    if constexpr (kVectors > 0) {
      ChannelState<acc_t> state = state_of(c - begin);
      fold_flat(counts, state);
    }
    if constexpr (kAbs) negative[c] = least[c - begin] < acc_t(0);
  }
  row_groups_taps(groups, counts, count, begin, lanes, mean);
}

// Float planes, also compiled for AVX2 (the loops are the same, so both give identical sums).
template <bool kAbs, int kVectors>
EQUINORM_AVX2_CLONES void float_planar_channels(const float* x, int64_t rows, int64_t channels,
                                                const PlaneCounts<float>& counts, float count, int64_t begin,
                                                int64_t end, float* mean, bool* negative) {
  planar_channels<kAbs, kVectors>(x, rows, channels, counts, count, begin, end, mean, negative);
}

// Float channels [begin, end): flat where the period allows, else row by row.
template <bool kAbs>
void float_channels(const float* x, int64_t rows, int64_t channels, const PlaneCounts<float>& counts, float count,
                    int64_t begin, int64_t end, float* mean, bool* negative) {
  switch (counts.flat_vectors) {
#define EQUINORM_FLAT_CASE(vectors) \
  case vectors:                     \
    return float_planar_channels<kAbs, vectors>(x, rows, channels, counts, count, begin, end, mean, negative);
    EQUINORM_FLAT_CASE(1) EQUINORM_FLAT_CASE(2) EQUINORM_FLAT_CASE(3) EQUINORM_FLAT_CASE(4)
    EQUINORM_FLAT_CASE(5) EQUINORM_FLAT_CASE(6) EQUINORM_FLAT_CASE(7) EQUINORM_FLAT_CASE(8)
    EQUINORM_FLAT_CASE(9) EQUINORM_FLAT_CASE(10) EQUINORM_FLAT_CASE(11) EQUINORM_FLAT_CASE(12)
    EQUINORM_FLAT_CASE(13) EQUINORM_FLAT_CASE(14) EQUINORM_FLAT_CASE(15) EQUINORM_FLAT_CASE(16)
#undef EQUINORM_FLAT_CASE
    default:
      return float_planar_channels<kAbs, 0>(x, rows, channels, counts, count, begin, end, mean, negative);
  }
}

// NCHW x[:rows] read plane by plane: a task takes a run of channels and reads it kSampleStreams
// samples at a time, so it reads a few long contiguous runs of x (a channel's samples lie a sample
// apart: reading all of them before the next channel would restart the hardware's prefetching
// every plane, measured 2x slower once x is out of cache). Each channel's additions keep one order
// whatever the split, so results do not depend on the thread count.
template <bool kAbs, typename acc_t, typename scalar_t>
void planar_tap_means(const scalar_t* x, int64_t rows, int64_t channels, const PlaneCounts<acc_t>& counts,
                      acc_t count, acc_t* mean, bool* negative) {
  const int64_t grain = std::max<int64_t>(1, kPlaneTaskElements / (rows * counts.plane()));
  at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      float_channels<kAbs>(x, rows, channels, counts, count, begin, end, mean, negative);
    } else {
      planar_channels<kAbs, 0>(x, rows, channels, counts, count, begin, end, mean, negative);
    }
  });
}

template <typename acc_t>
EQUINORM_AVX2_CLONES void grouped_blocks(const acc_t* sums, int64_t channels, bool position_major,
                                         const PlaneCounts<acc_t>& counts, acc_t count, int64_t first_block,
                                         int64_t end_block, acc_t* mean) {
  GroupScratch<acc_t> scratch;
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * kChannelBlock, lanes = std::min(channels, begin + kChannelBlock) - begin;
    scratch.groups.assign(counts.position_groups * lanes, acc_t(0));
    add_position_groups(sums, channels, position_major, counts.position_group.data(), counts.plane(), begin, lanes,
                        scratch.groups.data());
    group_taps(scratch.groups.data(), counts, count, begin, lanes, scratch, mean);
  }
}

// mean (C, kh, kw) from the samples' sum S ((plane, C) with position_major, else (C, plane)):
// every position added into its (row group, column group) sum with the channels in vector lanes,
// the group sums then contracted (group_taps).
template <typename acc_t>
void grouped_tap_means(const acc_t* sums, int64_t channels, bool position_major, const PlaneCounts<acc_t>& counts,
                       acc_t count, acc_t* mean) {
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = std::max<int64_t>(1, kPlaneTaskElements / (counts.plane() * kChannelBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t first_block, int64_t end_block) {
    grouped_blocks(sums, channels, position_major, counts, count, first_block, end_block, mean);
  });
}

// sums (plane, lanes) += rows [first, last) of channels_last x (rows, plane, C), channels [begin,
// begin + lanes) (lowest: their least values, with kAbs): each row's positions in turn, each
// column's rows in order, as column_sums adds the columns of the (rows, plane x C) matrix.
template <bool kAbs, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void add_channels_last_rows(const scalar_t* x, int64_t channels, int64_t plane, int64_t first,
                                              int64_t last, int64_t begin, int64_t lanes, acc_t* sums,
                                              acc_t* lowest) {
  for (int64_t row = first; row < last; ++row) {
    const scalar_t* values = x + row * plane * channels + begin;
    for (int64_t p = 0; p < plane; ++p, values += channels) {
      acc_t* target = sums + p * lanes;
      for (int64_t c = 0; c < lanes; ++c) {
        acc_t least = kAbs ? lowest[p * lanes + c] : acc_t(0);
        target[c] += columns::term<kAbs, acc_t>(values[c], least);
        if constexpr (kAbs) lowest[p * lanes + c] = least;
      }
    }
  }
}

// The channels_last counterpart of columns::block_column_sums: sums (plane, lanes) of channels
// [begin, begin + lanes), the chunks of rows as column_sums takes them.
template <bool kAbs, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void channels_last_block_sums(const scalar_t* x, int64_t rows, int64_t channels, int64_t plane,
                                                int64_t begin, int64_t lanes, acc_t* sums, acc_t* lowest,
                                                acc_t* partial) {
  columns::add_in_row_chunks(rows, plane * channels, plane * lanes, sums, partial,
                             [&](acc_t* target, int64_t first, int64_t last) {
                               add_channels_last_rows<kAbs>(x, channels, plane, first, last, begin, lanes, target,
                                                            lowest);
                             });
}

// A task's buffers for its blocks of channels.
template <typename acc_t>
struct BlockScratch {
  std::vector<acc_t> sums, partial, least;
  GroupScratch<acc_t> grouping;
  BlockScratch(int64_t size, int64_t partial_size, bool abs) : sums(size), partial(partial_size), least(abs ? size : 0) {}
};

// blocked_tap_means for channels [begin, begin + lanes): their part of S, (lanes, plane) for NCHW
// x and (plane, lanes) for channels_last, then its position groups and the taps.
template <bool kAbs, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void tap_block_impl(const scalar_t* x, int64_t rows, int64_t channels, bool channels_last,
                                      const PlaneCounts<acc_t>& counts, acc_t count, int64_t begin, int64_t lanes,
                                      BlockScratch<acc_t>& scratch, acc_t* mean, bool* negative) {
  const int64_t plane = counts.plane();
  acc_t* sums = scratch.sums.data();
  acc_t* least = scratch.least.data();
  std::fill(scratch.least.begin(), scratch.least.end(), acc_t(0));
  if (channels_last) {
    channels_last_block_sums<kAbs>(x, rows, channels, plane, begin, lanes, sums, least, scratch.partial.data());
  } else {
    columns::block_column_sums<kAbs>(x, rows, channels * plane, begin * plane, lanes * plane, sums, least,
                                     scratch.partial.data());
  }
  if constexpr (kAbs) {
    const int64_t channel_step = channels_last ? 1 : plane, position_step = channels_last ? lanes : 1;
    for (int64_t c = 0; c < lanes; ++c) {
      negative[begin + c] = columns::had_negative(least + c * channel_step, plane, position_step);
    }
  }
  GroupScratch<acc_t>& grouping = scratch.grouping;
  grouping.groups.assign(counts.position_groups * lanes, acc_t(0));
  add_position_groups(sums, lanes, channels_last, counts.position_group.data(), plane, 0, lanes,
                      grouping.groups.data());
  group_taps(grouping.groups.data(), counts, count, begin, lanes, grouping, mean);
}

template <bool kAbs, typename scalar_t, typename acc_t>
void tap_block(const scalar_t* x, int64_t rows, int64_t channels, bool channels_last, const PlaneCounts<acc_t>& counts,
               acc_t count, int64_t begin, int64_t lanes, BlockScratch<acc_t>& scratch, acc_t* mean, bool* negative) {
  tap_block_impl<kAbs>(x, rows, channels, channels_last, counts, count, begin, lanes, scratch, mean, negative);
}

// Float blocks, also compiled for AVX2 (the loops are the same, so both give identical sums).
template <bool kAbs>
EQUINORM_AVX2_CLONES void tap_block(const float* x, int64_t rows, int64_t channels, bool channels_last,
                                    const PlaneCounts<float>& counts, float count, int64_t begin, int64_t lanes,
                                    BlockScratch<float>& scratch, float* mean, bool* negative) {
  tap_block_impl<kAbs>(x, rows, channels, channels_last, counts, count, begin, lanes, scratch, mean, negative);
}

// mean (C, kh, kw) and, with kAbs, negative (C) of x[:rows] (NCHW with short rows, or
// channels_last) in one parallel pass over blocks of channels (columns::channel_block): a block's
// part of S, its channels' columns of x as a (rows, C * plane) matrix, is summed into task scratch
// (the sums sample_sums would give) and contracted while it is in cache. One parallel region
// instead of two: waking the other threads a second time cost as much as the work on 8 x 256 x
// 14 x 14 inputs.
template <bool kAbs, typename scalar_t, typename acc_t>
void blocked_tap_means(const scalar_t* x, int64_t rows, int64_t channels, bool channels_last,
                       const PlaneCounts<acc_t>& counts, acc_t count, acc_t* mean, bool* negative) {
  const int64_t plane = counts.plane(), width = channels * plane;
  const int64_t block_channels = columns::channel_block(channels), block_size = block_channels * plane;
  const int64_t blocks = (channels + block_channels - 1) / block_channels;
  const int64_t grain = std::max<int64_t>(1, kPlaneTaskElements / (rows * block_size));
  at::parallel_for(0, blocks, grain, [&](int64_t first_block, int64_t end_block) {
    BlockScratch<acc_t> scratch(block_size, columns::block_sum_scratch(rows, width, block_size), kAbs);
    for (int64_t block = first_block; block < end_block; ++block) {
      const int64_t begin = block * block_channels, lanes = std::min(channels, begin + block_channels) - begin;
      tap_block<kAbs>(x, rows, channels, channels_last, counts, count, begin, lanes, scratch, mean, negative);
    }
  });
}

// S = x[:rows] summed over the samples: `data` (owned, or x itself).
template <typename acc_t>
struct SampleSums {
  std::unique_ptr<acc_t[]> owned;
  const acc_t* data = nullptr;
};

// S of x[:rows] (of |x| with kAbs; negative[c] then says whether channel c had a value < 0), as
// (plane, C) with position_major, else (C, plane): column sums come in x's layout, and are
// transposed when it is the other one. One sample of the accumulation type is its own sum.
template <bool kAbs, typename scalar_t, typename acc_t>
SampleSums<acc_t> sample_sums(const scalar_t* x, int64_t rows, int64_t channels, int64_t plane, bool channels_last,
                              bool position_major, bool* negative) {
  const int64_t width = channels * plane;
  SampleSums<acc_t> sums;
  const acc_t* source = nullptr;
  if constexpr (!kAbs && std::is_same_v<scalar_t, acc_t>) {
    if (rows == 1) source = x;
  }
  if (source == nullptr) {
    // column_sums writes every element: no initialisation here.
    sums.owned.reset(new acc_t[width]);
    std::vector<uint8_t> negative_columns(kAbs ? width : 0);
    columns::column_sums<kAbs>(x, rows, width, sums.owned.get(), negative_columns.data());
    if constexpr (kAbs) {
      for (int64_t c = 0; c < channels; ++c) {
        bool any = false;
        for (int64_t p = 0; p < plane; ++p) any |= negative_columns[channels_last ? p * channels + c : c * plane + p] != 0;
        negative[c] = any;
      }
    }
    source = sums.owned.get();
  }
  if (channels_last != position_major) {
    std::unique_ptr<acc_t[]> transposed(new acc_t[width]);
    transposes::transpose(source, channels_last ? plane : channels, channels_last ? channels : plane, transposed.get());
    sums.owned = std::move(transposed);
    source = sums.owned.get();
  }
  sums.data = source;
  return sums;
}

// mean (C, *kernel) and negative (C) of x[:rows]. Conv1d/2d geometries: NCHW rows of
// kPlaneRowLength or more are read plane by plane; otherwise the samples' sum is contracted with
// the channels in vector lanes (block by block as it is summed; x itself when it is its own sum).
// Conv3d: the samples' sum contracted dim by dim.
template <bool kAbs, typename scalar_t, typename acc_t>
void tap_means(const scalar_t* x, int64_t rows, int64_t channels, bool channels_last, const TapGeometry& g,
               acc_t* mean, bool* negative) {
  const acc_t count = static_cast<acc_t>(rows) * static_cast<acc_t>(g.outputs());
  if (!plane_path_applies(g)) {
    const SampleSums<acc_t> sums = sample_sums<kAbs, scalar_t, acc_t>(x, rows, channels, g.plane(), channels_last,
                                                                      false, negative);
    contract_tap_sums(sums.data, channels, g, count, mean);
    return;
  }
  const std::shared_ptr<const PlaneCounts<acc_t>> plan = cached_plane_counts<acc_t>(g);
  const PlaneCounts<acc_t>& counts = *plan;
  if (!channels_last && counts.width >= kPlaneRowLength) {
    planar_tap_means<kAbs>(x, rows, channels, counts, count, mean, negative);
    return;
  }
  const bool x_is_its_sum = !kAbs && std::is_same_v<scalar_t, acc_t> && rows == 1;
  if (!x_is_its_sum) {
    blocked_tap_means<kAbs>(x, rows, channels, channels_last, counts, count, mean, negative);
    return;
  }
  const SampleSums<acc_t> sums = sample_sums<kAbs, scalar_t, acc_t>(x, rows, channels, g.plane(), channels_last,
                                                                    channels_last, negative);
  grouped_tap_means(sums.data, channels, channels_last, counts, count, mean);
}

std::tuple<at::Tensor, at::Tensor> tap_mean(const at::Tensor& x, int64_t rows, c10::string_view geometry,
                                            bool absolute) {
  auto [readable, channel_geometry] = channel_input(x, rows);
  TORCH_CHECK(readable.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  const TapSpec spec = parse_tap_spec(geometry);
  const TapGeometry g = tap_geometry(x.sizes().slice(2), spec);
  const int64_t channels = channel_geometry.channels;
  const auto acc = accumulation_type(x.scalar_type());
  at::Tensor mean = at::empty(tap_mean_shape(channels, spec.kernel_size), x.options().dtype(acc));
  at::Tensor negative = at::empty({channels}, x.options().dtype(at::kBool));
  std::fill_n(negative.mutable_data_ptr<bool>(), channels, false);  // set per channel by abs_mean only
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tap_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = readable.const_data_ptr<scalar_t>();
    acc_t* means = mean.mutable_data_ptr<acc_t>();
    bool* flags = negative.mutable_data_ptr<bool>();
    if (absolute) {
      tap_means<true>(data, rows, channels, channel_geometry.channels_last, g, means, flags);
    } else {
      tap_means<false>(data, rows, channels, channel_geometry.channels_last, g, means, flags);
    }
  });
  return {mean, negative};
}

at::Tensor tap_mean_backward(const at::Tensor& grad, at::IntArrayRef spatial, int64_t rows,
                             c10::string_view geometry) {
  const TapSpec spec = parse_tap_spec(geometry);
  const TapGeometry g = tap_geometry(spatial, spec);
  check_tap_grad(grad, spec.kernel_size, rows);
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
