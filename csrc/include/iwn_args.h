// Arguments of the fused_iwn kernels, shared by the CPU and CUDA sources.
// Plain C++ (no torch headers): the CUDA kernels must compile without torch.
#pragma once

#include <cstdint>

namespace surgellm {

// Rows are keyed: in training key = task * num_classes + label; in eval
// key = task (num_classes == 1). keys == nullptr means every key is 0.
template <typename acc_t>
struct IWNForwardArgs {
  const void* x;             // (N, F) input, scalar_t
  const void* gate_full;     // (N, F) gate logits, scalar_t, or null
  const acc_t* gate_vec;     // (F) gate logits, or null
  const int32_t* keys;       // (N) or null
  int64_t N, F, num_tasks, num_classes;
  bool training, pooled;
  acc_t eps;
  const acc_t* weight;       // (F) or null
  const acc_t* bias;         // (F) or null
  const acc_t* mean_in;      // eval: (T, F) statistics
  const acc_t* std_in;
  void* y;                   // (N, F) output, scalar_t
  acc_t* group_count;        // training: (K) with K = T * C
  acc_t* group_mean;         // training: (K, F)
  acc_t* group_std;          // training: (K, F)
  acc_t* mu;                 // training: (T, F) batch statistics
  acc_t* sigma;
};

template <typename acc_t>
struct IWNBackwardArgs {
  const void* dy;            // (N, F), scalar_t
  const void* x;
  const void* gate_full;
  const acc_t* gate_vec;
  const int32_t* keys;
  int64_t N, F, num_tasks, num_classes;
  bool training, pooled;
  acc_t eps;
  const acc_t* weight;
  const acc_t* group_count;  // training only (else null)
  const acc_t* group_mean;
  const acc_t* group_std;
  const acc_t* mu;           // (T, F) statistics used in forward
  const acc_t* sigma;
  void* dx;                  // (N, F), scalar_t
  void* dgate_full;          // (N, F) scalar_t, when gate_full
  acc_t* dgate_vec;          // (F), when gate_vec
  acc_t* dweight;            // (F), always written
  acc_t* dbias;              // (F), always written
};

}  // namespace surgellm
