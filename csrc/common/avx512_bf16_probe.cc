// What the AVX512 build's bfloat16 rounding needs of the compiler
// (cpu_capability.cpp, cpu_vec.h): setup.py and CMakeLists.txt compile this
// with the AVX512 flags and -mavx512bf16, and use the instruction only where
// it compiles. Not part of the extension.
#include <immintrin.h>

bool processor_has_it() { return __builtin_cpu_supports("avx512bf16"); }

__m512bh round_pair(__m512 hi, __m512 lo) { return _mm512_cvtne2ps_pbh(hi, lo); }

int main() { return processor_has_it() ? 0 : 1; }
