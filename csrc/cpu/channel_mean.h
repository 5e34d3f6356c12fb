#pragma once

#include <ATen/ATen.h>

namespace equinorm {
namespace cpu {

// (C,) means of x[:rows] over every dim but 1, in the accumulation dtype.
at::Tensor channel_mean(const at::Tensor& x, int64_t rows);

}  // namespace cpu
}  // namespace equinorm
