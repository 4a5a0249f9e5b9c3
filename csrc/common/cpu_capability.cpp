// The CPU kernel build for this processor (see cpu_dispatch.h).
#include <ATen/Version.h>

#include <string>

#include "common/cpu_dispatch.h"

namespace surgellm {
namespace cpu {
Capability capability() {
  static const Capability cap = [] {
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") return Capability::AVX512;
    if (name == "AVX2") return Capability::AVX2;
    return Capability::DEFAULT;
  }();
  return cap;
}
}  // namespace cpu
}  // namespace surgellm
