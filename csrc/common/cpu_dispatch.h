// The CPU kernels are compiled once per CPU capability (DEFAULT, and AVX2 /
// AVX512 on x86-64, each with ATen's -m flags, in a namespace of that name)
// and picked at run time the way ATen's DispatchStub picks its kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#define SURGELLM_CPU_HAS_AVX 1
#endif

namespace surgellm {
namespace cpu {

// Statistics accumulate in float32, or float64 for float64 input.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

enum class Capability { DEFAULT, AVX2, AVX512 };

// The build for this processor: ATen's own choice (which honours
// ATEN_CPU_CAPABILITY), read once.
Capability capability();

// Whether the AVX512 build rounds float to bfloat16 with the processor's own
// instruction (avx512_bf16's vcvtne2ps2bf16): where the compiler knew it
// (SURGELLM_AVX512_BF16, set by the build) and the processor has it, unless
// SURGELLM_CPU_NO_AVX512_BF16=1. Set once, as the extension loads: a
// constant the store loops test, not a call.
extern const bool kAvx512Bf16Rounding;

// The size of the cache level farthest from the cores that one core sees
// (Linux: /sys/devices/system/cpu/cpu0/cache; 32 MiB where unknown), read
// once. Not sysconf(_SC_LEVEL3_CACHE_SIZE): glibc reports there what the
// whole package holds (on this project's AMD machine ten times what a core
// shares).
int64_t last_level_cache_bytes();

// Calls KERNEL<T>(ARGS) from the build matching this processor.
#ifdef SURGELLM_CPU_HAS_AVX
#define SURGELLM_CPU_KERNEL(KERNEL, T, ARGS)       \
  do {                                             \
    switch (::surgellm::cpu::capability()) {       \
      case ::surgellm::cpu::Capability::AVX512:    \
        ::surgellm::cpu::AVX512::KERNEL<T>(ARGS);  \
        break;                                     \
      case ::surgellm::cpu::Capability::AVX2:      \
        ::surgellm::cpu::AVX2::KERNEL<T>(ARGS);    \
        break;                                     \
      default:                                     \
        ::surgellm::cpu::DEFAULT::KERNEL<T>(ARGS); \
    }                                              \
  } while (0)
#else
#define SURGELLM_CPU_KERNEL(KERNEL, T, ARGS) ::surgellm::cpu::DEFAULT::KERNEL<T>(ARGS)
#endif

}  // namespace cpu
}  // namespace surgellm
