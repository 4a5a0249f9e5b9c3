// CPU kernels of fused_surgical_gate: raw pointers and sizes, one build per
// CPU capability (see common/cpu_dispatch.h).
#pragma once

#include "common/cpu_dispatch.h"
#include "surgical_gate/surgical_gate_args.h"

namespace surgellm {
namespace cpu {

#define SURGELLM_DECLARE_SURGICAL_GATE_CPU(CAPABILITY)                                   \
  namespace CAPABILITY {                                                                 \
  template <typename scalar_t>                                                           \
  void surgical_gate_forward(const SurgicalGateForwardArgs<acc_type<scalar_t>>& args);   \
  template <typename scalar_t>                                                           \
  void surgical_gate_backward(const SurgicalGateBackwardArgs<acc_type<scalar_t>>& args); \
  }

SURGELLM_DECLARE_SURGICAL_GATE_CPU(DEFAULT)
#ifdef SURGELLM_CPU_HAS_AVX
SURGELLM_DECLARE_SURGICAL_GATE_CPU(AVX2)
SURGELLM_DECLARE_SURGICAL_GATE_CPU(AVX512)
#endif

}  // namespace cpu
}  // namespace surgellm
