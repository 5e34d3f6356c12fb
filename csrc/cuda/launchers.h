// Host entry points of the CUDA kernels, callable from plain C++ (the torch glue in *_cuda.cpp).
//
// The kernels (*.cu) include no torch header: they take raw pointers, sizes and a stream, and
// return the launch status (cudaGetLastError), which the glue turns into an exception. Element
// types are passed as ElementType with void pointers, so the glue never needs the CUDA half types.
// Per-channel operands (mean, gain, grad_gain) are in the accumulation type: double for kDouble,
// float otherwise; stats and grad_mean are double for every type (the weight math's precision). Every pointer must be a device pointer of the current
// device; contiguous buffers unless a layout flag says otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/launch_plans.h"
#include "shared/tap_mean_math.h"

namespace equinorm {
namespace cuda {

enum class ElementType { kHalf, kBFloat16, kFloat, kDouble };

// ---- channel statistics: mean[c] = mean of x[:rows] (or of |x[:rows]|) over every dim but 1 ----

// x seen as (rows, channels, spatial) planes (NCHW), or as rows * spatial positions of
// `channels` contiguous values (channels_last; a 2-d (N, C) input is this case with spatial = 1).
struct ChannelMeanShape {
  int64_t rows = 0;
  int64_t channels = 0;
  int64_t spatial = 0;
  bool channels_last = false;
};

// Bytes of device workspace launch_channel_mean needs (0 when none); depends on x's alignment.
size_t channel_mean_workspace_bytes(const ChannelMeanShape& shape, ElementType type, const void* x,
                                    const MachineModel& machine = kHopper);

// Writes mean (channels,). Bit-identical results across runs for the same shape and alignment.
// With `negative` (channels,): the "abs_mean" statistic, mean of |x|, and
// negative[c] set to true for every channel that has a value < 0; nullptr: the plain mean.
// The plan is plan_channel_mean (cuda/launch_plans.h) for `machine`.
cudaError_t launch_channel_mean(const ChannelMeanShape& shape, ElementType type, const void* x, void* mean,
                                bool* negative, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                const MachineModel& machine = kHopper);

// ---- EquiNorm weight transform ----

// A weight (D, C/groups, *kernel) as D rows of group_channels x taps values, stored (c, t)
// (contiguous) or (t, c) (channels_last).
struct WeightShape {
  int64_t out_channels = 0;
  int64_t group_channels = 0;
  int64_t taps = 0;
  int64_t groups = 1;
  bool channels_last = false;
  bool per_tap_means = false;  // mean and grad_mean are (C, K) per tap, stored (c, t); else (C,)
};

// Bytes of device workspace launch_equinorm_weight needs (0 when none): the slices' partial sums
// of rows split over several blocks.
size_t equinorm_weight_workspace_bytes(const WeightShape& shape, ElementType type,
                                       const MachineModel& machine = kHopper);

// out = gain * s * (weight + b) and stats (D, 5) (csrc/shared/equinorm_math.h); mean (C,), gain (D,).
// The plan is plan_equinorm_weight (cuda/launch_plans.h) for `machine`.
cudaError_t launch_equinorm_weight(const WeightShape& shape, ElementType type, const void* weight, const void* mean,
                                   const void* gain, double ratio, double eps, bool exact, void* out, void* stats,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                   const MachineModel& machine = kHopper);

// Bytes of device workspace launch_equinorm_backward needs: the rows' sums and, per slot of a
// group's rows, a row of column sums of the grad_mean terms (plan_equinorm_weight), added in a
// fixed order by a finish kernel.
size_t equinorm_backward_workspace_bytes(const WeightShape& shape, ElementType type,
                                         const MachineModel& machine = kHopper);

// grad_weight (the weight's layout), grad_mean (C,) and grad_gain (D,) from grad_out (the weight's
// layout) and the forward's stats.
cudaError_t launch_equinorm_backward(const WeightShape& shape, ElementType type, const void* grad_out,
                                     const void* weight, const void* mean, const void* gain, const void* stats,
                                     void* grad_weight, void* grad_mean, void* grad_gain, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream,
                                     const MachineModel& machine = kHopper);

// ---- per-tap input statistics (tap_mean): csrc/shared/tap_mean_math.h ----

// x[:rows] (rows, channels, *plane) NCHW or channels_last, with three spatial dims (leading ones of
// length 1 for Conv1d/2d inputs) and mode one of tap::PaddingMode.
struct TapMeanShape {
  int64_t rows = 0;
  int64_t channels = 0;
  bool channels_last = false;
  int mode = tap::kZeros;
  tap::TapDim dims[tap::kDims];
};

// Bytes of device workspace launch_tap_mean needs for `machine` (any alignment of x).
size_t tap_mean_workspace_bytes(const TapMeanShape& shape, ElementType type, const MachineModel& machine = kHopper);

// mean (channels, taps) in the accumulation type; negative (channels) bytes 0/1, written only when
// absolute (the mean of |x|): whether the channel has a value < 0. The column sums' plan is
// plan_tap_mean_columns (cuda/launch_plans.h) for `machine`.
cudaError_t launch_tap_mean(const TapMeanShape& shape, ElementType type, const void* x, bool absolute, void* mean,
                            void* negative, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                            const MachineModel& machine = kHopper);

size_t tap_mean_backward_workspace_bytes(const TapMeanShape& shape);

// plane (channels, *plane) from grad (channels, taps), both of `type` kFloat or kDouble: the
// gradient of one sample that fed the means.
cudaError_t launch_tap_mean_backward(const TapMeanShape& shape, ElementType type, const void* grad, void* plane,
                                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- ENorm rescaling (enorm_group_, enorm_cycle_) ----

// One record of the rescaling program (csrc/enorm_plan.h): a tensor rescaled in place along its
// rows (channel j = o) or its columns (channel j = (o / (outer / groups)) * channels_per_group + i),
// element (o, i, t) at data + o * outer_stride + i * channel_stride + t * inner_stride.
struct EnormEntry {
  void* data = nullptr;
  ElementType type = ElementType::kFloat;
  bool columns = false;
  int power = 1;         // the tensor is multiplied by d^power, power in [-2, 2]
  bool counted = false;  // its |.|^p enters the row (rows) or column (columns) energy
  int64_t groups = 1;
  int64_t outer = 0, channels_per_group = 0, inner = 0;
  int64_t outer_stride = 0, channel_stride = 0, inner_stride = 0;
};

// Bytes of device workspace launch_enorm needs for these groups (group_sizes[g] entries each).
size_t enorm_workspace_bytes(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count,
                             const MachineModel& machine = kHopper);

// Balances the groups in order, each from the tensors as the previous groups left them.
// coefficients (the last group's channel count, may be null): that group's d. deviations
// (group_count, may be null): max |d - 1| of each group. Both float64 on the device.
cudaError_t launch_enorm(const EnormEntry* entries, const int64_t* group_sizes, int64_t group_count, double p,
                         double c, double* coefficients, double* deviations, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream, const MachineModel& machine = kHopper);

}  // namespace cuda
}  // namespace equinorm
