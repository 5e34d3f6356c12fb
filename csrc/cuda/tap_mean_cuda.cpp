// The CUDA implementation of tap_mean and tap_mean_backward: argument checks (tap_geometry.h,
// shared with the CPU op), outputs and workspace on the tensors' device, and the launchers of
// tap_mean.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "op_checks.h"
#include "tap_geometry.h"

namespace equinorm {
namespace cuda {
namespace {

TapMeanShape tap_shape(const TapGeometry& g, int64_t rows, int64_t channels, bool channels_last) {
  TapMeanShape shape;
  shape.rows = rows;
  shape.channels = channels;
  shape.channels_last = channels_last;
  shape.mode = g.mode;
  for (int k = 0; k < tap::kDims; ++k) shape.dims[k] = g.dims[k];
  return shape;
}

at::Tensor workspace_of(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> tap_mean(const at::Tensor& x, int64_t rows, c10::string_view geometry,
                                            bool absolute) {
  auto [readable, channel_geometry] = channel_input(x, rows);
  TORCH_CHECK(readable.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got one on ", readable.device());
  const TapSpec spec = parse_tap_spec(geometry);
  const TapGeometry g = tap_geometry(x.sizes().slice(2), spec);
  const c10::cuda::CUDAGuard guard(readable.device());
  const int64_t channels = channel_geometry.channels;
  at::Tensor mean =
      at::empty(tap_mean_shape(channels, spec.kernel_size), x.options().dtype(accumulation_type(x.scalar_type())));
  at::Tensor negative = at::zeros({channels}, x.options().dtype(at::kBool));
  const TapMeanShape shape = tap_shape(g, rows, channels, channel_geometry.channels_last);
  const ElementType type = element_type(readable.scalar_type());
  const size_t bytes = tap_mean_workspace_bytes(shape, type);
  at::Tensor workspace = workspace_of(bytes, readable);
  C10_CUDA_CHECK(launch_tap_mean(shape, type, readable.const_data_ptr(), absolute, mean.mutable_data_ptr(),
                                 negative.mutable_data_ptr(), workspace.mutable_data_ptr(), bytes,
                                 c10::cuda::getCurrentCUDAStream()));
  return {mean, negative};
}

at::Tensor tap_mean_backward(const at::Tensor& grad, at::IntArrayRef spatial, int64_t rows,
                             c10::string_view geometry) {
  const TapSpec spec = parse_tap_spec(geometry);
  const TapGeometry g = tap_geometry(spatial, spec);
  check_tap_grad(grad, spec.kernel_size, rows);
  TORCH_CHECK(grad.is_cuda(), "grad must be a CUDA tensor for the CUDA kernel, got one on ", grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor grad_c = grad.contiguous();
  const int64_t channels = grad.size(0);
  at::Tensor plane = at::empty(tap_plane_shape(channels, spatial), grad.options());
  const TapMeanShape shape = tap_shape(g, rows, channels, false);
  const size_t bytes = tap_mean_backward_workspace_bytes(shape);
  at::Tensor workspace = workspace_of(bytes, grad);
  C10_CUDA_CHECK(launch_tap_mean_backward(shape, element_type(grad.scalar_type()), grad_c.const_data_ptr(),
                                          plane.mutable_data_ptr(), workspace.mutable_data_ptr(), bytes,
                                          c10::cuda::getCurrentCUDAStream()));
  return plane;
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CUDA, m) {
  m.impl("tap_mean", &tap_mean);
  m.impl("tap_mean_backward", &tap_mean_backward);
}

}  // namespace cuda
}  // namespace equinorm
