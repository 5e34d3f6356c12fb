// equinorm_weight and equinorm_forward, composed the same way on every device from its two
// primitives: channel_mean(x, rows, statistic) and weight_transform(weight, mean, gain, ratio, groups, exact, eps).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "op_checks.h"

namespace equinorm {

using ChannelMeanFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, int64_t, c10::string_view);
using WeightTransformFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double, int64_t, bool, double);

template <ChannelMeanFn channel_mean, WeightTransformFn weight_transform>
struct EquiNormEntryPoints {
  static std::tuple<at::Tensor, at::Tensor> equinorm_weight(const at::Tensor& weight, const at::Tensor& mean,
                                                            const at::Tensor& gain, double ratio, int64_t groups,
                                                            c10::string_view mode, double eps) {
    return weight_transform(weight, mean, gain, ratio, groups, parse_exact_mode(mode), eps);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> equinorm_forward(
      const at::Tensor& x, int64_t rows, const at::Tensor& weight, const at::Tensor& gain, double ratio,
      int64_t groups, c10::string_view mode, double eps, c10::string_view statistic) {
    const bool exact = parse_exact_mode(mode);
    TORCH_CHECK(accumulation_type(x.scalar_type()) == accumulation_type(weight.scalar_type()), "x (",
                x.scalar_type(), ") and weight (", weight.scalar_type(),
                ") must share an accumulation dtype: both float64 or neither");
    check_same_device(weight, x, "weight", "x");
    auto [mean, negative] = channel_mean(x, rows, statistic);
    auto [out, stats] = weight_transform(weight, mean, gain, ratio, groups, exact, eps);
    return {out, mean, stats, negative};
  }
};

}  // namespace equinorm
