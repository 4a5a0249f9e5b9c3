// CUDA kernels of fused_surgical_gate: raw device pointers, sizes and a
// stream; no torch headers (they do not compile against a CPU-only torch
// wheel). surgical_gate_kernels.cpp allocates outputs and the workspace,
// sets the device and launches these on its current stream (see
// common/cuda_launch.h for the two entry points).
#pragma once

#include "common/cuda_launch.h"
#include "surgical_gate/surgical_gate_args.h"

namespace surgellm {

// Forward: no workspace (0 bytes). Backward: the per-row-block partial sums
// of dweight and dbias, 2 x d values per row block; the row blocks are fewer
// when d is large, so that this stays under about 64 MiB (or one row block's
// partials, when those alone are more). N == 0 launches nothing but the
// zero-fill of dweight and dbias. d must be positive.
template <typename acc_t>
size_t cuda_workspace_bytes(const SurgicalGateForwardArgs<acc_t>& args);
template <typename acc_t>
cudaError_t cuda_launch(cuda::ScalarKind kind, const SurgicalGateForwardArgs<acc_t>& args,
                        void* workspace, cudaStream_t stream);
template <typename acc_t>
size_t cuda_workspace_bytes(const SurgicalGateBackwardArgs<acc_t>& args);
template <typename acc_t>
cudaError_t cuda_launch(cuda::ScalarKind kind, const SurgicalGateBackwardArgs<acc_t>& args,
                        void* workspace, cudaStream_t stream);

}  // namespace surgellm
