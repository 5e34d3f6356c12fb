// The CUDA implementations of channel_mean, equinorm_weight, equinorm_forward and
// equinorm_backward: argument checks (op_checks.h, shared with the CPU ops), output and workspace
// allocation on the tensors' device, and the launchers of channel_mean.cu and equinorm_weight.cu
// on the current stream. Results match the CPU kernels' to rounding; launch counts and the
// determinism argument are at the top of the .cu files.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "op_checks.h"
#include "op_entry_points.h"
#include "shared/equinorm_math.h"

namespace equinorm {
namespace cuda {
namespace {

namespace em = equinorm::math;

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got one on ", t.device());
}

at::Tensor empty_workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Fills mean (C,) from x as channel_input returned it; with `negative` (C,) bool, the mean of |x|
// and the channels that had a value < 0.
void compute_channel_mean(const at::Tensor& readable, const ChannelGeometry& geometry, at::Tensor& mean,
                          at::Tensor* negative) {
  const ChannelMeanShape shape{geometry.rows, geometry.channels, geometry.spatial, geometry.channels_last};
  const ElementType type = element_type(readable.scalar_type());
  const void* x = readable.const_data_ptr();
  const size_t bytes = channel_mean_workspace_bytes(shape, type, x);
  at::Tensor workspace = empty_workspace(bytes, readable);
  bool* negative_flags = negative == nullptr ? nullptr : negative->mutable_data_ptr<bool>();
  C10_CUDA_CHECK(launch_channel_mean(shape, type, x, mean.mutable_data_ptr(), negative_flags,
                                     bytes > 0 ? workspace.mutable_data_ptr() : nullptr, bytes,
                                     c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> channel_mean(const at::Tensor& x, int64_t rows, c10::string_view statistic) {
  const bool abs_statistic = parse_abs_statistic(statistic);
  auto [readable, geometry] = channel_input(x, rows);
  check_cuda(readable, "x");
  const c10::cuda::CUDAGuard guard(readable.device());
  at::Tensor mean = at::empty({geometry.channels}, x.options().dtype(accumulation_type(x.scalar_type())));
  // The kernel writes every flag with "abs_mean"; "mean" has none.
  at::Tensor negative = at::empty({abs_statistic ? geometry.channels : 0}, x.options().dtype(at::kBool));
  compute_channel_mean(readable, geometry, mean, abs_statistic ? &negative : nullptr);
  return {mean, negative};
}

WeightShape weight_shape(const WeightGeometry& g) {
  TORCH_CHECK(g.taps <= INT_MAX, "the weight has too many kernel taps (", g.taps, ")");
  return WeightShape{g.out_channels, g.group_channels, g.taps, g.groups, g.channels_last, g.per_tap_means};
}

std::tuple<at::Tensor, at::Tensor> weight_transform(const at::Tensor& weight, const at::Tensor& mean,
                                                    const at::Tensor& gain, double ratio, int64_t groups,
                                                    bool exact, double eps) {
  auto [readable, geometry] = weight_input(weight, groups);
  check_mean_and_gain(weight, geometry, mean, gain);
  check_ratio_and_eps(ratio, eps);
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = empty_like_weight(weight, geometry, weight.scalar_type());
  at::Tensor stats = at::empty({geometry.out_channels, em::kStatsColumns}, weight.options().dtype(at::kDouble));
  const at::Tensor mean_c = mean.contiguous(), gain_c = gain.contiguous();
  const WeightShape shape = weight_shape(geometry);
  const ElementType type = element_type(weight.scalar_type());
  const size_t bytes = equinorm_weight_workspace_bytes(shape, type);
  at::Tensor workspace = empty_workspace(bytes, weight);
  C10_CUDA_CHECK(launch_equinorm_weight(shape, type, readable.const_data_ptr(), mean_c.const_data_ptr(),
                                        gain_c.const_data_ptr(), ratio, eps, exact, out.mutable_data_ptr(),
                                        stats.mutable_data_ptr(), bytes > 0 ? workspace.mutable_data_ptr() : nullptr,
                                        bytes, c10::cuda::getCurrentCUDAStream()));
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> equinorm_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                                                 const at::Tensor& mean, const at::Tensor& gain,
                                                                 const at::Tensor& stats, int64_t groups) {
  auto [readable, geometry] = weight_input(weight, groups);
  check_mean_and_gain(weight, geometry, mean, gain);
  check_stats(stats, weight, geometry, em::kStatsColumns);
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor grad = grad_in_weight_layout(grad_out, weight, geometry);
  const auto acc = accumulation_type(weight.scalar_type());
  at::Tensor grad_weight = empty_like_weight(weight, geometry, weight.scalar_type());
  at::Tensor grad_gain = at::empty({geometry.out_channels}, weight.options().dtype(acc));
  at::Tensor grad_mean = at::empty(mean.sizes(), weight.options().dtype(at::kDouble));
  const at::Tensor mean_c = mean.contiguous(), gain_c = gain.contiguous(), stats_c = stats.contiguous();
  const WeightShape shape = weight_shape(geometry);
  const ElementType type = element_type(weight.scalar_type());
  const size_t bytes = equinorm_backward_workspace_bytes(shape, type);
  at::Tensor workspace = empty_workspace(bytes, weight);
  C10_CUDA_CHECK(launch_equinorm_backward(shape, type, grad.const_data_ptr(), readable.const_data_ptr(),
                                          mean_c.const_data_ptr(), gain_c.const_data_ptr(), stats_c.const_data_ptr(),
                                          grad_weight.mutable_data_ptr(), grad_mean.mutable_data_ptr(),
                                          grad_gain.mutable_data_ptr(), workspace.mutable_data_ptr(), bytes,
                                          c10::cuda::getCurrentCUDAStream()));
  return {grad_weight, grad_mean, grad_gain};
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CUDA, m) {
  m.impl("channel_mean", &channel_mean);
  using EntryPoints = EquiNormEntryPoints<&channel_mean, &weight_transform>;
  m.impl("equinorm_weight", &EntryPoints::equinorm_weight);
  m.impl("equinorm_forward", &EntryPoints::equinorm_forward);
  m.impl("equinorm_backward", &equinorm_backward);
}

}  // namespace cuda
}  // namespace equinorm
