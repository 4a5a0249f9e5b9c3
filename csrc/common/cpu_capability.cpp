// The CPU kernel build for this processor (see cpu_dispatch.h).
#include <ATen/Version.h>

#include <cstdlib>
#include <fstream>
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

const bool kAvx512Bf16Rounding = [] {
#if defined(SURGELLM_CPU_HAS_AVX) && defined(SURGELLM_AVX512_BF16)
  __builtin_cpu_init();  // this runs among the library's constructors
  const char* off = std::getenv("SURGELLM_CPU_NO_AVX512_BF16");
  return __builtin_cpu_supports("avx512bf16") && !(off && std::string(off) == "1");
#else
  return false;
#endif
}();

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int level = 0;
    int64_t size = 0;
    for (int index = 0; index < 16; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
      int this_level = 0;
      int64_t value = 0;
      std::string unit;
      if (!(level_file >> this_level) || !(size_file >> value)) break;
      size_file >> unit;  // "32768K": the number, then K or M
      const int64_t scale = unit == "M" ? (int64_t(1) << 20) : unit == "K" ? 1024 : 0;
      if (this_level > level) level = this_level, size = value * scale;  // unknown unit: 0
    }
    return size > 0 ? size : int64_t(32) << 20;
  }();
  return bytes;
}
}  // namespace cpu
}  // namespace surgellm
