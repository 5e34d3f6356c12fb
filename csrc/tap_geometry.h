// tap_mean's arguments as the CPU and CUDA glue check them and the kernels take them: three
// spatial dims (a Conv1d/2d input gets leading dims of length 1), the padding mode as an enum.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "op_checks.h"
#include "shared/tap_mean_math.h"

namespace equinorm {

struct TapGeometry {
  tap::TapDim dims[tap::kDims];
  int mode = tap::kZeros;
  int64_t spatial_dims = 0;  // of the op's input: 1 to 3
  int64_t plane() const { return dims[0].length * dims[1].length * dims[2].length; }
  int64_t taps() const { return dims[0].kernel * dims[1].kernel * dims[2].kernel; }
  int64_t outputs() const { return dims[0].outputs * dims[1].outputs * dims[2].outputs; }
};

inline int parse_padding_mode(c10::string_view mode) {
  if (mode == "zeros") return tap::kZeros;
  if (mode == "reflect") return tap::kReflect;
  if (mode == "replicate") return tap::kReplicate;
  TORCH_CHECK(mode == "circular", "padding_mode must be \"zeros\", \"reflect\", \"replicate\" or \"circular\", got \"",
              std::string(mode), "\"");
  return tap::kCircular;
}

// The ops' geometry argument, one string:
//   "kernel_size=3,3 stride=1,1 padding=1,1,1,1 dilation=1,1 padding_mode=zeros"
// (fields in this order; padding a (before, after) pair per dim), as
// equinorm_kernels/_tap_geometry.py writes it. One string rather than four int lists and a mode:
// the Python-to-C++ conversion of an op call's int lists costs microseconds per list, more than a
// small input's whole kernel. The values are kept inline (at most 3 per dim field, 6 for padding):
// no heap allocation per call.
using SpecInts = c10::SmallVector<int64_t, 2 * tap::kDims>;

struct TapSpec {
  SpecInts kernel_size, stride, padding, dilation;
  std::string_view padding_mode;  // a view into the spec
};

namespace detail {

[[noreturn]] inline void bad_tap_spec(std::string_view spec) {
  TORCH_CHECK(false, "geometry must read \"kernel_size=<ints> stride=<ints> padding=<ints> dilation=<ints> "
              "padding_mode=<mode>\" (ints comma-separated), got \"", std::string(spec), "\"");
}

// The value of field `name` at the front of `rest`, which is then moved past it.
inline std::string_view take_field(std::string_view& rest, std::string_view name, std::string_view spec) {
  if (rest.size() <= name.size() || rest.substr(0, name.size()) != name || rest[name.size()] != '=') {
    bad_tap_spec(spec);
  }
  rest.remove_prefix(name.size() + 1);
  const size_t end = std::min(rest.find(' '), rest.size());
  const std::string_view value = rest.substr(0, end);
  rest.remove_prefix(end == rest.size() ? end : end + 1);
  return value;
}

inline SpecInts parse_ints(std::string_view text, std::string_view spec) {
  constexpr int64_t kLargest = (INT64_MAX - 9) / 10;
  SpecInts values;
  size_t i = 0;
  while (i < text.size()) {
    const bool negative = text[i] == '-';
    if (negative) ++i;
    if (i == text.size() || text[i] < '0' || text[i] > '9') bad_tap_spec(spec);
    int64_t value = 0;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
      if (value > kLargest) bad_tap_spec(spec);
      value = value * 10 + (text[i] - '0');
    }
    values.push_back(negative ? -value : value);
    if (i < text.size()) {
      if (text[i] != ',' || i + 1 == text.size()) bad_tap_spec(spec);
      ++i;
    }
  }
  if (values.empty()) bad_tap_spec(spec);
  return values;
}

}  // namespace detail

inline TapSpec parse_tap_spec(c10::string_view geometry) {
  const std::string_view spec(geometry.data(), geometry.size());
  std::string_view rest = spec;
  TapSpec parsed;
  parsed.kernel_size = detail::parse_ints(detail::take_field(rest, "kernel_size", spec), spec);
  parsed.stride = detail::parse_ints(detail::take_field(rest, "stride", spec), spec);
  parsed.padding = detail::parse_ints(detail::take_field(rest, "padding", spec), spec);
  parsed.dilation = detail::parse_ints(detail::take_field(rest, "dilation", spec), spec);
  parsed.padding_mode = detail::take_field(rest, "padding_mode", spec);
  if (!rest.empty()) detail::bad_tap_spec(spec);
  return parsed;
}

// Checks the convolution arguments against the spatial sizes (kernel_size, stride and dilation
// one value per dim, padding a (before, after) pair per dim).
inline TapGeometry tap_geometry(at::IntArrayRef spatial, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view padding_mode) {
  const int64_t n = static_cast<int64_t>(spatial.size());
  TORCH_CHECK(n >= 1 && n <= tap::kDims, "x must have 1 to 3 spatial dims, got ", n);
  TORCH_CHECK(static_cast<int64_t>(kernel_size.size()) == n && static_cast<int64_t>(stride.size()) == n &&
                  static_cast<int64_t>(dilation.size()) == n && static_cast<int64_t>(padding.size()) == 2 * n,
              "kernel_size, stride and dilation need ", n, " values and padding ", 2 * n, " (before, after per dim)");
  TapGeometry g;
  g.mode = parse_padding_mode(padding_mode);
  g.spatial_dims = n;
  for (int64_t i = 0; i < n; ++i) {
    tap::TapDim& d = g.dims[tap::kDims - n + i];
    d.length = spatial[i];
    d.kernel = kernel_size[i];
    d.stride = stride[i];
    d.dilation = dilation[i];
    d.before = padding[2 * i];
    d.after = padding[2 * i + 1];
    TORCH_CHECK(d.length >= 1, "x must have a non-empty spatial extent, got ", spatial);
    TORCH_CHECK(d.kernel >= 1 && d.stride >= 1 && d.dilation >= 1, "kernel_size, stride and dilation must be >= 1, got ",
                kernel_size, ", ", stride, ", ", dilation);
    TORCH_CHECK(d.before >= 0 && d.after >= 0, "padding must be >= 0, got ", padding);
    TORCH_CHECK(g.mode != tap::kReflect || (d.before < d.length && d.after < d.length),
                "padding must be smaller than the input size for padding_mode \"reflect\", got ", padding,
                " for spatial size ", spatial);
    TORCH_CHECK(g.mode != tap::kCircular || (d.before <= d.length && d.after <= d.length),
                "padding must be at most the input size for padding_mode \"circular\", got ", padding,
                " for spatial size ", spatial);
    TORCH_CHECK(d.length + d.before + d.after >= d.dilation * (d.kernel - 1) + 1, "kernel_size ", kernel_size,
                " (dilation ", dilation, ") is larger than the padded input ", spatial, " + padding ", padding);
    d.outputs = tap::output_positions(d.length, d.kernel, d.stride, d.dilation, d.before, d.after);
  }
  return g;
}

// tap_geometry of a spec (see TapSpec).
inline TapGeometry tap_geometry(at::IntArrayRef spatial, const TapSpec& spec) {
  return tap_geometry(spatial, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                      c10::string_view(spec.padding_mode.data(), spec.padding_mode.size()));
}

// The output shape (C, *kernel_size).
inline c10::SmallVector<int64_t, tap::kDims + 1> tap_mean_shape(int64_t channels, at::IntArrayRef kernel_size) {
  c10::SmallVector<int64_t, tap::kDims + 1> shape{channels};
  shape.insert(shape.end(), kernel_size.begin(), kernel_size.end());
  return shape;
}

// The backward's input gradient plane shape (C, *spatial).
inline c10::SmallVector<int64_t, tap::kDims + 1> tap_plane_shape(int64_t channels, at::IntArrayRef spatial) {
  c10::SmallVector<int64_t, tap::kDims + 1> shape{channels};
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  return shape;
}

inline void check_tap_grad(const at::Tensor& grad, at::IntArrayRef kernel_size, int64_t rows) {
  check_floating(grad, "grad");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "grad must be float32 or float64 (the accumulation dtype), got ", grad.scalar_type());
  TORCH_CHECK(grad.dim() == static_cast<int64_t>(kernel_size.size()) + 1 && grad.sizes().slice(1) == kernel_size,
              "grad must have shape (C, *kernel_size) with kernel_size ", kernel_size, ", got ", grad.sizes());
  TORCH_CHECK(grad.size(0) >= 1, "grad must have at least one channel");
  TORCH_CHECK(rows >= 1, "rows must be >= 1, got ", rows);
}

}  // namespace equinorm
