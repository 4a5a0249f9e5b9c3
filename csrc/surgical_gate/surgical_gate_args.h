// Arguments of the fused_surgical_gate kernels, shared by the CPU and CUDA
// sources. Plain C++ (no torch headers): the CUDA kernels must compile
// without torch.
//
// Per row i of d features, with g = sigmoid(gate_logits):
//   v = g * h + (1 - g) * s;  mean_i, rstd_i = 1 / sqrt(var_i + eps) of v;
//   z = (v - mean_i) * rstd_i * weight + bias.
// Every pointer is to contiguous memory; "acc" is the accumulation type
// (float, or double for double data), "scalar" the data type of h, s, logits.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace surgellm {

// A row's variance as rstd takes it: a rounding below 0 read as 0, and one
// past the accumulation type's range (a row of values whose squares
// overflow) NaN, a visible failure. F.layer_norm, and the reference built on
// it, give NaN for some row lengths and rstd = 0 for others: the row silently
// the bias. NaN stays NaN.
template <typename acc_t>
SURGELLM_HD acc_t row_variance(acc_t var) {
  if (var < acc_t(0)) return acc_t(0);
  return var == acc_t(INFINITY) ? acc_t(NAN) : var;
}

template <typename acc_t>
struct SurgicalGateForwardArgs {
  const void* h;       // (N, d) scalar
  const void* s;       // (N, d) scalar
  const void* logits;  // (N, d) scalar gate logits
  int64_t N, d;
  const acc_t* weight;  // (d) or null
  const acc_t* bias;    // (d) or null
  acc_t eps;
  void* z;      // (N, d) scalar out
  acc_t* mean;  // (N) out
  acc_t* rstd;  // (N) out
};

// The blend is recomputed from h, s and the logits (forward saves only mean
// and rstd). dweight and dbias are reduced over rows in a fixed order.
template <typename acc_t>
struct SurgicalGateBackwardArgs {
  const void* dz;  // (N, d) scalar
  const void* h;
  const void* s;
  const void* logits;
  int64_t N, d;
  const acc_t* weight;  // (d) or null
  const acc_t* mean;    // (N)
  const acc_t* rstd;    // (N)
  void* dh;             // (N, d) scalar out
  void* ds;             // (N, d) scalar out
  void* dlogits;        // (N, d) scalar out
  acc_t* dweight;       // (d) out, always written
  acc_t* dbias;         // (d) out, always written
};

}  // namespace surgellm
