// Arguments of the fused_iwn phase kernels, shared by the CPU and CUDA sources.
// Plain C++ (no torch headers): the CUDA kernels must compile without torch.
//
// The op runs in phases (the seam data-parallel IWN reuses):
//   forward:  group moments (-> merge of several parts' moments) -> combine
//             (mu, sigma, running update) -> apply
//   backward: task sums -> coefficients -> input gradient
// Every pointer is to contiguous memory; "acc" is the accumulation type
// (float, or double for double data), "scalar" the data type of x.
#pragma once

#include <cstdint>

namespace surgellm {

// The rows every row pass reads: u = x * sigmoid(gate), and each row's key.
// Rows are keyed: in training key = task * num_classes + label, in eval
// key = task; a row's task is key / key_div. keys == nullptr means every key
// is 0. On CUDA, keys are not range-checked on the host (that would be a
// host sync): a key outside [0, num_keys) marks an invalid row, which the
// reductions skip and whose outputs are NaN.
//
// Channels first (BatchNorm's (N, C, H, W) in contiguous memory): x is
// (N, F, L), instance i's feature f a plane of L contiguous positions that
// share the instance's key, and there is no gate. L == 1 is the rows layout.
// Only the CPU kernels read planes (L > 1); elsewhere the op hands the
// kernels rows (one per position, features innermost).
template <typename acc_t>
struct IWNRows {
  const void* x;          // (N, F) or (N, F, L) scalar
  const void* gate_full;  // (N, F) scalar gate logits, or null
  const acc_t* gate_vec;  // (F) gate logits, or null
  const int32_t* keys;    // (N) or null
  int64_t N, F;
  int64_t L;  // positions per (instance, feature): 1 for rows
};

// Per group (key): count, mean and M2 (sum of squared deviations) of u, and
// mean_residual = mean_i (u_i - mean): the part of the exact mean that the
// rounded mean cannot hold, which the backward needs where a class's rows
// nearly coincide (see coefficients_at).
template <typename acc_t>
struct IWNMomentsArgs {
  IWNRows<acc_t> rows;
  int64_t num_groups;
  acc_t* count;          // (G)
  acc_t* mean;           // (G, F)
  acc_t* m2;             // (G, F)
  acc_t* mean_residual;  // (G, F)
};

// The moments of P parts of the rows (row chunks, or ranks) merged in part
// order into those of all the rows (merge_mean and merge_about of
// iwn_math.h). Each part's residual is its sum of (u - mean_p), R_p; the
// merged residual is the mean, as IWNMomentsArgs returns it.
template <typename acc_t>
struct IWNMergeArgs {
  const acc_t* count;         // (P, G)
  const acc_t* mean;          // (P, G, F)
  const acc_t* m2;            // (P, G, F)
  const acc_t* residual_sum;  // (P, G, F)
  int64_t num_parts, num_groups, F;
  acc_t* out_count;          // (G)
  acc_t* out_mean;           // (G, F)
  acc_t* out_m2;             // (G, F)
  acc_t* out_mean_residual;  // (G, F)
};

// Eq.10-11 per (task, feature) over the classes present, and the in-place
// running-statistics update of the tasks that have rows.
template <typename acc_t>
struct IWNCombineArgs {
  const acc_t* count;          // (T * C)
  const acc_t* mean;           // (T * C, F)
  const acc_t* m2;             // (T * C, F)
  const acc_t* mean_residual;  // (T * C, F)
  int64_t F, num_tasks, num_classes;
  bool pooled;
  acc_t momentum;
  acc_t* group_std;     // (T * C, F) out: s_c
  acc_t* mu;            // (T, F) out
  acc_t* sigma;         // (T, F) out
  acc_t* running_mean;  // (T, F) updated in place, or null
  acc_t* running_std;
};

// y = (u - mu_t) / (sigma_t + eps) * weight + bias.
template <typename acc_t>
struct IWNApplyArgs {
  IWNRows<acc_t> rows;
  int64_t num_tasks, key_div;
  const acc_t* weight;  // (F) or null
  const acc_t* bias;    // (F) or null
  const acc_t* mu;      // (T, F)
  const acc_t* sigma;   // (T, F)
  acc_t eps;
  void* y;  // (N, F) scalar
};

// Per task: sums[0] = sum dy, sums[1] = sum dy (u - mu_t).
template <typename acc_t>
struct IWNTaskSumsArgs {
  IWNRows<acc_t> rows;
  const void* dy;  // (N, F) scalar
  int64_t num_tasks, key_div;
  const acc_t* mu;  // (T, F)
  acc_t* sums;      // (2, T, F)
};

// The coefficients of dL/du = (dy - dy_shift_k) * scale_t + dev_coef_k * (u - center_k)
// (see coefficients_at in iwn_math.h), and dweight, dbias, du_dot_u.
// Data-parallel, `sums` are every rank's (the rows' gradients need them) and
// `param_sums` this rank's own, from which the parameters' gradients come
// (DistributedDataParallel adds those up); param_sums == sums otherwise.
template <typename acc_t>
struct IWNCoefficientsArgs {
  const acc_t* sums;        // (2, T, F)
  const acc_t* param_sums;  // (2, T, F)
  int64_t F, num_tasks, num_classes;
  bool training, pooled;
  acc_t eps;
  const acc_t* weight;         // (F) or null
  const acc_t* count;          // training: (T * C)
  const acc_t* group_mean;     // training: (T * C, F)
  const acc_t* group_std;      // training: (T * C, F)
  const acc_t* mean_residual;  // training: (T * C, F)
  const acc_t* mu;             // (T, F)
  const acc_t* sigma;          // (T, F)
  acc_t* scale;                // (T, F) out
  acc_t* dy_shift;             // training: (T * C, F) out
  acc_t* dev_coef;             // training: (T * C, F) out
  acc_t* center;               // training: (T * C, F) out
  acc_t* dweight;              // (F) out
  acc_t* dbias;                // (F) out
  acc_t* du_dot_u;             // (F) out: training's closed form of sum_i dL/du_i u_i
};

// dx = du * sigmoid(gate); dgate = du * u * (1 - sigmoid(gate)), reduced over
// rows for a (F) gate (in closed form, du_dot_u, in training).
template <typename acc_t>
struct IWNInputGradArgs {
  IWNRows<acc_t> rows;
  const void* dy;  // (N, F) scalar
  int64_t num_tasks, key_div;
  bool training;
  const acc_t* scale;     // (T, F)
  const acc_t* dy_shift;  // training: (T * C, F)
  const acc_t* dev_coef;
  const acc_t* center;
  const acc_t* du_dot_u;  // (F)
  void* dx;               // (N, F) scalar
  void* dgate_full;       // (N, F) scalar, with a per-instance gate
  acc_t* dgate_vec;       // (F), with a (F) gate
};

}  // namespace surgellm
