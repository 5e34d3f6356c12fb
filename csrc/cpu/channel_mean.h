#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace equinorm {
namespace cpu {

// (C,) means of x[:rows] (of |x[:rows]| for statistic "abs_mean") over every dim but 1, in the
// accumulation dtype, and with "abs_mean" (C,) bool, the channels that had a value < 0 (with
// "mean" an empty tensor).
std::tuple<at::Tensor, at::Tensor> channel_mean(const at::Tensor& x, int64_t rows, c10::string_view statistic);

}  // namespace cpu
}  // namespace equinorm
