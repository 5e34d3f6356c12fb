// EquiNorm's per-output-channel formulas, shared by the CPU and CUDA kernels.
//
// The kernels own the loops (which thread reads which weights, in which order); every formula
// that turns those sums into a shift, a scale or a gradient lives here, once. The notation is
// the one of equinorm_kernels/reference/equinorm.py (the specification) for output channel d,
// with mu_ct the mean of the input value that tap t of input channel c multiplies: the channel
// mean mu_c for every tap, or a per-tap mean (ek.tap_mean: exact under zero padding and stride):
//
//   V_d   = sum_ct mu_ct   (K M_d for channel means, M_d = sum_c mu_c)          ("value mass")
//   b_d   = -sum_ct mu_ct w_dct / V_d                 u = w + b_d              (the shift)
//   P_d   = sum_ct mu_ct max(u_dct, 0)                                         ("exact")
//   P_d   = sum_ct mu_ct [w > 0] w + b_d sum_ct mu_ct [w > 0]                  ("single_pass")
//   s_d   = ratio / P_d, or 0 when P_d <= eps * sum_ct mu_ct |w_dct|           (no positive mass)
//   out   = gain_d * s_d * u
//
// Backward, with G = dL/d(out), Gs = sum_ct G u, Gsum = sum_ct G, and active = [u > 0] (exact)
// or [w > 0] (single_pass):
//   dL/dgain_d = s_d Gs
//   g_P = -gain_d Gs s_d / P_d                  (0 for a channel with s_d = 0)
//   g_b = gain_d s_d Gsum + g_P sum_ct mu_ct [active_dct]
//   h_dct = g_P [active_dct] - g_b / V_d
//   dL/dw_dct = gain_d s_d G_dct + mu_ct h_dct
//   dL/dmu_ct += u_dct h_dct                   (summed over the output channels d reading c, and
//                                               for channel means over the taps t as well)
#pragma once

#include <cfloat>

#include "host_device.h"

namespace equinorm {
namespace math {

// Every kernel computes these formulas, and keeps the saved stats, in double whatever the weight
// dtype: mu_c w_dct, P_d and the gradient's s_d / P_d leave float's exponent range for inputs and
// weights far from 1 (x ~ 1e-40, or x and w ~ 1e-20), although w'' does not depend on the scale
// of a weight row and scales only as 1 / |x|, so its value is representable. The weight rows are
// read once per pass whatever the arithmetic, so double costs the memory-bound kernels little.
using weight_math_t = double;

// Per-output-channel statistics the forward saves for the backward: one row of `stats` (D, 5).
enum StatsColumn : int {
  kShift = 0,         // b_d
  kScale = 1,         // s_d (without the gain); 0 for a channel with no positive mass
  kPositiveMass = 2,  // P_d as used (exact or one-pass)
  kValueMass = 3,     // V_d, clamped away from zero
  kUsedExact = 4,     // 1 when P_d is the exact one (mode "exact", or the single_pass fallback)
  kStatsColumns = 5,
};

// One row of stats, what the backward reads back.
template <typename acc_t>
EQUINORM_HOST_DEVICE void write_stats(acc_t* stats, acc_t shift, acc_t scale, acc_t positive_mass, acc_t value_mass,
                                      bool used_exact) {
  stats[kShift] = shift;
  stats[kScale] = scale;
  stats[kPositiveMass] = positive_mass;
  stats[kValueMass] = value_mass;
  stats[kUsedExact] = used_exact ? acc_t(1) : acc_t(0);
}

template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t smallest_normal();
template <>
EQUINORM_HOST_DEVICE float smallest_normal<float>() { return FLT_MIN; }
template <>
EQUINORM_HOST_DEVICE double smallest_normal<double>() { return DBL_MIN; }

// V_d from the sum of the row's means (K M_d for channel means); it is 0 only when every input
// channel of the group has mean 0 (then P_d = 0 too).
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t value_mass(acc_t sum_of_means) {
  return sum_of_means > smallest_normal<acc_t>() ? sum_of_means : smallest_normal<acc_t>();
}

// b_d from sum_ct mu_ct w_dct.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t shift(acc_t mean_weighted_kernel_sum, acc_t value_mass) {
  return -mean_weighted_kernel_sum / value_mass;
}

// One-pass P_d from sum_c mu_c p_dc and sum_c mu_c n_dc.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t one_pass_positive_mass(acc_t mean_weighted_positive_sum, acc_t shift,
                                                  acc_t mean_weighted_positive_count) {
  return mean_weighted_positive_sum + shift * mean_weighted_positive_count;
}

// sum_ct mu_ct |w_dct| from the mean-weighted positive sums and kernel sums (|w| = 2 max(w, 0) - w).
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t absolute_mass(acc_t mean_weighted_positive_sum, acc_t mean_weighted_kernel_sum) {
  return 2 * mean_weighted_positive_sum - mean_weighted_kernel_sum;
}

// The one-pass estimate assumes every row's weights on seen inputs (mu_ct > 0) take both
// signs; a row whose seen weights are all > 0 or all <= 0 uses the exact P_d instead.
EQUINORM_HOST_DEVICE bool needs_exact_positive_mass(bool sees_positive_weight, bool sees_non_positive_weight) {
  return !(sees_positive_weight && sees_non_positive_weight);
}

// s_d; 0 marks a channel with no positive mass to normalise (its weight becomes zero).
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t scale(acc_t positive_mass, acc_t absolute_mass, acc_t ratio, acc_t eps) {
  return positive_mass <= eps * absolute_mass ? acc_t(0) : ratio / positive_mass;
}

// ---- backward ----
// Both modes share one form: with active = (u > 0) for the exact P_d and (w > 0) for the
// one-pass estimate, every weight contributes through h = g_P [active] - g_b / V_d.

template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t grad_positive_mass(acc_t grad_times_shifted, acc_t gain, acc_t scale, acc_t positive_mass) {
  return scale == acc_t(0) ? acc_t(0) : -gain * grad_times_shifted * scale / positive_mass;
}

template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t grad_shift(acc_t grad_sum, acc_t gain, acc_t scale, acc_t grad_positive_mass,
                                      acc_t mean_weighted_active_count) {
  return gain * scale * grad_sum + grad_positive_mass * mean_weighted_active_count;
}

// g_b / V_d: the part of h every weight of the row shares.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t shared_mean_factor(acc_t grad_shift, acc_t value_mass) {
  return grad_shift / value_mass;
}

// h for one weight.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t mean_factor(bool active, acc_t grad_positive_mass, acc_t shared_mean_factor) {
  return (active ? grad_positive_mass : acc_t(0)) - shared_mean_factor;
}

// dL/dw = gain_d s_d G + mu_c h.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t grad_weight(acc_t grad, acc_t gain_times_scale, acc_t mean, acc_t mean_factor) {
  return gain_times_scale * grad + mean * mean_factor;
}

// One output channel's contribution to dL/dmu_ct, u h, or for channel means to dL/dmu_c, the sum
// over the taps: g_P sum_t [active] u - (g_b / V_d) sum_t u.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t grad_mean_term(acc_t active_shifted_sum, acc_t shifted_sum, acc_t grad_positive_mass,
                                          acc_t shared_mean_factor) {
  return grad_positive_mass * active_shifted_sum - shared_mean_factor * shifted_sum;
}

}  // namespace math
}  // namespace equinorm
