// Transposes on the CPU: what makes the channels of a (C, positions) matrix the vector lanes of a
// later loop, either by writing it as (positions, C) or by adding each position's channels into a
// running sum as one vector. Compilers leave a transpose as one scalar load and store per value;
// 8x8 float tiles go through AVX2 shuffles (24 per 64 values) where the CPU has them. Either way
// every value is moved, or added, exactly as the scalar path does, so results do not depend on it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EQUINORM_AVX2_TRANSPOSE 1
#endif

namespace equinorm {
namespace cpu {
namespace transposes {

constexpr int64_t kTile = 8;
constexpr int64_t kTaskValues = 1 << 15;  // values one parallel task should at least move

#ifdef EQUINORM_AVX2_TRANSPOSE
// columns[j] = element j of every rows[i]: the 8x8 transpose in registers.
__attribute__((target("avx2"))) inline void transpose_registers(const __m256 (&rows)[8], __m256 (&columns)[8]) {
  __m256 pairs[8], quads[8];
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    quads[i] = _mm256_shuffle_ps(pairs[i], pairs[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    quads[i + 1] = _mm256_shuffle_ps(pairs[i], pairs[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    quads[i + 2] = _mm256_shuffle_ps(pairs[i + 1], pairs[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    quads[i + 3] = _mm256_shuffle_ps(pairs[i + 1], pairs[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    columns[i] = _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x20);
    columns[i + 4] = _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x31);
  }
}

// out rows 0..7 (stride out_stride) = the columns of the 8x8 tile at in (stride in_stride).
__attribute__((target("avx2"))) inline void tile_avx2(const float* in, int64_t in_stride, float* out,
                                                      int64_t out_stride) {
  __m256 rows[8], columns[8];
  for (int i = 0; i < 8; ++i) rows[i] = _mm256_loadu_ps(in + i * in_stride);
  transpose_registers(rows, columns);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + i * out_stride, columns[i]);
}
#endif

// Runs of neighbouring positions in one group are added up before they meet the group's sum:
// kTile positions at a time (from a multiple of kTile), each run's values from its first, then the
// run's total into groups[group * group_stride]. A run per group update keeps the updates of one
// group (the interior of a row) from waiting on each other through memory. One channel's
// positions [0, n), n <= kTile, the scalar form of what the AVX2 tile does per lane.
template <typename T>
inline void add_position_runs(const T* values, int64_t n, const int64_t* group_of, T* groups, int64_t group_stride) {
  T run = values[0];
  int64_t group = group_of[0];
  for (int64_t p = 1; p < n; ++p) {
    if (group_of[p] == group) {
      run += values[p];
      continue;
    }
    groups[group * group_stride] += run;
    run = values[p];
    group = group_of[p];
  }
  groups[group * group_stride] += run;
}

#ifdef EQUINORM_AVX2_TRANSPOSE
// add_position_runs for the 8x8 tile at in (channels c < 8, positions p < 8): each position's 8
// channels are one vector, groups + c the channels' sums of a group.
__attribute__((target("avx2"))) inline void add_tile_columns_avx2(const float* in, int64_t in_stride,
                                                                  const int64_t* group_of, float* groups,
                                                                  int64_t group_stride) {
  __m256 rows[8], columns[8];
  for (int i = 0; i < 8; ++i) rows[i] = _mm256_loadu_ps(in + i * in_stride);
  transpose_registers(rows, columns);
  __m256 run = columns[0];
  int64_t group = group_of[0];
  for (int p = 1; p < 8; ++p) {
    if (group_of[p] == group) {
      run = _mm256_add_ps(run, columns[p]);
      continue;
    }
    float* target = groups + group * group_stride;
    _mm256_storeu_ps(target, _mm256_add_ps(_mm256_loadu_ps(target), run));
    run = columns[p];
    group = group_of[p];
  }
  float* target = groups + group * group_stride;
  _mm256_storeu_ps(target, _mm256_add_ps(_mm256_loadu_ps(target), run));
}

inline bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
#endif

// groups[group_of[p] * group_stride + c] += in[c * in_stride + p] for rows (channels) c of in
// (rows, in_stride), positions p < in_stride, added as add_position_runs does: whole blocks of 8
// rows where AVX2 is there (the last positions, fewer than 8, per row). Returns the rows done
// (the caller adds the rest with add_position_runs, kTile positions at a time).
inline int64_t add_tile_columns(const float* in, int64_t rows, int64_t in_stride, const int64_t* group_of,
                                float* groups, int64_t group_stride) {
#ifdef EQUINORM_AVX2_TRANSPOSE
  if (!has_avx2()) return 0;
  int64_t c0 = 0;
  for (; c0 + kTile <= rows; c0 += kTile) {
    int64_t p0 = 0;
    for (; p0 + kTile <= in_stride; p0 += kTile) {
      add_tile_columns_avx2(in + c0 * in_stride + p0, in_stride, group_of + p0, groups + c0, group_stride);
    }
    if (p0 == in_stride) continue;
    for (int64_t c = c0; c < c0 + kTile; ++c) {
      add_position_runs(in + c * in_stride + p0, in_stride - p0, group_of + p0, groups + c, group_stride);
    }
  }
  return c0;
#else
  (void)in, (void)rows, (void)in_stride, (void)group_of, (void)groups, (void)group_stride;
  return 0;
#endif
}

// out (cols, rows) = in (rows, cols) for rows [row_begin, row_end).
template <typename T>
void transpose_rows(const T* in, int64_t rows, int64_t cols, int64_t row_begin, int64_t row_end, T* out) {
#ifdef EQUINORM_AVX2_TRANSPOSE
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx2()) {
      int64_t i0 = row_begin;
      for (; i0 + kTile <= row_end; i0 += kTile) {
        int64_t j0 = 0;
        for (; j0 + kTile <= cols; j0 += kTile) tile_avx2(in + i0 * cols + j0, cols, out + j0 * rows + i0, rows);
        for (int64_t i = i0; i < i0 + kTile; ++i) {
          for (int64_t j = j0; j < cols; ++j) out[j * rows + i] = in[i * cols + j];
        }
      }
      row_begin = i0;  // the last rows, fewer than a tile, as below
    }
  }
#endif
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kTile) {
    const int64_t i1 = std::min(row_end, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) out[j * rows + i] = in[i * cols + j];
      }
    }
  }
}

// out (cols, rows) = in (rows, cols); tasks take whole tiles of rows.
template <typename T>
void transpose(const T* in, int64_t rows, int64_t cols, T* out) {
  const int64_t tiles = (rows + kTile - 1) / kTile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kTaskValues / (kTile * cols)), [&](int64_t begin, int64_t end) {
    transpose_rows(in, rows, cols, begin * kTile, std::min(rows, end * kTile), out);
  });
}

}  // namespace transposes
}  // namespace cpu
}  // namespace equinorm
