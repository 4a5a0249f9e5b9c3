// What the torch-free CUDA sources share: conversions between the data and
// the accumulation types, the sigmoid, the workspace carving and the data
// type dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_launch.h"

namespace surgellm {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// exp(-v) is inf or 0 for large |v|, so g saturates to 0 or 1, never NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + exp(-v));
}

// Conversions between the data type and the accumulation type, through the
// intrinsics: torch's CUDA builds define __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same<scalar_t, __half>::value)
    return static_cast<acc_t>(__half2float(v));
  else if constexpr (std::is_same<scalar_t, __nv_bfloat16>::value)
    return static_cast<acc_t>(__bfloat162float(v));
  else
    return static_cast<acc_t>(v);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same<scalar_t, __half>::value)
    return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same<scalar_t, __nv_bfloat16>::value)
    return __float2bfloat16_rn(static_cast<float>(v));
  else
    return static_cast<scalar_t>(v);
}

// Carves typed slices out of the byte workspace (sizes only, with base null).
template <typename acc_t>
struct Workspace {
  char* base;
  size_t used = 0;
  acc_t* take(int64_t n) {
    acc_t* p = base ? reinterpret_cast<acc_t*>(base + used) : nullptr;
    used += ((n * sizeof(acc_t) + 255) / 256) * 256;
    return p;
  }
};

// Calls fn(scalar_t{}) with the data type of `kind` (acc_t float: float32,
// float16, bfloat16; acc_t double: float64).
template <typename acc_t, typename Fn>
cudaError_t with_scalar(ScalarKind kind, Fn fn) {
  if constexpr (std::is_same<acc_t, double>::value) {
    return kind == ScalarKind::Float64 ? fn(double{}) : cudaErrorInvalidValue;
  } else {
    switch (kind) {
      case ScalarKind::Float32:
        return fn(float{});
      case ScalarKind::Float16:
        return fn(__half{});
      case ScalarKind::BFloat16:
        return fn(__nv_bfloat16{});
      default:
        return cudaErrorInvalidValue;
    }
  }
}

}  // namespace cuda
}  // namespace surgellm
