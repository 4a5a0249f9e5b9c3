// CUDA kernels of the fused_iwn phases: raw device pointers, sizes and a
// stream; no torch headers (they do not compile against a CPU-only torch
// wheel). iwn_kernels.cpp allocates outputs and workspaces, sets the device
// and launches these on its current stream (see common/cuda_launch.h for the
// two entry points every phase has).
#pragma once

#include "common/cuda_launch.h"
#include "iwn/iwn_args.h"

namespace surgellm {
namespace cuda {

// Group counts of one row chunk live in shared memory (48 KiB of int).
constexpr int64_t kMaxGroups = 12288;
// Tasks are a grid dimension of the per-(task, feature) kernels.
constexpr int64_t kMaxTasks = 65535;
// So are the row kernels' blocks of 128 features (grid.y).
constexpr int64_t kMaxFeatures = int64_t(65535) * 128;

}  // namespace cuda

// Per phase: the bytes of scratch memory its launch needs (partial sums per
// row chunk; the chunks are fewer when groups x features are many, so that
// this stays under about 256 MiB -- or one chunk's partials, 3 x groups x F
// values, when those alone are more; 0 for none), and the launch itself.
#define SURGELLM_DECLARE_CUDA_PHASE(ARGS)                                                  \
  template <typename acc_t>                                                                \
  size_t cuda_workspace_bytes(const ARGS<acc_t>& args);                                    \
  template <typename acc_t>                                                                \
  cudaError_t cuda_launch(cuda::ScalarKind kind, const ARGS<acc_t>& args, void* workspace, \
                          cudaStream_t stream);
SURGELLM_DECLARE_CUDA_PHASE(IWNMomentsArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNMergeArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNCombineArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNApplyArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNTaskSumsArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNCoefficientsArgs)
SURGELLM_DECLARE_CUDA_PHASE(IWNInputGradArgs)
#undef SURGELLM_DECLARE_CUDA_PHASE

}  // namespace surgellm
