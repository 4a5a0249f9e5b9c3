// The contract between the kernel entry points (csrc/*/*_kernels.cpp, C++
// with torch) and the CUDA kernels (csrc/*/*_cuda.cu, no torch headers: they
// compile with nvcc alone). Host C++ may include this file.
//
// Every CUDA phase of every op has two functions in namespace surgellm,
// overloaded on the phase's argument struct and declared in its op's
// *_cuda.cuh:
//   size_t cuda_workspace_bytes(const Args& args);   // scratch the launch needs
//   cudaError_t cuda_launch(ScalarKind kind, const Args& args, void* workspace,
//                           cudaStream_t stream);
// run_phase (kernel_call.h) finds them by argument-dependent lookup, so it
// needs no op's header. `kind` is the data type of the rows; the statistics
// are in the accumulation type (float, or double for float64 data).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace surgellm {
namespace cuda {

enum class ScalarKind : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace cuda
}  // namespace surgellm
