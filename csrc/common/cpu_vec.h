// Vector building blocks of the CPU kernels (at::vec loops with counted
// tails, per-thread row buffers, deterministic chunked reductions). Each
// kernel source includes this once, compiled per CPU capability.
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu_vec.h from a source compiled with -DCPU_CAPABILITY=..."
#endif

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <utility>
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

// Rows per reduction chunk, for rows of `row_bytes` of data and chunks of
// `partial_bytes` of partials each. Each chunk's partials are zeroed,
// filled and merged, so a chunk holds at least kDataPerPartial times their
// bytes of data (128-row chunks of 768 floats against 10 classes' moments
// spent a fifth of the phase on them), at least 128 rows, and about N / 64
// rows so that threads have chunks to share, but not more than kChunkBytes
// of data where those allow, so that a pass that reads a chunk's rows again
// (the group moments' fallback, a class's shift rows) finds them in cache.
// The count of such chunks that fit in N is then
// rounded down to a multiple of 8 (to 4, 2 or 1 when fewer), so that 2, 4
// or 8 threads share them evenly (which can make a chunk up to twice
// kChunkBytes), and lowered where the partials would pass their budget. A
// function of the shapes only, never of the thread count: that is what
// makes the chunked reductions deterministic.
constexpr int64_t kDataPerPartial = 16;
constexpr int64_t kChunkBytes = int64_t(2) << 20;

inline int64_t rows_per_chunk(int64_t N, int64_t row_bytes, int64_t partial_bytes) {
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t rows = std::min(std::max({int64_t(128), ceil_div(N, 64),
                                          ceil_div(kDataPerPartial * partial_bytes, row_bytes)}),
                                std::max<int64_t>(128, kChunkBytes / row_bytes));
  int64_t chunks = std::max<int64_t>(1, N / rows);
  int64_t step = 1;  // the largest power of two <= min(chunks, 8)
  while (step < 8 && 2 * step <= chunks) step *= 2;
  chunks = chunks / step * step;
  chunks = std::min(
      chunks, std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(1, partial_bytes)));
  return std::max<int64_t>(1, ceil_div(N, chunks));
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

// for_each_vec carrying a state from vector to vector: state = body(f, n,
// state). Accumulators kept this way, by value, stay in registers; captured
// by reference they live in memory, reloaded after every store (a vector
// type may alias any float), and their sum became a chain through memory.
template <typename acc_t, typename State, typename Body>
inline State fold_vecs(int64_t F, State state, const Body& body) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  int64_t f = 0;
  for (; f + W <= F; f += W) state = body(f, W, state);
  if (f < F) state = body(f, F - f, state);
  return state;
}

template <typename acc_t>
inline acc_t sum_lanes(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto a, auto b) { return a + b; }, v);
}

// Merge of two states of paired sums (fold_vecs_chained).
template <typename Vec>
inline std::pair<Vec, Vec> add_pairs(const std::pair<Vec, Vec>& a, const std::pair<Vec, Vec>& b) {
  return {a.first + b.first, a.second + b.second};
}

// fold_vecs for sums, with four states, each `init` (the sums' zero): vector
// j of each group of four goes to state j, the rest (fewer than four vectors)
// to state 0, and the states merge as (s0 + s2) + (s1 + s3). The order is
// fixed by F alone. body must leave a state unchanged by the lanes past n of
// the last, counted vector. One state would make each add wait for the
// previous add's result; four keep the adds apart.
template <typename acc_t, typename State, typename Body, typename Merge>
inline State fold_vecs_chained(int64_t F, const State& init, const Body& body, const Merge& merge) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  // Named states, not an array, which the compiler keeps in memory.
  State s0 = init, s1 = init, s2 = init, s3 = init;
  int64_t f = 0;
  for (; f + 4 * W <= F; f += 4 * W) {
    s0 = body(f, W, s0);
    s1 = body(f + W, W, s1);
    s2 = body(f + 2 * W, W, s2);
    s3 = body(f + 3 * W, W, s3);
  }
  // The rest, fewer than four vectors, into s0 alone: a body called (not
  // inlined) with the other states would keep them in memory.
  for (; f < F; f += W) s0 = body(f, std::min(W, F - f), s0);
  return merge(merge(s0, s2), merge(s1, s3));
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
// With AVX2, a whole vector's 8 values likewise as 128 bits: at::vec's
// counted load and store copy through a stack buffer, which every vector
// paid for; counted loads and stores in the tail only.
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
#if defined(CPU_CAPABILITY_AVX2)
    static_assert(Vectorized<acc_t>::size() == 8, "8 float lanes");
    if (n == 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      __m256 out;
      if constexpr (std::is_same<scalar_t, c10::BFloat16>::value)
        at::vec::cvtbf16_fp32(raw, out);
      else
        at::vec::cvtfp16_fp32(raw, out);
      return out;
    }
#endif
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
#if defined(CPU_CAPABILITY_AVX2)
    static_assert(Vectorized<acc_t>::size() == 8, "8 float lanes");
    if (n == 8) {
      const __m128i raw = std::is_same<scalar_t, c10::BFloat16>::value ? at::vec::cvtfp32_bf16(v)
                                                                       : at::vec::cvtfp32_fp16(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), raw);
      return;
    }
#endif
    at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(n));
#endif
  }
}

// 2W bfloat16 / float16 values as two float vectors and back, the lanes in
// an order of their own (the store puts them back), for maps that give every
// lane the same coefficients (a plane of one feature) or per-lane ones
// arranged to match (arrange_lanes).
// With AVX2 and AVX512, bfloat16 is unpacked and packed within 128-bit
// lanes: one unpack per vector on load where the ordered conversion takes
// two or three (widen, shift; AVX2 also an extract), and no cross-lane
// permute on store; bfloat16 passes were bound by these instructions, not
// by memory. Rounding to nearest even and NaN as at::vec's conversions.
// Other types and capabilities: at::vec's, in order.
template <typename scalar_t>
constexpr bool lanes_reordered() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return std::is_same<scalar_t, c10::BFloat16>::value;
#else
  return false;
#endif
}

// Which of a block's 2W values lane k of the pair holds (k < W: the first
// vector): an unpack takes 4 values of each 128-bit lane (of 8 values) per
// vector, the first vector the low 4, the second the high 4.
template <typename scalar_t>
constexpr int64_t lane_source(int64_t k) {
  if constexpr (!lanes_reordered<scalar_t>()) {
    return k;
  } else {
    constexpr int64_t W = Vectorized<float>::size();
    static_assert(Vectorized<scalar_t>::size() == 2 * W, "128-bit lanes of 8 values");
    return (k % W) / 4 * 8 + k / W * 4 + k % 4;
  }
}

// One block of 2W floats in lane_source order, a permute per vector: with
// few classes the tables have fewer rows than a grain, and one thread
// arranges them while the other waits. Instantiated only where
// lanes_reordered (the AVX2 and AVX512 builds, float lanes).
template <typename scalar_t, typename acc_t>
inline void arrange_block(const acc_t* src, acc_t* dst) {
  static_assert(std::is_same<acc_t, float>::value, "bfloat16 lanes are float lanes");
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(Vectorized<float>::size() == 16, "16 float lanes");
  // lane k takes lane_source(k) of the pair (a, b): bit 4 picks b
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(4));
  const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, lo, b));
  _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(a, hi, b));
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(Vectorized<float>::size() == 8, "8 float lanes");
  // the low 128-bit lanes of a and b, then the high ones
  const __m256 a = _mm256_loadu_ps(src), b = _mm256_loadu_ps(src + 8);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(a, b, 0x20));
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(a, b, 0x31));
#else
  constexpr int64_t B = 2 * Vectorized<acc_t>::size();
  for (int64_t k = 0; k < B; ++k) dst[k] = src[lane_source<scalar_t>(k)];
#endif
}

// Per-feature coefficients (rows of F) arranged as a row's values arrive in
// load_lanes_any_order's lanes: each whole block of 2W permuted, the tail
// (read in order by counted loads) as it is. Empty when the lanes come in
// order or a row holds no whole block. In parallel over rows: with many
// classes there are many (class, task) rows.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> arrange_lanes(const acc_t* in, int64_t rows, int64_t F) {
  std::vector<acc_t> out;
  constexpr int64_t B = 2 * Vectorized<acc_t>::size();
  if constexpr (lanes_reordered<scalar_t>()) {
    if (F < B) return out;
    out.resize(rows * F);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* src = in + r * F;
        acc_t* dst = out.data() + r * F;
        int64_t f = 0;
        for (; f + B <= F; f += B) arrange_block<scalar_t>(src + f, dst + f);
        std::copy(src + f, src + F, dst + f);
      }
    });
  }
  return out;
}

// arrange_lanes for each of K coefficient arrays (coef[k] of rows[k] rows of
// F, or null): each pointer switched to its arranged copy, which `arranged`
// keeps, where one is made.
template <typename scalar_t, typename acc_t, size_t K>
void arrange_each(const acc_t* (&coef)[K], const int64_t (&rows)[K], int64_t F,
                  std::vector<acc_t> (&arranged)[K]) {
  for (size_t k = 0; k < K; ++k) {
    if (coef[k]) arranged[k] = arrange_lanes<scalar_t>(coef[k], rows[k], F);
    if (!arranged[k].empty()) coef[k] = arranged[k].data();
  }
}

template <typename scalar_t>
inline std::pair<Vectorized<float>, Vectorized<float>> load_lanes_any_order(const scalar_t* p) {
  if constexpr (lanes_reordered<scalar_t>()) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i raw = _mm512_loadu_si512(p);
    const __m512i zero = _mm512_setzero_si512();
    return {_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw))};
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i zero = _mm256_setzero_si256();
    return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw))};
#endif
  }
  const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
  return {lo, hi};
}

// With `stream` (stream_output) and p aligned to the store's width, bfloat16
// pairs are written with a non-temporal store: with AVX2 on a 2-core AMD
// EPYC host, channels-first bfloat16 planes at (256, 64, 56, 56) took 6.2
// ms in eval with it against 8.2-8.6 ms without, (64, 256, 28, 28) 1.6-1.8
// ms against 1.8-2.0 ms; on a Zen 3 host the smaller shape lost (see
// stream_output, which now keeps ordinary stores there).
template <typename scalar_t>
inline void store_lanes_any_order(const Vectorized<float>& lo, const Vectorized<float>& hi,
                                  scalar_t* p, bool stream) {
  if constexpr (lanes_reordered<scalar_t>()) {
    // The upper 16 bits rounded to nearest even; NaN stays a quiet NaN (0xffff).
#if defined(CPU_CAPABILITY_AVX512)
    // Or the processor's rounding (avx512_bf16): the same bits, except NaN
    // (a quiet NaN of the same sign and leading payload) and results below
    // 2^-126 in magnitude (0, as its inputs there count as 0). It gives lo's
    // values, then hi's, each in their lanes' order; the permutation puts
    // the pair's 32 values back in memory order. With it the bfloat16 gate
    // forward at 4096x768 took 0.83-1.09 of the time with the rounding below
    // (median 0.93, eight pairs of processes).
    auto pack = [&]() -> __m512i {
#if defined(SURGELLM_AVX512_BF16)
      if (kAvx512Bf16Rounding) {
        const __m512i order =
            _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8, 23, 22,
                             21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
        return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
#endif
      auto round = [](const __m512& v) {
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        // The shift writes the ordered lanes; NaN lanes keep 0xffff.
        return _mm512_mask_srli_epi32(
            _mm512_set1_epi32(0xffff), _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q),
            _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      };
      return _mm512_packus_epi32(round(lo), round(hi));
    };
    const __m512i packed = pack();
    if (stream && reinterpret_cast<uintptr_t>(p) % 64 == 0)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), packed);
    else
      _mm512_storeu_si512(p, packed);
    return;
#elif defined(CPU_CAPABILITY_AVX2)
    auto round = [](const __m256& v) {
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
      return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), rounded, ordered);
    };
    const __m256i packed = _mm256_packus_epi32(round(lo), round(hi));
    if (stream && reinterpret_cast<uintptr_t>(p) % 32 == 0)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
    return;
#endif
  }
  (void)stream;
  at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
}

// Whether a pass that reads `inputs` and writes `outputs` tensors of `numel`
// values of scalar_t writes its output with non-temporal stores (store_out,
// store_lanes_any_order): when what it moves exceeds the last-level cache,
// its output is evicted by its own reads before anything could read it from
// the cache, and an ordinary store first reads every line it writes. At
// 4096x768 float32 this made IWN's forward + backward and the gate's forward
// 12-17% faster. One output only: on another host of the same kind (2-core
// AMD EPYC), streamed stores to the gate backward's three outputs made it 3-4
// times slower, where one output still gained. bfloat16 / float16 outputs
// only where they are written two vectors at a time (see store_out), and
// only where the output alone exceeds the cache: on a Zen 3 host (32 MiB L3),
// channels-first bfloat16 at (64, 256, 28, 28), whose 25.7 MB output fits,
// took 3.9-5.5 ms in eval streamed against 2.5-3.2 ms cached, and training
// 13.0-15.3 ms against 9.3-14.0, while at (256, 64, 56, 56) (103 MB)
// streaming still gained (7.7-10.3 ms against 10.5-13.0; pairs of processes).
template <typename scalar_t>
inline bool stream_output(int64_t inputs, int64_t outputs, int64_t numel) {
  constexpr bool kFull = std::is_same<scalar_t, acc_type<scalar_t>>::value;
  const int64_t bytes = numel * int64_t(sizeof(scalar_t));
  return (kFull || lanes_reordered<scalar_t>()) && outputs == 1 &&
         (kFull ? inputs + outputs : outputs) * bytes > last_level_cache_bytes();
}

// store_from_acc, bypassing the caches when `stream` and the vector is of
// float32 / float64, whole and aligned. (bfloat16 / float16 vectors keep
// ordinary stores: streamed a vector at a time they measured no faster, and
// up to 10% slower; store_lanes_any_order streams a pair in one whole
// store, which gained.) Call stream_fence() at the end of a parallel task that
// streamed (the stores are weakly ordered).
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
// value (a sigmoid) otherwise outrun the hardware prefetcher and stall on
// their loads.
template <typename scalar_t>
inline void prefetch_ahead(const scalar_t* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + 2048);
}

// Whether sigmoid_inline computes every float lane inline. With AVX512,
// vscalefps applies 2^n exactly and saturates to 0 and inf, so exp_neg_inline
// takes any x (clamped); without it, 2^n is built in the exponent bits and
// only |x| <= 80 (no overflow, no denormal) is inline (inline_range_lanes).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kSigmoidInlineEverywhere = true;
#else
constexpr bool kSigmoidInlineEverywhere = false;
#endif

constexpr float kLog2e = 1.44269504088896341f;  // log2(e), float-rounded

// p * 2^n for integral float lanes n: with AVX512 vscalefps (exact, and
// saturating to 0 and inf); else 2^n built in the exponent bits, for
// -126 <= n <= 127 (128 gives inf).
inline Vectorized<float> times_pow2(const Vectorized<float>& p, const Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const Vectorized<int32_t> bits =
      (at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127))
      << Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(bits);
#endif
}

// exp(-x) of float lanes, inline: -x = n ln2 + r with |r| <= ln2 / 2 (ln2
// split so that n * kLn2Hi is exact even without a fused multiply-add),
// exp(r) by its Taylor series to r^7 (remainder below 2^-27 relative), times
// 2^n. With AVX512, x is first clamped to [-89, 104] (exp(-x) of either end
// rounds to inf or 0; NaN passes through: the clamps return their second
// operand where one is NaN), and the negation is folded into the constants:
// -(x + n kLn2Hi) - n kLn2Lo rounds as (-x - n kLn2Hi) - n kLn2Lo does, one
// instruction fewer. Else |x| <= 80.
inline Vectorized<float> exp_neg_inline(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  constexpr float kLn2Hi = 0.693359375f;              // 355 / 512
  constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
#if defined(CPU_CAPABILITY_AVX512)
  const Vec xc = _mm512_max_ps(_mm512_set1_ps(-89.f), _mm512_min_ps(_mm512_set1_ps(104.f), x));
  const Vec n = (xc * Vec(-kLog2e)).round();
  const Vec r = _mm512_fnmsub_ps(n, Vec(kLn2Lo), at::vec::fmadd(n, Vec(kLn2Hi), xc));
#else
  const Vec t = x.neg();
  const Vec n = (t * Vec(kLog2e)).round();
  const Vec r = at::vec::fmadd(n, Vec(-kLn2Lo), at::vec::fmadd(n, Vec(-kLn2Hi), t));
#endif
  Vec p(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = at::vec::fmadd(p, r, Vec(c));
  return times_pow2(p, n);
}

template <typename acc_t>
inline Vectorized<acc_t> sigmoid(const Vectorized<acc_t>& logits) {
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + logits.neg().exp());
}

// All-ones in the lanes sigmoid_inline(x) computes inline (never NaN).
template <typename acc_t>
inline Vectorized<acc_t> inline_range_lanes(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same<acc_t, float>::value && !kSigmoidInlineEverywhere)
    return x.abs() <= Vectorized<float>(80.f);
  else
    return Vectorized<acc_t>(acc_t(0)) == Vectorized<acc_t>(acc_t(0));
}

// sigmoid in two tiers. sigmoid_inline: float lanes (all of them with
// AVX512, else those of inline_range_lanes) take exp_neg_inline and a division,
// as close to the true sigmoid as sigmoid() is (8 million logits uniform on
// [-80, 80] against float64: with AVX2 and AVX512 at most 2.44 ulps and 0.24
// on average, without vector instructions 2.44 and 0.25; torch.sigmoid 2.44
// and 0.24), though not always the same bits; without AVX512, a row that
// held a value outside (a saturated or NaN logit) is then computed again
// with sigmoid(). Lanes outside are computed from 0, so that any lane is
// safe. The exact exp is a call that clobbers every vector register: in the
// gate's loops it, not memory, was the bound. The division is not the bound
// (with AVX2, the hardware reciprocal estimate refined by Newton steps gave
// the same bits over those logits, and the gate's forward took 11-25%
// longer). Double lanes: sigmoid() throughout.
template <typename acc_t>
inline Vectorized<acc_t> sigmoid_inline(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same<acc_t, float>::value) {
    const Vectorized<float> one(1.f);
    if constexpr (kSigmoidInlineEverywhere)
      return one / (one + exp_neg_inline(x));
    else
      return one / (one + exp_neg_inline(x & inline_range_lanes(x)));
  } else {
    return sigmoid(x);
  }
}

// sigmoid of float lanes for results rounded to bfloat16 / float16 (2^-8 /
// 2^-11); any logit, NaN giving NaN. With AVX512 and AVX2, exp(-x) = 2^y,
// y = -x log2(e) rounded to float: n = round(y), f = y - n (exact), 2^f by
// the degree-4 polynomial closest to it in relative error on [-1/2, 1/2]
// (within 2.7e-6, one instruction fewer than the Taylor series to f^5),
// times 2^n. y's rounding and the polynomial bound the error: within
// 2^-17 relative of the sigmoid over [-88, 88] (4 million logits against
// float64: at most 6.4e-6, 9.4e-7 on average; sigmoid(0) is 0.5 + 1.8e-7).
// With AVX512, vrndscaleps and vreduceps give n and f, vscalefps applies
// 2^n, and no clamp is needed (an infinite y gives f = 0 and 2^n = inf or
// 0). With AVX2, y is clamped to [-126, 128] first (below, exp(-x) added to
// 1 rounds to 1; from y = 127.5 up, 2^n is inf and the sigmoid 0 in place
// of at most 4.2e-39). NaN passes through (the clamps return their second
// operand where one is NaN).
// Bfloat16 gate forward on an Intel Xeon (builds in alternating processes,
// three pairs, with the degree-5 Taylor series in place of the polynomial
// above): with AVX512, 0.76-0.77 ms at 4096x768 against 0.84-0.93
// with exp_neg_inline's form cut to r^5 (four instructions more: a
// negation, two clamps, a second reduction step); with AVX2 (the same Xeon
// running the AVX2 build), 2.33-2.53 times addcmul's time against 2.66-2.86
// at 4096x768, and 1.22-1.27 against 1.45-1.51 at 32768x768, with ATen's
// inline exp_u20 (within 20 float ulps, and a select to keep NaN).
// Other capabilities: exp_u20.
inline Vectorized<float> sigmoid_for_reduced(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec one(1.f);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Vec y = x * Vec(-kLog2e);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const Vec n = _mm512_roundscale_ps(y, kNearest);
  const Vec f = _mm512_reduce_ps(y, kNearest);
#else
  const Vec yc = _mm256_max_ps(_mm256_set1_ps(-126.f), _mm256_min_ps(_mm256_set1_ps(128.f), y));
  const Vec n = yc.round();
  const Vec f = yc - n;
#endif
  Vec p(0.009570102207362652f);  // the coefficient of f^4, then down to f^0
  for (const float c :
       {0.05591785907745361f, 0.240247443318367f, 0.6931217908859253f, 0.9999992847442627f})
    p = at::vec::fmadd(p, f, Vec(c));
  return one / (one + times_pow2(p, n));
#else
  return Vec::blendv(one / (one + x.neg().exp_u20()), x, x != x);
#endif
}

template <typename acc_t>
inline bool all_lanes(const Vectorized<acc_t>& mask) {
  return mask.zero_mask() == 0;
}

template <typename acc_t>
void sigmoid_row(const acc_t* logits, acc_t* out, int64_t F) {
  using Vec = Vectorized<acc_t>;
  const Vec in_range =
      fold_vecs<acc_t>(F, inline_range_lanes(Vec(acc_t(0))), [&](int64_t f, int64_t n, Vec ok) {
        const Vec x = load(logits + f, n);
        store(sigmoid_inline(x), out + f, n);
        return ok & inline_range_lanes(x);
      });
  if (!all_lanes(in_range))
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
