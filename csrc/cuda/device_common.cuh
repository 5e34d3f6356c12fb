// Building blocks shared by the CUDA kernels: element conversions, vector loads, fixed-order
// reductions and the element-type dispatch of the launchers.
//
// Every reduction here adds in an order fixed by the shape alone (never by timing or atomics),
// so the kernels built on them give bit-identical results across runs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/launchers.h"

// Every kernel launch: EQUINORM_LAUNCH(grid, block, shared_bytes, stream, kernel)(arguments).
// Under nvcc this is the <<<...>>> launch. A host-only build that runs the kernels on the CPU
// (tests/cuda_emulation) defines the macro before this header, so the launch sites need no other
// change. The kernel comes last so that the commas of its template arguments need no parentheses.
#ifndef EQUINORM_LAUNCH
#define EQUINORM_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace equinorm {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// float for the 16- and 32-bit types, double for double.
template <typename scalar_t>
struct Accumulation {
  using type = float;
};
template <>
struct Accumulation<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename Accumulation<scalar_t>::type;

__device__ __forceinline__ float to_acc(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_acc(float value) { return value; }
__device__ __forceinline__ double to_acc(double value) { return value; }

// Round to nearest even, like the CPU kernels' casts.
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_type<scalar_t> value);
template <>
__device__ __forceinline__ __half from_acc<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }
template <>
__device__ __forceinline__ float from_acc<float>(float value) { return value; }
template <>
__device__ __forceinline__ double from_acc<double>(double value) { return value; }

// An unsigned word of each load width, so one instruction moves kVec elements.
template <int kBytes>
struct LoadWord;
template <>
struct LoadWord<2> {
  using type = unsigned short;
};
template <>
struct LoadWord<4> {
  using type = unsigned int;
};
template <>
struct LoadWord<8> {
  using type = uint2;
};
template <>
struct LoadWord<16> {
  using type = uint4;
};

template <typename scalar_t>
constexpr int max_vector_width() {
  return kMaxLoadBytes / static_cast<int>(sizeof(scalar_t));
}

// kVec consecutive elements through the read-only cache; `source` must be aligned to kVec elements.
template <int kVec, typename scalar_t>
__device__ __forceinline__ void load_vector(const scalar_t* source, scalar_t (&values)[kVec]) {
  using Word = typename LoadWord<sizeof(scalar_t) * kVec>::type;
  const Word word = __ldg(reinterpret_cast<const Word*>(source));
  memcpy(values, &word, sizeof(Word));
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> load_acc(const scalar_t* source) {
  scalar_t value[1];
  load_vector<1>(source, value);
  return to_acc(value[0]);
}

// Sum over each aligned group of `width` lanes (a power of two <= 32); every lane of the group
// gets the same bits (a butterfly adds the same pairs on both sides). All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

// ---- host helpers (the arithmetic of the plans is in cuda/launch_plans.h) ----

inline bool is_aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

inline bool fits_grid(int64_t blocks) { return blocks >= 1 && blocks <= INT_MAX; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls visit(TypeTag<scalar_t>{}) with the CUDA type of `type`.
template <typename Visit>
cudaError_t visit_element_type(ElementType type, Visit&& visit) {
  switch (type) {
    case ElementType::kHalf:
      return visit(TypeTag<__half>{});
    case ElementType::kBFloat16:
      return visit(TypeTag<__nv_bfloat16>{});
    case ElementType::kFloat:
      return visit(TypeTag<float>{});
    case ElementType::kDouble:
      return visit(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

// Calls visit(std::integral_constant<int, kVec>{}) for a supported vector width of scalar_t.
template <typename scalar_t, typename Visit>
cudaError_t visit_vector_width(int vec, Visit&& visit) {
  constexpr int kWidest = max_vector_width<scalar_t>();
  switch (vec) {
    case 1:
      return visit(std::integral_constant<int, 1>{});
    case 2:
      if constexpr (kWidest >= 2) return visit(std::integral_constant<int, 2>{});
      break;
    case 4:
      if constexpr (kWidest >= 4) return visit(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (kWidest >= 8) return visit(std::integral_constant<int, 8>{});
      break;
  }
  return cudaErrorInvalidValue;
}

inline size_t element_size(ElementType type) {
  switch (type) {
    case ElementType::kHalf:
    case ElementType::kBFloat16:
      return 2;
    case ElementType::kFloat:
      return 4;
    case ElementType::kDouble:
      return 8;
  }
  return 0;
}

inline size_t accumulation_size(ElementType type) { return type == ElementType::kDouble ? 8 : 4; }

}  // namespace cuda
}  // namespace equinorm
