// equinorm_forward_autograd: the fused EquiNorm forward with its backward attached in C++.
//
// The ops of csrc/ops.cpp are plain and non-differentiable; their autograd lives in Python
// (equinorm_kernels/ops/equinorm.py), which is what torch.compile traces. That wrapper costs a
// layer call about a hundred microseconds of interpreter and ATen dispatch work, forward and
// backward, at every shape: at small batches it is larger than the layer's kernels. Eager calls
// take this op instead: the same kernels (equinorm_forward, equinorm_backward, redispatched below
// autograd) and the same gradient, with the glue in C++.
//
// The backward is the Python wrapper's, step for step:
// - grad_weight, grad_mean and grad_gain from one equinorm_backward call;
// - dL/dx is dL/dmu_c divided by the elements per channel, broadcast (never materialised) over the
//   rows that fed the means and zero on the others; with "abs_mean" times sign(x) (sign(0) = +1)
//   in the channels the forward flagged as having a negative value, read from the flags when they
//   are host memory (CPU tensors) and otherwise assumed for every channel;
// - with create_graph=True the gradients come from equinorm_forward_reference_backward, the
//   reference's autograd (registered from Python), so that second-order gradients are exact.
//
// With screen, the op also runs the layers' per-call value screen on its outputs (passes_value_screen):
// the Python checks then need no ATen call of their own unless it fails.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace equinorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

ForwardOutputs fused_forward(const at::Tensor& x, const c10::SymInt& rows, const at::Tensor& weight,
                             const at::Tensor& gain, double ratio, int64_t groups, c10::string_view mode, double eps,
                             c10::string_view statistic) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("equinorm_kernels::equinorm_forward", "")
          .typed<ForwardOutputs(const at::Tensor&, c10::SymInt, const at::Tensor&, const at::Tensor&, double, int64_t,
                                c10::string_view, double, c10::string_view)>();
  return op.call(x, rows, weight, gain, ratio, groups, mode, eps, statistic);
}

BackwardOutputs fused_backward(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& mean,
                               const at::Tensor& gain, const at::Tensor& stats, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("equinorm_kernels::equinorm_backward", "")
                             .typed<BackwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(grad_out, weight, mean, gain, stats, groups);
}

std::vector<at::Tensor> reference_backward(const at::Tensor& grad_out, const c10::optional<at::Tensor>& x,
                                           const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& gain,
                                           const c10::SymInt& rows, double ratio, int64_t groups,
                                           c10::string_view mode, double eps, c10::string_view statistic,
                                           std::array<bool, 3> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("equinorm_kernels::equinorm_forward_reference_backward", "")
                             .typed<std::vector<at::Tensor>(
                                 const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, c10::SymInt, double, int64_t, c10::string_view,
                                 double, c10::string_view, std::array<bool, 3>)>();
  return op.call(grad_out, x, weight, mean, gain, rows, ratio, groups, mode, eps, statistic, output_mask);
}

// grad_mean / count in x's dtype, (1, C, 1, ...), for plain CPU tensors of concrete sizes: the
// division in double and the rounding to x's dtype that div and to would do, in one loop rather
// than three ATen calls (host time of every layer's backward).
c10::optional<at::Tensor> plain_cpu_input_gradient(const at::Tensor& grad_mean, const at::Tensor& x) {
  if (!grad_mean.device().is_cpu() || grad_mean.scalar_type() != at::kDouble || at::isTensorSubclassLike(grad_mean) ||
      at::isTensorSubclassLike(x) || x.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || x.numel() == 0) {
    return c10::nullopt;
  }
  const double count = static_cast<double>(x.numel() / x.size(1));
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  at::Tensor per_element = at::empty(shape, x.options());
  const at::Tensor grads = grad_mean.contiguous();
  const double* source = grads.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equinorm_input_gradient", [&] {
    scalar_t* target = per_element.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < x.size(1); ++c) target[c] = static_cast<scalar_t>(source[c] / count);
  });
  return per_element;
}

// dL/dx of mu = mean(x[:rows]) before the broadcast: (1 or N, C, 1, ...) in x's dtype.
at::Tensor compact_input_gradient(const at::Tensor& grad_mean, const at::Tensor& x, const c10::SymInt& rows) {
  if (rows == x.sym_size(0)) {
    if (auto per_element = plain_cpu_input_gradient(grad_mean, x)) return *per_element;
  }
  c10::SymInt count = rows;
  std::vector<c10::SymInt> shape{1, x.sym_size(1)};
  for (int64_t d = 2; d < x.dim(); ++d) {
    count *= x.sym_size(d);
    shape.emplace_back(1);
  }
  at::Tensor per_element = grad_mean.div(c10::Scalar(count));
  if (per_element.scalar_type() != x.scalar_type()) per_element = per_element.to(x.scalar_type());
  per_element = per_element.reshape_symint(shape);
  if (rows == x.sym_size(0)) return per_element;
  // The rows past `rows` did not feed the means: a (N, 1, 1, ...) mask of ones then zeros.
  shape[0] = x.sym_size(0);
  shape[1] = 1;
  at::Tensor fed = at::arange(c10::Scalar(x.sym_size(0)), x.options().dtype(at::kLong)).lt(c10::Scalar(rows));
  return per_element * fed.to(x.scalar_type()).reshape_symint(shape);
}

// The channels the forward flagged, or nullopt when the flags cannot be read on the host without
// waiting (device tensors) or at all (tensors being traced).
c10::optional<std::vector<int64_t>> flagged_channels(const at::Tensor& negative) {
  if (!negative.device().is_cpu() || at::isTensorSubclassLike(negative)) return c10::nullopt;
  const at::Tensor flags = negative.contiguous();
  const bool* data = flags.data_ptr<bool>();
  std::vector<int64_t> channels;
  for (int64_t c = 0; c < flags.numel(); ++c) {
    if (data[c]) channels.push_back(c);
  }
  return channels;
}

// dL/dx of the channel statistic (the Python wrapper's _input_gradient).
at::Tensor input_gradient(const at::Tensor& grad_mean, const at::Tensor& x, const c10::SymInt& rows,
                          bool absolute, const at::Tensor& negative) {
  const at::Tensor compact = compact_input_gradient(grad_mean, x, rows);
  const at::Tensor per_element = compact.expand_symint(x.sym_sizes());
  if (!absolute) return per_element;
  const auto flagged = flagged_channels(negative);
  if (flagged && flagged->empty()) return per_element;
  if (!flagged || static_cast<int64_t>(flagged->size()) == x.size(1)) {
    // The constants broadcast inside where: one pass over x, nothing else at x's size.
    return at::where(x.lt(0), compact.neg(), compact);
  }
  const at::Tensor channels = at::tensor(*flagged, x.options().dtype(at::kLong));
  const at::Tensor constant = compact.index_select(1, channels);
  at::Tensor grad = per_element.clone();
  grad.index_copy_(1, channels, at::where(x.index_select(1, channels).lt(0), constant.neg(), constant));
  return grad;
}

// Where the differentiable arguments (x, weight, gain) are among the forward's arguments.
constexpr std::array<size_t, 3> kDifferentiableSlots{0, 2, 3};

struct EquiNormForwardFunction : public torch::autograd::Function<EquiNormForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::SymInt& rows,
                               const at::Tensor& weight, const at::Tensor& gain, double ratio, int64_t groups,
                               c10::string_view mode, double eps, c10::string_view statistic) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, stats, negative] = fused_forward(x, rows, weight, gain, ratio, groups, mode, eps, statistic);
    // x only when it needs a gradient: nothing else of it is read in the backward.
    ctx->save_for_backward({weight, mean, gain, stats, x.requires_grad() ? x : at::Tensor(), negative});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["ratio"] = ratio;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["statistic"] = std::string(statistic);
    ctx->mark_non_differentiable({mean});
    // The means are not differentiable: no zero gradient is built for them in every backward.
    ctx->set_materialize_grads(false);
    return {out, mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // One entry per forward argument: x, rows, weight, gain, ratio, groups, mode, eps, statistic.
    variable_list grads(9);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;  // w'' did not reach the loss
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &mean = saved[1], &gain = saved[2], &stats = saved[3], &x = saved[4];
    const c10::SymInt rows = ctx->saved_data["rows"].toSymInt();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const std::string statistic = ctx->saved_data["statistic"].toStringRef();
    std::array<bool, 3> needed;
    // needs_input_grad counts tensor arguments only.
    for (size_t i = 0; i < needed.size(); ++i) needed[i] = ctx->needs_input_grad(i);
    if (at::GradMode::is_enabled()) {  // create_graph=True: the gradients must be differentiable
      const auto reference = reference_backward(
          grad_out, x.defined() ? c10::optional<at::Tensor>(x) : c10::nullopt, weight, mean, gain, rows,
          ctx->saved_data["ratio"].toDouble(), groups, ctx->saved_data["mode"].toStringRef(),
          ctx->saved_data["eps"].toDouble(), statistic, needed);
      // The reference returns the needed gradients only, in order.
      auto next = reference.begin();
      for (size_t i = 0; i < kDifferentiableSlots.size(); ++i) {
        if (needed[i]) grads[kDifferentiableSlots[i]] = *next++;
      }
      return grads;
    }
    auto [grad_weight, grad_mean, grad_gain] = fused_backward(grad_out, weight, mean, gain, stats, groups);
    if (needed[0]) grads[0] = input_gradient(grad_mean, x, rows, statistic == "abs_mean", saved[5]);
    grads[kDifferentiableSlots[1]] = grad_weight;
    grads[kDifferentiableSlots[2]] = grad_gain;
    return grads;
  }
};

// Every value of a CPU tensor finite (and >= 0 with non_negative): one vectorised loop, no ATen
// call. value * 0 is 0 for a finite value and NaN for NaN or Inf, so the sum of those products is
// NaN exactly when some value is not finite (no overflow, unlike a sum of the values).
template <typename scalar_t>
bool all_values_pass(const at::Tensor& tensor, bool non_negative) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor values = tensor.contiguous();
  const scalar_t* data = values.const_data_ptr<scalar_t>();
  const int64_t count = values.numel();
  // Independent running sums: a single one would make every add wait on the previous one.
  constexpr int kLanes = 32;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(data[i + j]) * acc_t(0);
  }
  acc_t products = 0;
  for (; i < count; ++i) products += static_cast<acc_t>(data[i]) * acc_t(0);
  for (int j = 0; j < kLanes; ++j) products += lanes[j];
  if (products != products) return false;
  if (!non_negative) return true;
  bool any_negative = false;
  for (int64_t i = 0; i < count; ++i) any_negative |= static_cast<acc_t>(data[i]) < acc_t(0);
  return !any_negative;
}

bool values_pass(const at::Tensor& tensor, bool non_negative) {
  if (!tensor.device().is_cpu() || at::isTensorSubclassLike(tensor)) {
    at::Tensor failed = at::isfinite(tensor).logical_not();
    if (non_negative) failed = failed.logical_or(tensor.lt(0));
    return !failed.any().item<bool>();  // synchronises: the layers screen device tensors on the device
  }
  bool passed = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensor.scalar_type(), "equinorm_value_screen", [&] {
    passed = all_values_pass<scalar_t>(tensor, non_negative);
  });
  return passed;
}

// The per-call value screen of the layers' value checks, on the outputs the call made anyway: a
// NaN or Inf in x, the weight or the gain always reaches out (each row's shift sums mu_c w_dc over
// the whole row, and the gain scales the row); negative means leave out finite, so the "mean"
// statistic's means are screened too. Only the Python checks name the culprit, when this fails.
bool passes_value_screen(const at::Tensor& out, const at::Tensor& mean, c10::string_view statistic) {
  return values_pass(out, false) && (statistic != "mean" || values_pass(mean, true));
}

using ScreenedOutputs = std::tuple<at::Tensor, at::Tensor, bool>;

ScreenedOutputs equinorm_forward_autograd(const at::Tensor& x, c10::SymInt rows, const at::Tensor& weight,
                                          const at::Tensor& gain, double ratio, int64_t groups,
                                          c10::string_view mode, double eps, c10::string_view statistic,
                                          bool screen) {
  const auto outputs = EquiNormForwardFunction::apply(x, rows, weight, gain, ratio, groups, mode, eps, statistic);
  return {outputs[0], outputs[1], !screen || passes_value_screen(outputs[0], outputs[1], statistic)};
}

// Below autograd (no tensor needs a gradient, or the call is already inside one): the fused
// forward's first two outputs, and the screen.
ScreenedOutputs equinorm_forward_outputs(const at::Tensor& x, c10::SymInt rows, const at::Tensor& weight,
                                         const at::Tensor& gain, double ratio, int64_t groups, c10::string_view mode,
                                         double eps, c10::string_view statistic, bool screen) {
  auto [out, mean, stats, negative] = fused_forward(x, rows, weight, gain, ratio, groups, mode, eps, statistic);
  return {out, mean, !screen || passes_value_screen(out, mean, statistic)};
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, Autograd, m) {
  m.impl("equinorm_forward_autograd", &equinorm_forward_autograd);
}

TORCH_LIBRARY_IMPL(equinorm_kernels, CompositeExplicitAutograd, m) {
  m.impl("equinorm_forward_autograd", &equinorm_forward_outputs);
}

}  // namespace equinorm
