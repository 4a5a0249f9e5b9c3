// CUDA kernels of the fused_iwn phases: raw device pointers, sizes and a
// stream; no torch headers (they do not compile against a CPU-only torch
// wheel). csrc/ops/iwn_kernels.cpp allocates outputs and workspaces, sets the
// device and launches these on its current stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/iwn_args.h"

namespace surgellm {
namespace cuda {

enum class ScalarKind : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Group counts of one row chunk live in shared memory (48 KiB of int).
constexpr int64_t kMaxGroups = 12288;
// Tasks are a grid dimension of the per-(task, feature) kernels.
constexpr int64_t kMaxTasks = 65535;

// Every phase has the same two entry points, overloaded on its argument
// struct: the bytes of scratch memory its launch needs (partial sums per row
// chunk; the chunks are fewer when groups x features are many, so that this
// stays under about 256 MiB -- or one chunk's partials, 3 x groups x F
// values, when those alone are more; 0 for none),
// and the launch itself on a stream. acc_t is float (for float32, float16 and
// bfloat16 data) or double (float64); `kind` is the data type of the rows.
#define SURGELLM_DECLARE_CUDA_PHASE(ARGS)                                              \
  template <typename acc_t>                                                            \
  size_t workspace_bytes(const ARGS<acc_t>& args);                                     \
  template <typename acc_t>                                                            \
  cudaError_t launch(ScalarKind kind, const ARGS<acc_t>& args, void* workspace,        \
                     cudaStream_t stream);
SURGELLM_DECLARE_CUDA_PHASE(IWNMomentsArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNCombineArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNApplyArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNTaskSumsArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNCoefficientsArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNInputGradArgs)
#undef SURGELLM_DECLARE_CUDA_PHASE

}  // namespace cuda
}  // namespace surgellm
