// CPU kernels of the fused_iwn phases: raw pointers and sizes, one build per
// CPU capability (DEFAULT, AVX2, AVX512 on x86-64), picked at run time the way
// ATen's DispatchStub picks its kernels (see SURGELLM_CPU_KERNEL).
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../include/iwn_args.h"

namespace surgellm {
namespace cpu {

// Statistics accumulate in float32, or float64 for float64 input.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// Row passes are templated on the data type; the per-(task, feature) steps
// (combine, coefficients) on the accumulation type only.
#define SURGELLM_DECLARE_IWN_CPU(CAPABILITY)                                      \
  namespace CAPABILITY {                                                          \
  template <typename scalar_t>                                                    \
  void iwn_group_moments(const IWNMomentsArgs<acc_type<scalar_t>>& args);         \
  template <typename scalar_t>                                                    \
  void iwn_apply(const IWNApplyArgs<acc_type<scalar_t>>& args);                   \
  template <typename scalar_t>                                                    \
  void iwn_task_sums(const IWNTaskSumsArgs<acc_type<scalar_t>>& args);            \
  template <typename scalar_t>                                                    \
  void iwn_input_grad(const IWNInputGradArgs<acc_type<scalar_t>>& args);          \
  template <typename acc_t>                                                       \
  void iwn_combine(const IWNCombineArgs<acc_t>& args);                            \
  template <typename acc_t>                                                       \
  void iwn_coefficients(const IWNCoefficientsArgs<acc_t>& args);                  \
  }

SURGELLM_DECLARE_IWN_CPU(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
SURGELLM_DECLARE_IWN_CPU(AVX2)
SURGELLM_DECLARE_IWN_CPU(AVX512)
#define SURGELLM_CPU_HAS_AVX 1
#endif

enum class Capability { DEFAULT, AVX2, AVX512 };

// The build for this processor: ATen's own choice (which honours
// ATEN_CPU_CAPABILITY), read once.
Capability capability();

// Calls KERNEL<T>(ARGS) from the build matching this processor.
#ifdef SURGELLM_CPU_HAS_AVX
#define SURGELLM_CPU_KERNEL(KERNEL, T, ARGS)                               \
  do {                                                                     \
    switch (::surgellm::cpu::capability()) {                               \
      case ::surgellm::cpu::Capability::AVX512:                            \
        ::surgellm::cpu::AVX512::KERNEL<T>(ARGS);                          \
        break;                                                             \
      case ::surgellm::cpu::Capability::AVX2:                              \
        ::surgellm::cpu::AVX2::KERNEL<T>(ARGS);                            \
        break;                                                             \
      default:                                                             \
        ::surgellm::cpu::DEFAULT::KERNEL<T>(ARGS);                         \
    }                                                                      \
  } while (0)
#else
#define SURGELLM_CPU_KERNEL(KERNEL, T, ARGS) ::surgellm::cpu::DEFAULT::KERNEL<T>(ARGS)
#endif

}  // namespace cpu
}  // namespace surgellm
