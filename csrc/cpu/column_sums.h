// Column sums of a row-major (rows, width) matrix on the CPU: what channel_mean reads channels_last
// inputs and NCHW inputs with small planes as, and what tap_mean sums its samples into.
//
// Wide rows: tasks own blocks of columns and add every row into them. Narrow rows: rows are cut
// into chunks of a size fixed by the shape, each chunk adds its rows into its own partial sums,
// and the partials are added in chunk order. Either way each column is added in an order fixed by
// the shape (never by the thread count), vectorised along the row. With kAbs the sums are of
// |v|, and each column's lowest value (starting from 0) says whether it had a value < 0: a float
// minimum vectorises with the sums, where a byte flag beside float lanes does not.
#pragma once

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/reductions.h"

namespace equinorm {
namespace cpu {
namespace columns {

constexpr int64_t kTaskElements = 1 << 15;   // values one parallel task should at least add
constexpr int64_t kChunkElements = 1 << 14;  // values per chunk of narrow rows: its partial sums stay accurate
constexpr int64_t kMaxChunkRows = 1024;
constexpr int64_t kWideRow = 4096;
constexpr int64_t kColumnBlock = 8192;
// Rows go kRowUnroll at a time through a register: a running sum is loaded and stored once per
// kRowUnroll rows (its additions keep the order of one row at a time). Only where a row's segment
// spans kUnrolledColumns or more: the reads then stay kRowUnroll long sequential streams, where
// shorter segments would interleave rows a few cache lines at a time and defeat the prefetchers
// (measured on a (128 x 28 x 28, 128) channels_last input: 1.5x slower than one row at a time).
constexpr int64_t kRowUnroll = 4;
constexpr int64_t kUnrolledColumns = 1024;

// One value as the sums take it: |v| for kAbs (lowest keeps the least value seen), else v.
template <bool kAbs, typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE acc_t term(scalar_t value, acc_t& lowest) {
  const acc_t v = static_cast<acc_t>(value);
  if constexpr (kAbs) {
    lowest = v < lowest ? v : lowest;
    return std::abs(v);
  } else {
    return v;
  }
}

// Rows [first_row, end_row) of columns [begin, end) added into sums (and, for kAbs, their least
// values into lowest), in row order.
template <bool kAbs, typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void add_rows(acc_t* sums, acc_t* lowest, const scalar_t* x, int64_t width, int64_t first_row,
                                int64_t end_row, int64_t begin, int64_t end) {
  int64_t row = first_row;
  for (; end - begin >= kUnrolledColumns && row + kRowUnroll <= end_row; row += kRowUnroll) {
    const scalar_t* r0 = x + row * width;
    const scalar_t* r1 = r0 + width;
    const scalar_t* r2 = r1 + width;
    const scalar_t* r3 = r2 + width;
    for (int64_t j = begin; j < end; ++j) {
      acc_t least = kAbs ? lowest[j] : acc_t(0);
      acc_t sum = sums[j];
      sum += term<kAbs>(r0[j], least);
      sum += term<kAbs>(r1[j], least);
      sum += term<kAbs>(r2[j], least);
      sum += term<kAbs>(r3[j], least);
      sums[j] = sum;
      if constexpr (kAbs) lowest[j] = least;
    }
  }
  for (; row < end_row; ++row) {
    const scalar_t* values = x + row * width;
    for (int64_t j = begin; j < end; ++j) {
      acc_t least = kAbs ? lowest[j] : acc_t(0);
      sums[j] += term<kAbs>(values[j], least);
      if constexpr (kAbs) lowest[j] = least;
    }
  }
}

// The float case, also compiled for AVX2 (the loops are the same, so both give identical sums).
template <bool kAbs>
EQUINORM_AVX2_CLONES void add_float_rows(float* sums, float* lowest, const float* x, int64_t width, int64_t first_row,
                                         int64_t end_row, int64_t begin, int64_t end) {
  add_rows<kAbs>(sums, lowest, x, width, first_row, end_row, begin, end);
}

template <bool kAbs, typename acc_t, typename scalar_t>
void add_block(acc_t* sums, acc_t* lowest, const scalar_t* x, int64_t width, int64_t first_row, int64_t end_row,
               int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    add_float_rows<kAbs>(sums, lowest, x, width, first_row, end_row, begin, end);
  } else {
    add_rows<kAbs>(sums, lowest, x, width, first_row, end_row, begin, end);
  }
}

// Rows column_sums adds up before adding the partial sums (rows: one run).
inline int64_t row_chunk(int64_t rows, int64_t width) {
  return width >= kWideRow ? rows : std::clamp<int64_t>(kChunkElements / width, 1, kMaxChunkRows);
}

// total (width) = the column sums of x (of |x| for kAbs, negative (width) then set to 1 where a
// column had a value < 0); both written in full. The least values live in per-task scratch, for
// the block of columns, or the chunk, the task is adding: nothing of x's size is allocated besides
// the chunks' partial sums.
template <bool kAbs, typename scalar_t, typename acc_t>
void column_sums(const scalar_t* x, int64_t rows, int64_t width, acc_t* total, uint8_t* negative) {
  if (width >= kWideRow) {
    // Blocks of columns small enough that their running sums stay in cache while every row's
    // segment of them streams in; a task takes whole blocks, at least kTaskElements values.
    const int64_t blocks = (width + kColumnBlock - 1) / kColumnBlock;
    const int64_t grain = std::max<int64_t>(1, kTaskElements / (kColumnBlock * rows));
    at::parallel_for(0, blocks, grain, [&](int64_t first_block, int64_t end_block) {
      std::vector<acc_t> least(kAbs ? kColumnBlock : 0);
      for (int64_t block = first_block; block < end_block; ++block) {
        const int64_t begin = block * kColumnBlock, size = std::min(width, begin + kColumnBlock) - begin;
        std::fill(total + begin, total + begin + size, acc_t(0));  // zeroed here, while the block is in cache
        std::fill(least.begin(), least.end(), acc_t(0));
        add_block<kAbs>(total + begin, least.data(), x + begin, width, 0, rows, 0, size);
        if constexpr (kAbs) {
          for (int64_t j = 0; j < size; ++j) negative[begin + j] = least[j] < acc_t(0) ? 1 : 0;
        }
      }
    });
    return;
  }
  const int64_t chunk = row_chunk(rows, width);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<acc_t> chunk_sums(chunks * width, acc_t(0));
  // Each chunk's least values, kept as values: the least of them all is a vectorised minimum (a
  // byte flag per column and chunk, set and merged one at a time, cost as much as the sums).
  std::vector<acc_t> chunk_least(kAbs ? chunks * width : 0, acc_t(0));
  const int64_t grain = std::max<int64_t>(1, kTaskElements / (chunk * width));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      add_block<kAbs>(chunk_sums.data() + k * width, chunk_least.data() + (kAbs ? k * width : 0), x, width, k * chunk,
                      std::min(rows, (k + 1) * chunk), 0, width);
    }
  });
  std::fill(total, total + width, acc_t(0));
  for (int64_t k = 0; k < chunks; ++k) add_row(total, chunk_sums.data() + k * width, width);
  if constexpr (kAbs) {
    std::vector<acc_t> least(width, acc_t(0));
    for (int64_t k = 0; k < chunks; ++k) lower_to(least.data(), chunk_least.data() + k * width, width);
    for (int64_t j = 0; j < width; ++j) negative[j] = least[j] < acc_t(0) ? 1 : 0;
  }
}

// Whether any of `count` least values, `step` apart, is below zero: a channel's flag from the
// least values of its columns (lowest, as add_block leaves it).
template <typename acc_t>
inline bool had_negative(const acc_t* lowest, int64_t count, int64_t step) {
  bool any = false;
  for (int64_t i = 0; i < count; ++i) any |= lowest[i * step] < acc_t(0);
  return any;
}

// Channels per block for tasks that own blocks of channels (each a run of columns): up to
// kMaxChannelBlock, fewer where that leaves a thread without a block. A channel's sums do not
// depend on which block it is in, so neither do results.
constexpr int64_t kMaxChannelBlock = 32;
inline int64_t channel_block(int64_t channels) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (channels + threads - 1) / threads;
  return std::clamp<int64_t>((per_thread + 7) / 8 * 8, 8, kMaxChannelBlock);
}

// Values of the `partial` scratch block_column_sums needs for blocks of up to `size` columns.
inline int64_t block_sum_scratch(int64_t rows, int64_t width, int64_t size) {
  return row_chunk(rows, width) >= rows ? 0 : size;
}

// sums (size) = a block of columns of a (rows, width) matrix added up in the row chunks
// column_sums takes (row_chunk), so that each column gets column_sums' additions in its order:
// add(target, first, last) adds rows [first, last) of the block into target; with more than one
// chunk, each chunk goes into `partial` (size values) and is then added to sums, in chunk order.
template <typename acc_t, typename AddRows>
C10_ALWAYS_INLINE void add_in_row_chunks(int64_t rows, int64_t width, int64_t size, acc_t* sums, acc_t* partial,
                                         AddRows&& add) {
  std::fill(sums, sums + size, acc_t(0));
  const int64_t chunk = row_chunk(rows, width);
  if (chunk >= rows) {  // one chunk: its partial sums would be added to zeros
    add(sums, 0, rows);
    return;
  }
  for (int64_t first = 0; first < rows; first += chunk) {
    std::fill(partial, partial + size, acc_t(0));
    add(partial, first, std::min(rows, first + chunk));
    add_row(sums, partial, size);
  }
}

// sums (size) = the column sums of columns [begin, begin + size) of x (rows, width), of |x| for
// kAbs (lowest (size) lowered to each column's least value; start it at 0): the same values, in
// the same order, as column_sums gives for these columns, for a task that owns a block of columns
// and uses them at once. `partial` is scratch of `size` values for narrow rows (see
// block_sum_scratch).
// Always inlined: the callers' AVX2 clones must compile it, and add_block, for AVX2 too.
template <bool kAbs, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void block_column_sums(const scalar_t* x, int64_t rows, int64_t width, int64_t begin, int64_t size,
                                         acc_t* sums, acc_t* lowest, acc_t* partial) {
  add_in_row_chunks(rows, width, size, sums, partial, [&](acc_t* target, int64_t first, int64_t last) {
    add_block<kAbs>(target, lowest, x + begin, width, first, last, 0, size);
  });
}

}  // namespace columns
}  // namespace cpu
}  // namespace equinorm
