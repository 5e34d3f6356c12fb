// equinorm_conv_train_forward and equinorm_linear_train_forward: an EquiNorm layer's training
// forward in one call.
//
// What EquiNormConv*d.forward and EquiNormLinear.forward do in training, step for step, with no
// Python between the steps (at small shapes a layer call's host time is mostly the interpreter and
// the objects it makes):
//   1. the fused forward with its C++ autograd (equinorm_forward_autograd): w'' and the batch's
//      channel means, and with screen the layers' per-call value screen;
//   2. only if the screen passed, the running mean's update, as EquiNormLayer._track makes it:
//      num_batches_tracked += 1, then running_mean.lerp_(mean, momentum), or with momentum None
//      lerp_ towards mean by 1 / num_batches_tracked (a tensor: no host read of the count);
//   3. the convolution of x with w'' (zero padding), or the linear map, by the ATen op F.conv*d or
//      F.linear calls (autocast casts it).
// If the screen fails nothing is tracked or applied: out is empty and passed false, and the
// caller's checks name the culprit.
//
// Registered CompositeImplicitAutograd: autograd sees the ops it calls, so it needs no backward
// of its own, and a trace decomposes it into them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace equinorm {
namespace {

using ScreenedOutputs = std::tuple<at::Tensor, at::Tensor, bool>;

ScreenedOutputs forward_autograd(const at::Tensor& x, const c10::SymInt& rows, const at::Tensor& weight,
                                 const at::Tensor& gain, double ratio, int64_t groups, c10::string_view mode,
                                 double eps, c10::string_view statistic, bool screen) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("equinorm_kernels::equinorm_forward_autograd", "")
                             .typed<ScreenedOutputs(const at::Tensor&, c10::SymInt, const at::Tensor&,
                                                    const at::Tensor&, double, int64_t, c10::string_view, double,
                                                    c10::string_view, bool)>();
  return op.call(x, rows, weight, gain, ratio, groups, mode, eps, statistic, screen);
}

void track_running_mean(at::Tensor& running_mean, at::Tensor& num_batches_tracked, const at::Tensor& mean,
                        c10::optional<double> momentum) {
  const at::Tensor batch_mean =
      mean.scalar_type() == running_mean.scalar_type() ? mean : mean.to(running_mean.scalar_type());
  num_batches_tracked.add_(1);
  if (momentum.has_value()) {
    running_mean.lerp_(batch_mean, *momentum);
  } else {  // cumulative moving average
    running_mean.lerp_(batch_mean, num_batches_tracked.to(running_mean.scalar_type()).reciprocal());
  }
}

// at::conv1d/2d/3d, as F.conv*d calls them: autocast casts these (not at::convolution).
at::Tensor convolution(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  switch (x.dim()) {
    case 3:
      return at::conv1d(x, weight, bias, stride, padding, dilation, groups);
    case 4:
      return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
    default:
      TORCH_CHECK(x.dim() == 5, "equinorm_conv_train_forward: x must be (N, C, *spatial) with 1 to 3 spatial dims, got ",
                  x.dim(), " dims");
      return at::conv3d(x, weight, bias, stride, padding, dilation, groups);
  }
}

// Steps 1 and 2: w'', or nullopt when the screen failed (nothing is tracked then).
c10::optional<at::Tensor> normalized_weight_tracked(const at::Tensor& x, const c10::SymInt& rows,
                                                    const at::Tensor& weight, const at::Tensor& gain,
                                                    at::Tensor& running_mean, at::Tensor& num_batches_tracked,
                                                    c10::optional<double> momentum, double ratio, int64_t groups,
                                                    c10::string_view mode, double eps, c10::string_view statistic,
                                                    bool screen) {
  auto [normalized, mean, passed] =
      forward_autograd(x, rows, weight, gain, ratio, groups, mode, eps, statistic, screen);
  // Without screen, passed is not read: a trace then needs no guard on its value.
  if (screen && !passed) return c10::nullopt;
  track_running_mean(running_mean, num_batches_tracked, mean, momentum);
  return normalized;
}

using LayerOutputs = std::tuple<at::Tensor, bool>;

LayerOutputs equinorm_conv_train_forward(const at::Tensor& x, c10::SymInt rows, const at::Tensor& weight,
                                         const at::Tensor& gain, const c10::optional<at::Tensor>& bias,
                                         at::Tensor& running_mean, at::Tensor& num_batches_tracked,
                                         c10::optional<double> momentum, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         double ratio, c10::string_view mode, double eps,
                                         c10::string_view statistic, bool screen) {
  const auto normalized = normalized_weight_tracked(x, rows, weight, gain, running_mean, num_batches_tracked,
                                                    momentum, ratio, groups, mode, eps, statistic, screen);
  if (!normalized) return {x.new_empty({0}), false};
  return {convolution(x, *normalized, bias, stride, padding, dilation, groups), true};
}

LayerOutputs equinorm_linear_train_forward(const at::Tensor& x, c10::SymInt rows, const at::Tensor& weight,
                                           const at::Tensor& gain, const c10::optional<at::Tensor>& bias,
                                           at::Tensor& running_mean, at::Tensor& num_batches_tracked,
                                           c10::optional<double> momentum, c10::string_view mode, double eps,
                                           c10::string_view statistic, bool screen) {
  const auto normalized = normalized_weight_tracked(x, rows, weight, gain, running_mean, num_batches_tracked,
                                                    momentum, /*ratio=*/1.0, /*groups=*/1, mode, eps, statistic, screen);
  if (!normalized) return {x.new_empty({0}), false};
  return {at::linear(x, *normalized, bias), true};
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CompositeImplicitAutograd, m) {
  m.impl("equinorm_conv_train_forward", &equinorm_conv_train_forward);
  m.impl("equinorm_linear_train_forward", &equinorm_linear_train_forward);
}

}  // namespace equinorm
