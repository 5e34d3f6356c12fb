// ENorm's per-channel formulas, shared by the CPU and CUDA kernels (the specification is
// equinorm_kernels/reference/enorm.py):
//
//   R_i = sum of |producer row i|^p (+ |bias_i|^p)      C_i = sum of |consumer column i|^p
//   d_i = (C_i / (c^p R_i))^(1/(2p)), and d_i = 1 when R_i or C_i is 0 or not finite
//
// Tensors that follow the weights (biases, gradients, optimizer moments) are multiplied by d_i
// raised to an integer power per tensor (rows of a weight: +1, its gradient: -1, ...).
#pragma once

#include <cmath>

#include "host_device.h"

namespace equinorm {
namespace math {

// Energies are summed, and values rescaled, in double for every tensor dtype: |w|^p of a finite
// float weight leaves float's range (|w| > ~1.8e19 for p = 2), and so can d^power for layers of
// very different scales, while the balanced weights themselves are representable.
using energy_math_t = double;

// The exponent's kind: p = 1 and p = 2 are computed exactly and cheaply. Kernels that fix the
// kind at compile time (energy_term_of) keep their inner loops free of the tests.
enum class Exponent { kOne, kTwo, kOther };

EQUINORM_HOST_DEVICE Exponent exponent_kind(double p) {
  return p == 2 ? Exponent::kTwo : p == 1 ? Exponent::kOne : Exponent::kOther;
}

// |w|^p for an exponent of the given kind.
template <Exponent kind, typename acc_t>
EQUINORM_HOST_DEVICE acc_t energy_term_of(acc_t value, acc_t p) {
  const acc_t magnitude = value < acc_t(0) ? -value : value;
  if constexpr (kind == Exponent::kTwo) return magnitude * magnitude;
  else if constexpr (kind == Exponent::kOne) return magnitude;
  else return magnitude == acc_t(0) ? acc_t(0) : static_cast<acc_t>(pow(magnitude, p));
}

// |w|^p, the kind read from p.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t energy_term(acc_t value, acc_t p) {
  switch (exponent_kind(static_cast<double>(p))) {
    case Exponent::kTwo: return energy_term_of<Exponent::kTwo>(value, p);
    case Exponent::kOne: return energy_term_of<Exponent::kOne>(value, p);
    default: return energy_term_of<Exponent::kOther>(value, p);
  }
}

template <typename acc_t>
EQUINORM_HOST_DEVICE bool is_positive_finite(acc_t value) {
  return value > acc_t(0) && value < static_cast<acc_t>(HUGE_VAL);  // false for NaN
}

// d_i; logs keep the ratio finite when one energy underflows and the other is large.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t enorm_coefficient(acc_t row_energy, acc_t column_energy, acc_t p, acc_t c) {
  if (!is_positive_finite(row_energy) || !is_positive_finite(column_energy)) return acc_t(1);
  const acc_t log_ratio = static_cast<acc_t>(log(column_energy)) - static_cast<acc_t>(log(row_energy));
  return static_cast<acc_t>(exp((log_ratio - p * static_cast<acc_t>(log(c))) / (2 * p)));
}

// d^power for the small integer powers a rescaled tensor needs.
template <typename acc_t>
EQUINORM_HOST_DEVICE acc_t coefficient_power(acc_t d, int power) {
  switch (power) {
    case 1: return d;
    case -1: return acc_t(1) / d;
    case 2: return d * d;
    case -2: return acc_t(1) / (d * d);
    case 0: return acc_t(1);
    default: return static_cast<acc_t>(pow(d, static_cast<acc_t>(power)));
  }
}

}  // namespace math
}  // namespace equinorm
