// SURGELLM_HD: a function both the CPU build and nvcc compile (for the
// kernel arguments' plain-C++ helpers, which include no torch header).
#pragma once

#if defined(__CUDACC__)
#define SURGELLM_HD __host__ __device__ __forceinline__
#else
#define SURGELLM_HD inline
#endif
