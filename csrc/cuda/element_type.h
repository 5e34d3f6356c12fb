// The launchers' element type of a torch dtype, for the CUDA glue (*.cpp).
#pragma once

#include <ATen/ATen.h>

#include "cuda/launchers.h"

namespace equinorm {
namespace cuda {

inline ElementType element_type(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return ElementType::kHalf;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    case at::kFloat:
      return ElementType::kFloat;
    case at::kDouble:
      return ElementType::kDouble;
    default:
      break;
  }
  TORCH_CHECK(false, "the CUDA kernels take float16, bfloat16, float32 or float64, got ", type);
  return ElementType::kFloat;  // not reached: the check throws
}

}  // namespace cuda
}  // namespace equinorm
