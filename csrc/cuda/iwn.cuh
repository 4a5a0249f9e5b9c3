// CUDA kernels of fused_iwn: raw device pointers, sizes and a stream; no
// torch headers (they do not compile against a CPU-only torch wheel).
// bindings.cpp allocates outputs and the workspace and launches these.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/iwn_args.h"

namespace surgellm {
namespace cuda {

enum class ScalarKind : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Bytes of scratch memory the launches below need (partial sums per chunk).
template <typename acc_t>
size_t iwn_forward_workspace_bytes(const IWNForwardArgs<acc_t>& args);
template <typename acc_t>
size_t iwn_backward_workspace_bytes(const IWNBackwardArgs<acc_t>& args);

// acc_t is float (for float32/float16/bfloat16 data) or double (float64).
template <typename acc_t>
cudaError_t iwn_forward(ScalarKind kind, const IWNForwardArgs<acc_t>& args, void* workspace,
                        cudaStream_t stream);
template <typename acc_t>
cudaError_t iwn_backward(ScalarKind kind, const IWNBackwardArgs<acc_t>& args, void* workspace,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace surgellm
