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

#include <cstdint>

namespace surgellm {

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
