// CPU kernels of fused_iwn: raw pointers and sizes, one build per CPU
// capability (DEFAULT, AVX2, AVX512 on x86-64), picked at run time by
// bindings.cpp the way ATen's DispatchStub picks its kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../include/iwn_args.h"

namespace surgellm {
namespace cpu {

using surgellm::IWNForwardArgs;
using surgellm::IWNBackwardArgs;

// Statistics accumulate in float32, or float64 for float64 input.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

#define SURGELLM_DECLARE_IWN_CPU(CAPABILITY)                                 \
  namespace CAPABILITY {                                                     \
  template <typename scalar_t>                                               \
  void iwn_forward(const IWNForwardArgs<acc_type<scalar_t>>& args);          \
  template <typename scalar_t>                                               \
  void iwn_backward(const IWNBackwardArgs<acc_type<scalar_t>>& args);        \
  }

SURGELLM_DECLARE_IWN_CPU(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
SURGELLM_DECLARE_IWN_CPU(AVX2)
SURGELLM_DECLARE_IWN_CPU(AVX512)
#endif

}  // namespace cpu
}  // namespace surgellm
