// CUDA kernels of fused_surgical_gate: raw device pointers, sizes and a
// stream; no torch headers (they do not compile against a CPU-only torch
// wheel). csrc/ops/surgical_gate.cpp allocates outputs and the workspace,
// sets the device and launches these on its current stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/surgical_gate_args.h"
#include "iwn.cuh"  // ScalarKind

namespace surgellm {
namespace cuda {

// The same two entry points as every fused_iwn phase, overloaded on the
// argument struct: the bytes of scratch memory the launch needs, and the
// launch itself on a stream. acc_t is float (for float32, float16 and
// bfloat16 data) or double (float64); `kind` is the data type of the rows.
//
// Forward: no workspace (0 bytes). Backward: the per-row-block partial sums
// of dweight and dbias, 2 x d values per row block; the row blocks are fewer
// when d is large, so that this stays under about 64 MiB (or one row block's
// partials, when those alone are more). N == 0 launches nothing but the
// zero-fill of dweight and dbias. d must be positive.
template <typename acc_t>
size_t workspace_bytes(const SurgicalGateForwardArgs<acc_t>& args);
template <typename acc_t>
cudaError_t launch(ScalarKind kind, const SurgicalGateForwardArgs<acc_t>& args, void* workspace,
                   cudaStream_t stream);
template <typename acc_t>
size_t workspace_bytes(const SurgicalGateBackwardArgs<acc_t>& args);
template <typename acc_t>
cudaError_t launch(ScalarKind kind, const SurgicalGateBackwardArgs<acc_t>& args, void* workspace,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace surgellm
