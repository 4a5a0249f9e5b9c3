// Vector building blocks of the CPU kernels (at::vec loops with counted
// tails, per-thread row buffers, deterministic chunked reductions). Each
// kernel source includes this once, compiled per CPU capability.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu_vec.h from a source compiled with -DCPU_CAPABILITY=..."
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "common/cpu_dispatch.h"
#include "common/output_cache.h"

namespace surgellm {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Partial buffers of a chunked reduction stay under this many bytes: with
// many groups, fewer (longer) chunks instead of chunks x groups x F memory.
constexpr int64_t kPartialBudgetBytes = int64_t(64) << 20;

// Rows per reduction chunk, for rows of F features and `width` partial
// values per chunk: about N / 64 rows so that threads have chunks to share,
// at least 128 to amortize the merge, at most ~1 MiB of data so that a
// second pass over a chunk (group moments) finds it in L2 -- unless the
// partials need fewer, longer chunks to fit their budget. A function of the
// shapes only, never of the thread count: that is what makes the chunked
// reductions deterministic.
inline int64_t rows_per_chunk(int64_t N, int64_t F, int64_t width, int64_t bytes_per_value) {
  const int64_t cache_rows = std::max<int64_t>(128, (int64_t(1) << 18) / F);
  const int64_t rows = std::min(cache_rows, std::max<int64_t>(128, ceil_div(N, 64)));
  const int64_t max_chunks =
      std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(1, width * bytes_per_value));
  return std::max(rows, ceil_div(N, max_chunks));
}
// Grain of row-parallel elementwise passes: about 16K elements per task.
inline int64_t row_grain(int64_t F) { return std::max<int64_t>(1, 16384 / F); }
constexpr int64_t kFeatureGrain = 256;

// body(f, n) over [0, F) a vector at a time; n < vector size only in the
// last call, which then loads and stores n lanes.
template <typename acc_t, typename Body>
inline void for_each_vec(int64_t F, const Body& body) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  int64_t f = 0;
  for (; f + W <= F; f += W) body(f, W);
  if (f < F) body(f, F - f);
}

template <typename acc_t>
inline Vectorized<acc_t> load(const acc_t* p, int64_t n) {
  return n == Vectorized<acc_t>::size() ? Vectorized<acc_t>::loadu(p)
                                        : Vectorized<acc_t>::loadu(p, n);
}

template <typename acc_t>
inline void store(const Vectorized<acc_t>& v, acc_t* p, int64_t n) {
  if (n == Vectorized<acc_t>::size())
    v.store(p);
  else
    v.store(p, static_cast<int>(n));
}

// A vector of acc_t read from (written to) data of scalar_t in place:
// float32 / float64 rows directly, bfloat16 / float16 rows converted lane by
// lane in registers (no row buffer). With AVX512, one float vector's 16
// reduced values are loaded (stored) as 256 bits and converted by at::vec's
// own routines -- not a whole 512-bit reduced vector converted to two float
// vectors of which one is used: the conversions bounded bfloat16 passes.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_as_acc(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return load(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    static_assert(Vectorized<acc_t>::size() == 16, "16 float lanes");
    const __m256i raw = n == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
    __m512 out;
    if constexpr (std::is_same<scalar_t, c10::BFloat16>::value)
      at::vec::cvtbf16_fp32(raw, out);
    else
      at::vec::cvtfp16_fp32(raw, out);
    return out;
#else
    return std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n)));
#endif
  }
}

template <typename scalar_t, typename acc_t>
inline void store_from_acc(const Vectorized<acc_t>& v, scalar_t* p, int64_t n) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    store(v, p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    static_assert(Vectorized<acc_t>::size() == 16, "16 float lanes");
    const __m256i raw = std::is_same<scalar_t, c10::BFloat16>::value ? at::vec::cvtfp32_bf16(v)
                                                                     : at::vec::cvtfp32_fp16(v);
    if (n == 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), raw);
    else
      _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1), raw);
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(n));
#endif
  }
}

// Whether a pass that reads and writes `tensors` tensors of `numel` values
// of scalar_t writes its outputs with non-temporal stores (store_out): when
// what it moves exceeds the last-level cache, its output is evicted by its
// own reads before anything could read it from the cache, and an ordinary
// store first reads every line it writes. At 4096x768 float32 this made
// IWN's forward + backward and the gate's forward 12-17% faster. Never for
// bfloat16 / float16 outputs (see store_out).
template <typename scalar_t>
inline bool stream_output(int64_t tensors, int64_t numel) {
  return std::is_same<scalar_t, acc_type<scalar_t>>::value &&
         tensors * numel * int64_t(sizeof(scalar_t)) > last_level_cache_bytes();
}

// store_from_acc, bypassing the caches when `stream` and the vector is of
// float32 / float64, whole and aligned. (bfloat16 / float16 outputs keep
// ordinary stores: streamed, half a cache line at a time, they measured no
// faster, and up to 10% slower.) Call stream_fence() at the end of a
// parallel task that streamed (the stores are weakly ordered).
template <typename scalar_t, typename acc_t>
inline void store_out(const Vectorized<acc_t>& v, scalar_t* p, int64_t n, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    constexpr size_t kBytes = sizeof(Vectorized<acc_t>);
    if (stream && n == Vectorized<acc_t>::size() && reinterpret_cast<uintptr_t>(p) % kBytes == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same<acc_t, float>::value)
        _mm512_stream_ps(p, v);
      else
        _mm512_stream_pd(p, v);
#else
      if constexpr (std::is_same<acc_t, float>::value)
        _mm256_stream_ps(p, v);
      else
        _mm256_stream_pd(p, v);
#endif
      return;
    }
  }
#endif
  (void)stream;
  store_from_acc(v, p, n);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Asks for the cache line 2 KiB past p: row loops that compute much per
// value (exp, division) otherwise outrun the hardware prefetcher and stall
// on their loads.
template <typename scalar_t>
inline void prefetch_ahead(const scalar_t* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + 2048);
}

template <typename acc_t>
inline Vectorized<acc_t> sigmoid(const Vectorized<acc_t>& logits) {
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + logits.neg().exp());
}

// sigmoid of logits read from data of scalar_t. For bfloat16 / float16 data
// with inline exp_u20 (within 20 float ulps, 1e-6 relative: far below the
// 4e-3 a bfloat16 result keeps) instead of the exact exp, a call that
// clobbers every vector register -- the sigmoid, not memory, bounded the
// gate on such data. A NaN logit still gives NaN.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> sigmoid_of(const Vectorized<acc_t>& logits) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return sigmoid(logits);
  } else {
    const Vectorized<acc_t> one(acc_t(1));
    const Vectorized<acc_t> g = one / (one + logits.neg().exp_u20());
    return Vectorized<acc_t>::blendv(g, logits, logits != logits);
  }
}

template <typename acc_t>
void sigmoid_row(const acc_t* logits, acc_t* out, int64_t F) {
  for_each_vec<acc_t>(
      F, [&](int64_t f, int64_t n) { store(sigmoid(load(logits + f, n)), out + f, n); });
}

template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, acc_t* buf, int64_t F) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return src;
  } else {
    at::vec::convert(src, buf, F);
    return buf;
  }
}

// Kernel scratch from the CPU output cache (not std::vector), so that memory
// profilers -- and the benchmarks' peak-memory column -- see it.
template <typename T>
struct Scratch {
  c10::DataPtr ptr;
  int64_t n;
  explicit Scratch(int64_t n_, bool zero = true)
      : ptr(cpu_block_cache()->allocate(std::max<int64_t>(n_, 1) * sizeof(T))), n(n_) {
    if (zero) std::fill(data(), data() + n, T(0));
  }
  T* data() const { return static_cast<T*>(ptr.get()); }
  T& operator[](int64_t i) const { return data()[i]; }
};

// sigmoid of a (F) gate, computed once per call (empty without one).
template <typename acc_t>
std::vector<acc_t> gate_sigmoid(const acc_t* logits, int64_t F) {
  std::vector<acc_t> sig;
  if (logits) {
    sig.resize(F);
    sigmoid_row(logits, sig.data(), F);
  }
  return sig;
}

// Partial sums of a chunked reduction: `width` values per chunk, summed over
// chunks in chunk order into out (parallel over values).
template <typename acc_t>
void sum_chunks(const Scratch<acc_t>& partial, int64_t nchunks, int64_t width, acc_t* out) {
  at::parallel_for(0, width, kFeatureGrain, [&](int64_t j0, int64_t j1) {
    std::fill(out + j0, out + j1, acc_t(0));
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const acc_t* p = partial.data() + ch * width;
      for (int64_t j = j0; j < j1; ++j) out[j] += p[j];
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace surgellm
