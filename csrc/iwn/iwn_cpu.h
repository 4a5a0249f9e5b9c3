// CPU kernels of the fused_iwn phases: raw pointers and sizes, one build per
// CPU capability (see common/cpu_dispatch.h).
#pragma once

#include "common/cpu_dispatch.h"
#include "iwn/iwn_args.h"

namespace surgellm {
namespace cpu {

// Row passes are templated on the data type; the per-(task, feature) steps
// (combine, coefficients) on the accumulation type only.
#define SURGELLM_DECLARE_IWN_CPU(CAPABILITY)                              \
  namespace CAPABILITY {                                                  \
  template <typename scalar_t>                                            \
  void iwn_group_moments(const IWNMomentsArgs<acc_type<scalar_t>>& args); \
  template <typename scalar_t>                                            \
  void iwn_apply(const IWNApplyArgs<acc_type<scalar_t>>& args);           \
  template <typename scalar_t>                                            \
  void iwn_task_sums(const IWNTaskSumsArgs<acc_type<scalar_t>>& args);    \
  template <typename scalar_t>                                            \
  void iwn_input_grad(const IWNInputGradArgs<acc_type<scalar_t>>& args);  \
  template <typename acc_t>                                               \
  void iwn_merge_moments(const IWNMergeArgs<acc_t>& args);                \
  template <typename acc_t>                                               \
  void iwn_combine(const IWNCombineArgs<acc_t>& args);                    \
  template <typename acc_t>                                               \
  void iwn_coefficients(const IWNCoefficientsArgs<acc_t>& args);          \
  }

SURGELLM_DECLARE_IWN_CPU(DEFAULT)
#ifdef SURGELLM_CPU_HAS_AVX
SURGELLM_DECLARE_IWN_CPU(AVX2)
SURGELLM_DECLARE_IWN_CPU(AVX512)
#endif

}  // namespace cpu
}  // namespace surgellm
