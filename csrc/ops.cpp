// The operator schemas of torch.ops.equinorm_kernels, declared once for every backend.
//
// Kernels register per device (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cpp: CUDA); fake kernels, the
// autograd wrappers and the Python-side argument checks live in equinorm_kernels/ops/, except the
// C++ autograd of equinorm_forward_autograd (csrc/autograd.cpp), which eager calls take. The
// Triton backend registers the same signatures under the prefix "triton_".
//
// Conventions shared by every op:
// - "acc" is the accumulation dtype: float64 when the weight (or x) is float64, else float32.
//   mean, gain and grad_gain are in it; out and grad_weight have the weight's dtype and layout;
//   stats and grad_mean are float64, the precision of the weight math (csrc/shared/equinorm_math.h):
//   dL/dmu can leave float32's range where dL/dx = dL/dmu / (elements per channel) does not.
// - rows: only x[:rows] feeds the channel means (stats_fraction < 1 in the layers). A SymInt, so
//   torch.compile(dynamic=True) keeps the batch size symbolic; the kernels take it as int64_t.
// - mean (equinorm_weight, equinorm_backward): channel means (C,), or per-tap means (C, *kernel),
//   one per input channel and kernel tap; grad_mean has mean's shape.
// - stats (D, 5): per output channel [shift b_d, scale s_d, positive mass P_d, value mass V_d,
//   used exact P_d (0/1)], what the backward needs from the forward (csrc/shared/equinorm_math.h).
// - mode: "single_pass" or "exact"; the backward reads which P_d was used from stats.
// - statistic: "mean" (the per-channel mean of x, the paper's) or "abs_mean" (the mean of |x|, the
//   input's L1 mass, for signed inputs; equal to "mean", bit for bit, on non-negative inputs).
//   negative: with "abs_mean", (C,) bool, the channels where x[:rows] has a value < 0 (their
//   gradient needs sign(x)); with "mean", empty (0,) (nothing to flag, nothing to launch).
// - equinorm_forward_autograd: equinorm_forward's out and mean, out differentiable in x, weight and
//   gain, with the autograd in C++ (csrc/autograd.cpp): what eager calls take. Its create_graph
//   backward is equinorm_forward_reference_backward, implemented in Python (the reference's
//   autograd); it returns the gradients output_mask asks for, in (x, weight, gain) order. With
//   screen, passed says whether out passed the per-call value screen (every value finite, and for
//   the "mean" statistic no negative channel mean; a NaN or Inf in x, the weight or the gain
//   always reaches out); without it, passed is true and nothing is read.
// - equinorm_conv_train_forward: an EquiNorm conv layer's training forward (equinorm_forward_autograd,
//   the running mean's update in place, the zero-padded convolution with w'') in one call, composed
//   of ATen ops and equinorm_forward_autograd (csrc/layer_forward.cpp); momentum None is the
//   cumulative average. passed as equinorm_forward_autograd's; when false, out is empty and the
//   running statistics are untouched. equinorm_linear_train_forward: the same for a Linear layer
//   on (N, C) inputs (ratio 1, one group, F.linear's op).
// - enorm_group_ returns the coefficients d (C,), enorm_cycle_ the largest |d - 1| of each group,
//   both float64.
// - ENorm: `tensors` are rescaled in place; `entries` is a flat list of records of six ints
//   (tensor index, axis 0 = rows / 1 = columns, power of d it is multiplied by, counts in the
//   energy 0/1, conv groups, columns per channel), `group_sizes` the number of records per group.
// - tap_mean: per input channel and kernel tap, the mean of the values the tap multiplies in the
//   convolution (csrc/shared/tap_mean_math.h), (C, *kernel_size) in acc, and negative (C,) bool:
//   the channels where x[:rows] has a value < 0 (set only when absolute, the mean of |x|).
//   geometry is the convolution's, one string: "kernel_size=3,3 stride=1,1 padding=1,1,1,1
//   dilation=1,1 padding_mode=zeros", padding a (before, after) pair per spatial dim, padding_mode
//   "zeros", "reflect", "replicate" or "circular" (tap_geometry.h; a string converts from Python
//   in a fraction of the time four int lists take). tap_mean_backward maps the (C, *kernel_size)
//   gradient to the (C, *spatial) gradient of every sample that fed the means (before any sign of x).
#include <torch/library.h>

#include <vector>

namespace {
// The ops that read the layer input x or a weight take them in any layout (csrc/op_checks.h:
// NCHW and channels_last are read where they lie, other strides through one copy). The tag tells
// torch.compile so: without it Inductor gives each tensor the strides it had when traced, and a
// conv input it keeps channels_last, or a weight (and its gradient) that it makes channels_last
// for the convolution, is transposed back for every call.
const std::vector<at::Tag> kReadsAnyLayout = {at::Tag::flexible_layout};
}  // namespace

TORCH_LIBRARY(equinorm_kernels, m) {
  m.def("channel_mean(Tensor x, SymInt rows, str statistic) -> (Tensor mean, Tensor negative)", kReadsAnyLayout);
  m.def(
      "equinorm_weight(Tensor weight, Tensor mean, Tensor gain, float ratio, int groups, str mode, float eps)"
      " -> (Tensor out, Tensor stats)",
      kReadsAnyLayout);
  m.def(
      "equinorm_forward(Tensor x, SymInt rows, Tensor weight, Tensor gain, float ratio, int groups, str mode,"
      " float eps, str statistic) -> (Tensor out, Tensor mean, Tensor stats, Tensor negative)",
      kReadsAnyLayout);
  m.def(
      "equinorm_forward_autograd(Tensor x, SymInt rows, Tensor weight, Tensor gain, float ratio, int groups,"
      " str mode, float eps, str statistic, bool screen=False) -> (Tensor out, Tensor mean, bool passed)",
      kReadsAnyLayout);
  m.def(
      "equinorm_forward_reference_backward(Tensor grad_out, Tensor? x, Tensor weight, Tensor mean, Tensor gain,"
      " SymInt rows, float ratio, int groups, str mode, float eps, str statistic, bool[3] output_mask)"
      " -> Tensor[]");
  m.def(
      "equinorm_conv_train_forward(Tensor x, SymInt rows, Tensor weight, Tensor gain, Tensor? bias,"
      " Tensor(a!) running_mean, Tensor(b!) num_batches_tracked, float? momentum, int[] stride, int[] padding,"
      " int[] dilation, int groups, float ratio, str mode, float eps, str statistic, bool screen=False)"
      " -> (Tensor out, bool passed)");
  m.def(
      "equinorm_linear_train_forward(Tensor x, SymInt rows, Tensor weight, Tensor gain, Tensor? bias,"
      " Tensor(a!) running_mean, Tensor(b!) num_batches_tracked, float? momentum, str mode, float eps,"
      " str statistic, bool screen=False) -> (Tensor out, bool passed)");
  m.def(
      "equinorm_backward(Tensor grad_out, Tensor weight, Tensor mean, Tensor gain, Tensor stats, int groups)"
      " -> (Tensor grad_weight, Tensor grad_mean, Tensor grad_gain)",
      kReadsAnyLayout);
  m.def(
      "tap_mean(Tensor x, SymInt rows, str geometry, bool absolute) -> (Tensor mean, Tensor negative)",
      kReadsAnyLayout);
  m.def(
      "tap_mean_backward(Tensor grad, SymInt[] spatial, SymInt rows, str geometry) -> Tensor");
  m.def("enorm_group_(Tensor(a!)[] tensors, int[] entries, float p, float c) -> Tensor");
  m.def("enorm_cycle_(Tensor(a!)[] tensors, int[] entries, int[] group_sizes, float p, float c) -> Tensor");
}
