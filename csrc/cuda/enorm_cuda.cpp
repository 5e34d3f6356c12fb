// The CUDA implementations of enorm_group_ and enorm_cycle_: the program is decoded and checked
// as for the CPU ops (csrc/enorm_plan.h), then enorm.cu balances the groups in place on the
// current stream. Both return float64 tensors on the tensors' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cuda/element_type.h"
#include "cuda/launchers.h"
#include "enorm_plan.h"

namespace equinorm {
namespace cuda {
namespace {

void check_exponents(double p, double c) {
  TORCH_CHECK(std::isfinite(p) && p >= 1, "p must be a finite number >= 1, got ", p);
  TORCH_CHECK(std::isfinite(c) && c > 0, "c must be a positive finite number, got ", c);
}

EnormEntry launcher_entry(at::TensorList tensors, const RescaleEntry& e) {
  const at::Tensor& t = tensors[e.tensor];
  TORCH_CHECK(t.is_cuda(), "tensors[", e.tensor, "] must be a CUDA tensor for the CUDA kernel, got one on ",
              t.device());
  EnormEntry entry;
  entry.data = t.data_ptr();  // rescaled in place
  entry.type = element_type(t.scalar_type());
  entry.columns = e.columns;
  entry.power = static_cast<int>(e.power);
  entry.counted = e.counted;
  entry.groups = e.groups;
  entry.outer = e.outer;
  entry.channels_per_group = e.channels_per_group;
  entry.inner = e.inner;
  entry.outer_stride = e.outer_stride;
  entry.channel_stride = e.channel_stride;
  entry.inner_stride = e.inner_stride;
  return entry;
}

// Runs the plan's groups in order; returns what the launcher wrote to `coefficients`/`deviations`.
void run_plan(at::TensorList tensors, const std::vector<std::vector<RescaleEntry>>& plan, double p, double c,
              double* coefficients, double* deviations) {
  std::vector<EnormEntry> entries;
  std::vector<int64_t> group_sizes;
  for (const auto& group : plan) {
    for (const auto& e : group) entries.push_back(launcher_entry(tensors, e));
    group_sizes.push_back(static_cast<int64_t>(group.size()));
  }
  const int64_t group_count = static_cast<int64_t>(group_sizes.size());
  const size_t bytes = enorm_workspace_bytes(entries.data(), group_sizes.data(), group_count);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, tensors[0].options().dtype(at::kByte));
  C10_CUDA_CHECK(launch_enorm(entries.data(), group_sizes.data(), group_count, p, c, coefficients, deviations,
                              workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor enorm_group(at::TensorList tensors, c10::IntArrayRef entries, double p, double c) {
  check_exponents(p, c);
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const int64_t records = static_cast<int64_t>(entries.size()) / kEntryFields;
  const auto plan = decode_plan(tensors, entries, {records});
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor d = at::empty({plan.front().front().channels()}, tensors[0].options().dtype(at::kDouble));
  run_plan(tensors, plan, p, c, d.data_ptr<double>(), nullptr);
  return d;
}

at::Tensor enorm_cycle(at::TensorList tensors, c10::IntArrayRef entries, c10::IntArrayRef group_sizes, double p,
                       double c) {
  check_exponents(p, c);
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const auto plan = decode_plan(tensors, entries, group_sizes);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor deviations =
      at::empty({static_cast<int64_t>(plan.size())}, tensors[0].options().dtype(at::kDouble));
  if (!plan.empty()) run_plan(tensors, plan, p, c, nullptr, deviations.data_ptr<double>());
  return deviations;
}

}  // namespace

TORCH_LIBRARY_IMPL(equinorm_kernels, CUDA, m) {
  m.impl("enorm_group_", &enorm_group);
  m.impl("enorm_cycle_", &enorm_cycle);
}

}  // namespace cuda
}  // namespace equinorm
