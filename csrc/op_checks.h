// Argument checks and tensor geometry shared by the CPU and CUDA glue of every op.
//
// The Python wrappers validate arguments with friendlier messages first; these checks make the
// ops safe when called directly through torch.ops.equinorm_kernels.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace equinorm {

// float64 for float64 operands, float32 for float16/bfloat16/float32.
inline at::ScalarType accumulation_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble, name,
              " must be float16, bfloat16, float32 or float64, got ", type);
}

inline void check_same_device(const at::Tensor& reference, const at::Tensor& t, const char* ref_name,
                              const char* name) {
  TORCH_CHECK(t.device() == reference.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              reference.device());
}

// "single_pass" -> false, "exact" -> true.
inline bool parse_exact_mode(c10::string_view mode) {
  TORCH_CHECK(mode == "single_pass" || mode == "exact", "mode must be \"single_pass\" or \"exact\", got \"",
              std::string(mode), "\"");
  return mode == "exact";
}

// true for "abs_mean" (the mean of |x|), false for "mean".
inline bool parse_abs_statistic(c10::string_view statistic) {
  TORCH_CHECK(statistic == "mean" || statistic == "abs_mean", "statistic must be \"mean\" or \"abs_mean\", got \"",
              std::string(statistic), "\"");
  return statistic == "abs_mean";
}

// x (N, C, *spatial) as the channel-mean kernels read it: planes of `spatial` elements per
// (sample, channel) (NCHW), or one vector of C channels per (sample, position) (channels_last).
struct ChannelGeometry {
  int64_t rows = 0;      // samples that feed the statistics
  int64_t channels = 0;  // C
  int64_t spatial = 0;   // elements per channel per sample
  bool channels_last = false;
};

// Checks x and rows; returns x in a layout the kernels read (a copy only for other strides).
inline std::pair<at::Tensor, ChannelGeometry> channel_input(const at::Tensor& x, int64_t rows) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have shape (N, C, *spatial), got ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(rows >= 1 && rows <= x.size(0), "rows must be in [1, N = ", x.size(0), "], got ", rows);
  ChannelGeometry geometry;
  geometry.rows = rows;
  geometry.channels = x.size(1);
  geometry.spatial = x.numel() / (x.size(0) * x.size(1));
  at::Tensor readable = x;
  const bool nhwc = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                    (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (x.is_contiguous() && geometry.spatial > 1) {
    geometry.channels_last = false;
  } else if (nhwc || (x.is_contiguous() && geometry.spatial == 1)) {
    geometry.channels_last = true;  // a (N, C) input is the channels_last case with one position
  } else {
    readable = x.contiguous();
  }
  return {readable, geometry};
}

// A weight (D, C/groups, *kernel) seen as D rows of C/groups x K values, stored either as
// (c, t) (contiguous) or as (t, c) (channels_last conv weights).
struct WeightGeometry {
  int64_t out_channels = 0;    // D
  int64_t group_channels = 0;  // C / groups
  int64_t taps = 0;            // K
  int64_t groups = 1;
  bool channels_last = false;
  // mean holds one value per (input channel, tap), (C, *kernel), rather than one per channel.
  bool per_tap_means = false;
  int64_t row_size() const { return group_channels * taps; }
  // Values of mean (and grad_mean) per group, stored (c, t) whatever the weight's layout.
  int64_t mean_values_per_group() const { return per_tap_means ? row_size() : group_channels; }
  int64_t channel_stride() const { return channels_last ? 1 : taps; }
  int64_t tap_stride() const { return channels_last ? group_channels : 1; }
  int64_t outputs_per_group() const { return out_channels / groups; }
};

inline std::pair<at::Tensor, WeightGeometry> weight_input(const at::Tensor& weight, int64_t groups) {
  check_floating(weight, "weight");
  TORCH_CHECK(weight.dim() >= 2, "weight must have shape (D, C/groups, *kernel), got ", weight.sizes());
  TORCH_CHECK(weight.numel() > 0, "weight must not be empty");
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "groups must be a positive divisor of D = ",
              weight.size(0), ", got ", groups);
  WeightGeometry geometry;
  geometry.out_channels = weight.size(0);
  geometry.group_channels = weight.size(1);
  geometry.taps = weight.numel() / (weight.size(0) * weight.size(1));
  geometry.groups = groups;
  TORCH_CHECK(geometry.row_size() >= 2, "weight needs at least 2 values per output channel, got shape ",
              weight.sizes());
  at::Tensor readable = weight;
  const bool nhwc = (weight.dim() == 4 && weight.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                    (weight.dim() == 5 && weight.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (weight.is_contiguous()) {
    geometry.channels_last = false;
  } else if (nhwc) {
    geometry.channels_last = true;
  } else {
    readable = weight.contiguous();
  }
  return {readable, geometry};
}

// A new tensor shaped like the weight, in the layout the geometry describes.
inline at::Tensor empty_like_weight(const at::Tensor& weight, const WeightGeometry& geometry,
                                    at::ScalarType type) {
  auto options = weight.options().dtype(type);
  if (!geometry.channels_last) return at::empty(weight.sizes(), options);
  const auto format = weight.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return at::empty(weight.sizes(), options.memory_format(format));
}

inline void check_per_channel(const at::Tensor& t, const char* name, int64_t size, at::ScalarType type,
                              const at::Tensor& weight) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, name, " must have shape (", size, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, " (the accumulation dtype of weight ",
              weight.scalar_type(), "), got ", t.scalar_type());
  check_same_device(weight, t, "weight", name);
}

// Checks mean, (C,) or per tap (C, *kernel), and gain (D,) against the weight, in the accumulation
// dtype; notes in the geometry which kind of mean it is.
inline void check_mean_and_gain(const at::Tensor& weight, WeightGeometry& geometry, const at::Tensor& mean,
                                const at::Tensor& gain) {
  const auto acc = accumulation_type(weight.scalar_type());
  const int64_t channels = geometry.group_channels * geometry.groups;
  geometry.per_tap_means = mean.dim() >= 2;
  if (geometry.per_tap_means) {
    std::vector<int64_t> expected{channels};
    for (int64_t k = 2; k < weight.dim(); ++k) expected.push_back(weight.size(k));
    TORCH_CHECK(mean.sizes() == at::IntArrayRef(expected), "mean must have shape (C,) = (", channels,
                ",) or, per tap, (C, *kernel) = ", at::IntArrayRef(expected), ", got ", mean.sizes());
    TORCH_CHECK(mean.scalar_type() == acc, "mean must be ", acc, " (the accumulation dtype of weight ",
                weight.scalar_type(), "), got ", mean.scalar_type());
    check_same_device(weight, mean, "weight", "mean");
  } else {
    check_per_channel(mean, "mean", channels, acc, weight);
  }
  check_per_channel(gain, "gain", geometry.out_channels, acc, weight);
}

inline void check_stats(const at::Tensor& stats, const at::Tensor& weight, const WeightGeometry& geometry,
                        int64_t columns) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == geometry.out_channels && stats.size(1) == columns,
              "stats must have shape (", geometry.out_channels, ", ", columns, "), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kDouble, "stats must be float64 (the precision of the weight math), got ",
              stats.scalar_type());
  check_same_device(weight, stats, "weight", "stats");
}

// grad_out checked against the weight and laid out like the weight the kernels read.
inline at::Tensor grad_in_weight_layout(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const WeightGeometry& geometry) {
  TORCH_CHECK(grad_out.sizes() == weight.sizes() && grad_out.scalar_type() == weight.scalar_type(),
              "grad_out must match weight (", weight.sizes(), ", ", weight.scalar_type(), "), got ", grad_out.sizes(),
              ", ", grad_out.scalar_type());
  check_same_device(weight, grad_out, "weight", "grad_out");
  const auto format = !geometry.channels_last ? at::MemoryFormat::Contiguous
                      : weight.dim() == 4     ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::ChannelsLast3d;
  return grad_out.contiguous(format);
}

inline void check_ratio_and_eps(double ratio, double eps) {
  TORCH_CHECK(ratio > 0 && std::isfinite(ratio), "ratio must be a positive finite number, got ", ratio);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "eps must be a positive finite number, got ", eps);
}

}  // namespace equinorm
