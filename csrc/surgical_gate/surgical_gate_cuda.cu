// fused_surgical_gate on CUDA: per row i of d features, g = sigmoid(logits),
// v = g h + (1 - g) s, z = (v - mean_i) rstd_i w + b; and its backward.
//
// Row-wise kernels: one warp per row when d is small (kWarpRowsMaxD), else
// one block per row; the row sums are warp shuffles plus, for a block, one
// value per warp in shared memory, in a fixed order (results do not depend on
// timing). Forward statistics are two-pass (mean, then the squared
// deviations from it); the blend v of the row is kept in shared memory
// between the passes, so h, s and the logits are read from global memory
// once -- or, for a block row too long for 46 KiB of shared memory, recomputed
// from global memory in each of the three passes. Forward saves only mean and
// rstd; backward recomputes v and reads the row in each of its two passes.
// dweight and dbias: every row block sums dz xhat and dz over its rows in row
// order into its own 2 x d partial values (shared memory, or the partial
// buffer itself when they do not fit), and a second kernel sums the partials
// in row-block order: deterministic, no floating-point atomics. The row
// blocks are a function of (N, d) only, never of the device. No torch
// headers: surgical_gate_kernels.cpp passes raw pointers, sizes, the stream.
#include "surgical_gate/surgical_gate_cuda.cuh"

#include "common/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace surgellm {
namespace cuda {
namespace {

constexpr int kWarp = 32;
// d up to this: one warp per row (kRowWarps of them in a block of 128).
constexpr int64_t kWarpRowsMaxD = 512;
constexpr int kRowWarps = 4;
constexpr int kWarpRowThreads = kRowWarps * kWarp;
// Launch bounds: warp-row kernels at least this many blocks per SM, i.e. at
// most 64 registers (given only a thread count, CUDA 13's ptxas squeezed them
// to 40 registers and spilled); block-row kernels one block of kMaxThreads.
constexpr int kWarpRowMinBlocks = 8;
// One block per row: about kFeaturesPerThread features per thread, between
// kMinThreads and kMaxThreads threads (a multiple of 32).
constexpr int64_t kFeaturesPerThread = 8;
constexpr int kMinThreads = 64;
constexpr int kMaxThreads = 1024;
// Dynamic shared memory per block: under the 48 KiB every device grants
// without an opt-in, with room for the static reduction scratch (<= 1 KiB).
constexpr int64_t kMaxDynamicSmem = 46 * 1024;
// Forward grid: blocks loop over rows beyond this many.
constexpr int64_t kMaxRowGrid = int64_t(1) << 20;
// Backward row blocks: about kTargetRowBlocks, at least kMinBlockRows rows
// each, and few enough that their partials fit kPartialBudgetBytes.
constexpr int64_t kTargetRowBlocks = 1024;
constexpr int64_t kMinBlockRows = 8;
constexpr int64_t kPartialBudgetBytes = int64_t(64) << 20;
constexpr int kSumThreads = 256;

// -- Row layout: a function of d only.

inline bool warp_rows(int64_t d) { return d <= kWarpRowsMaxD; }

// Threads of a block-per-row launch.
inline int row_threads(int64_t d) {
  const int64_t t = ceil_div(ceil_div(d, kFeaturesPerThread), kWarp) * kWarp;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(kMinThreads, t)));
}

// -- Device pieces.

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  // A butterfly: every lane adds the same pairs (a + b == b + a exactly), so
  // all lanes end with one and the same sum.
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums K values over the threads of one row -- its warp, or its block through
// scratch[K * 32] of shared memory -- and leaves the sums in every thread.
// Block rows alternate between two scratch buffers on consecutive calls: the
// barrier of one call then separates the reads of the call before it from
// the writes of the call after it, so one barrier per call is enough.
template <bool kWarpRows, int K, typename acc_t>
__device__ __forceinline__ void row_sums(acc_t (&v)[K], acc_t* scratch) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if constexpr (!kWarpRows) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) scratch[k * kWarp + warp] = v[k];
    }
    __syncthreads();
    const int nwarps = blockDim.x / kWarp;
#pragma unroll
    for (int k = 0; k < K; ++k)
      v[k] = warp_sum(lane < nwarps ? scratch[k * kWarp + lane] : acc_t(0));
  }
}

// One element of the blend: the gate g, h - s, and v = g h + (1 - g) s.
template <typename acc_t>
struct Blend {
  acc_t g, hs, v;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ Blend<acc_t> blend_at(const scalar_t* __restrict__ h,
                                                 const scalar_t* __restrict__ s,
                                                 const scalar_t* __restrict__ logits, int64_t o) {
  const acc_t hv = to_acc<acc_t>(h[o]), sv = to_acc<acc_t>(s[o]);
  const acc_t g = sigmoid(to_acc<acc_t>(logits[o]));
  // g * h + (s - g * s) in two fused steps, as the CPU kernel: s where
  // h == s (bar exact rounding ties), where g * h + (1 - g) * s is often an
  // ulp off, which LayerNorm's 1 / sqrt(eps) magnifies in a constant row.
  return {g, hv - sv, fma(g, hv, fma(-g, sv, sv))};
}

// Which threads work on which row: a warp per row (kRowWarps rows at once in
// a block) or the whole block per row. `lane` indexes the threads of a row.
template <bool kWarpRows>
struct RowTeam {
  int lane, size, slot, slots;  // slot: the row of the block (warp), of `slots`
  __device__ __forceinline__ RowTeam() {
    if constexpr (kWarpRows) {
      lane = threadIdx.x % kWarp;
      size = kWarp;
      slot = threadIdx.x / kWarp;
      slots = kRowWarps;
    } else {
      lane = threadIdx.x;
      size = blockDim.x;
      slot = 0;
      slots = 1;
    }
  }
};

// z = (v - mean) rstd w + b, with mean and rstd saved per row. `cache`: the
// row's v stays in shared memory (d values per row of the block) between
// passes; without it the blend is recomputed from global memory in each pass.
template <typename scalar_t, typename acc_t, bool kWarpRows>
__global__ void __launch_bounds__(kWarpRows ? kWarpRowThreads : kMaxThreads,
                                  kWarpRows ? kWarpRowMinBlocks : 1)
    forward_rows(SurgicalGateForwardArgs<acc_t> a, bool cache_row) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t scratch[2][2 * kWarp];
  const RowTeam<kWarpRows> team;
  const bool cache = kWarpRows || cache_row;  // warp rows always fit
  const int64_t N = a.N, d = a.d;
  const auto* h = static_cast<const scalar_t*>(a.h);
  const auto* s = static_cast<const scalar_t*>(a.s);
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  auto* z = static_cast<scalar_t*>(a.z);
  acc_t* vc = reinterpret_cast<acc_t*>(smem) + int64_t(team.slot) * d;
  const int64_t step = int64_t(gridDim.x) * team.slots;
  for (int64_t i = int64_t(blockIdx.x) * team.slots + team.slot; i < N; i += step) {
    const scalar_t* hr = h + i * d;
    const scalar_t* sr = s + i * d;
    const scalar_t* lr = logits + i * d;
    scalar_t* zr = z + i * d;
    acc_t sum[1] = {acc_t(0)};
    for (int64_t j = team.lane; j < d; j += team.size) {
      const acc_t v = blend_at<acc_t>(hr, sr, lr, j).v;
      if (cache) vc[j] = v;  // read back by this same thread only
      sum[0] += v;
    }
    row_sums<kWarpRows>(sum, scratch[0]);
    const acc_t mean0 = sum[0] / acc_t(d);
    // Deviations from the first mean and their sum: the mean corrected by
    // it is exact for a constant row (whose z is then exactly the bias).
    acc_t sq[2] = {acc_t(0), acc_t(0)};
    for (int64_t j = team.lane; j < d; j += team.size) {
      const acc_t dv = (cache ? vc[j] : blend_at<acc_t>(hr, sr, lr, j).v) - mean0;
      sq[0] += dv * dv;
      sq[1] += dv;
    }
    row_sums<kWarpRows>(sq, scratch[1]);
    const acc_t shift = sq[1] / acc_t(d);
    const acc_t mean = mean0 + shift;
    const acc_t var = sq[0] / acc_t(d) - shift * shift;
    const acc_t rstd = acc_t(1) / sqrt(row_variance(var) + a.eps);
    for (int64_t j = team.lane; j < d; j += team.size) {
      const acc_t v = cache ? vc[j] : blend_at<acc_t>(hr, sr, lr, j).v;
      acc_t y = (v - mean) * rstd;
      if (a.weight) y *= a.weight[j];
      if (a.bias) y += a.bias[j];
      zr[j] = from_acc<scalar_t>(y);
    }
    if (team.lane == 0) {
      a.mean[i] = mean;
      a.rstd[i] = rstd;
    }
  }
}

// One element of the backward: dz, xhat = (v - mean) rstd, dxhat = dz w.
template <typename acc_t>
struct Grad {
  Blend<acc_t> b;
  acc_t dz, xhat, dxhat;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ Grad<acc_t> grad_at(const scalar_t* __restrict__ dz,
                                               const scalar_t* __restrict__ h,
                                               const scalar_t* __restrict__ s,
                                               const scalar_t* __restrict__ logits,
                                               const acc_t* __restrict__ weight, int64_t j,
                                               acc_t mean, acc_t rstd) {
  Grad<acc_t> e;
  e.b = blend_at<acc_t>(h, s, logits, j);
  e.dz = to_acc<acc_t>(dz[j]);
  e.xhat = (e.b.v - mean) * rstd;
  e.dxhat = weight ? e.dz * weight[j] : e.dz;
  return e;
}

// Row block blockIdx.x: rows [r0, r0 + block_rows). Per row,
// dv = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)); dh = dv g,
// ds = dv (1 - g), dlogits = dv (h - s) g (1 - g). The block's partials,
// partial[blockIdx.x * 2d ...]: sum over its rows of dz xhat (d values), then
// of dz (d values), each accumulated in row order by the thread that owns the
// feature. Warp rows: warp k takes rows r0 + k, r0 + k + kRowWarps, ... into
// its own 2d values of shared memory; the warps' values are then added in
// warp order. Block rows: 2d values of shared memory (`smem_acc`), or the
// partial buffer itself when they do not fit.
template <typename scalar_t, typename acc_t, bool kWarpRows>
__global__ void __launch_bounds__(kWarpRows ? kWarpRowThreads : kMaxThreads,
                                  kWarpRows ? kWarpRowMinBlocks : 1)
    backward_rows(SurgicalGateBackwardArgs<acc_t> a, int64_t block_rows, bool smem_acc,
                  acc_t* partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t scratch[2][2 * kWarp];
  const RowTeam<kWarpRows> team;
  const int64_t d = a.d;
  const int64_t r0 = int64_t(blockIdx.x) * block_rows;
  const int64_t r1 = min(a.N, r0 + block_rows);
  const auto* dz = static_cast<const scalar_t*>(a.dz);
  const auto* h = static_cast<const scalar_t*>(a.h);
  const auto* s = static_cast<const scalar_t*>(a.s);
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  auto* dh = static_cast<scalar_t*>(a.dh);
  auto* ds = static_cast<scalar_t*>(a.ds);
  auto* dlogits = static_cast<scalar_t*>(a.dlogits);
  acc_t* out = partial + int64_t(blockIdx.x) * 2 * d;
  smem_acc = kWarpRows || smem_acc;  // warp rows always fit
  acc_t* acc = smem_acc ? reinterpret_cast<acc_t*>(smem) + int64_t(team.slot) * 2 * d : out;
  for (int64_t j = team.lane; j < d; j += team.size) {
    acc[j] = acc_t(0);
    acc[d + j] = acc_t(0);
  }
  int parity = 0;
  for (int64_t i = r0 + team.slot; i < r1; i += team.slots) {
    const int64_t row = i * d;
    const scalar_t *dzr = dz + row, *hr = h + row, *sr = s + row, *lr = logits + row;
    const acc_t mean = a.mean[i], rstd = a.rstd[i];
    acc_t sums[2] = {acc_t(0), acc_t(0)};  // dxhat, dxhat xhat
    for (int64_t j = team.lane; j < d; j += team.size) {
      const Grad<acc_t> e = grad_at(dzr, hr, sr, lr, a.weight, j, mean, rstd);
      sums[0] += e.dxhat;
      sums[1] += e.dxhat * e.xhat;
      acc[j] += e.dz * e.xhat;  // owned by this thread: no race, row order
      acc[d + j] += e.dz;
    }
    row_sums<kWarpRows>(sums, scratch[parity]);
    parity ^= 1;
    const acc_t m1 = sums[0] / acc_t(d), m2 = sums[1] / acc_t(d);
    scalar_t *dhr = dh + row, *dsr = ds + row, *dlr = dlogits + row;
    for (int64_t j = team.lane; j < d; j += team.size) {
      const Grad<acc_t> e = grad_at(dzr, hr, sr, lr, a.weight, j, mean, rstd);
      const acc_t dv = rstd * (e.dxhat - m1 - e.xhat * m2);
      const acc_t g = e.b.g, one_minus_g = acc_t(1) - e.b.g;
      dhr[j] = from_acc<scalar_t>(dv * g);
      dsr[j] = from_acc<scalar_t>(dv * one_minus_g);
      dlr[j] = from_acc<scalar_t>(dv * e.b.hs * g * one_minus_g);
    }
  }
  if constexpr (kWarpRows) {
    __syncthreads();
    const acc_t* warps = reinterpret_cast<const acc_t*>(smem);
    for (int64_t j = threadIdx.x; j < 2 * d; j += blockDim.x) {
      acc_t total = acc_t(0);
#pragma unroll
      for (int k = 0; k < kRowWarps; ++k) total += warps[k * 2 * d + j];
      out[j] = total;
    }
  } else if (smem_acc) {
    for (int64_t j = team.lane; j < d; j += team.size) {  // this thread's own values
      out[j] = acc[j];
      out[d + j] = acc[d + j];
    }
  }
}

// dweight[j], dbias[j]: the row blocks' partials added in row-block order (0
// when there are none).
template <typename acc_t>
__global__ void sum_row_blocks(const acc_t* __restrict__ partial, int64_t nblocks, int64_t d,
                               acc_t* dweight, acc_t* dbias) {
  const int64_t j = int64_t(blockIdx.x) * kSumThreads + threadIdx.x;
  if (j >= 2 * d) return;
  acc_t total = acc_t(0);
  for (int64_t b = 0; b < nblocks; ++b) total += partial[b * 2 * d + j];
  if (j < d)
    dweight[j] = total;
  else
    dbias[j - d] = total;
}

// The backward's row blocks and workspace layout, shared by the size query
// and the launch. A function of (N, d) only.
template <typename acc_t>
struct BackwardPlan {
  using acc_type = acc_t;
  int64_t block_rows, nblocks;
  acc_t* partial;
  BackwardPlan(const SurgicalGateBackwardArgs<acc_t>& a, Workspace<acc_t>& ws) {
    const int64_t width = 2 * a.d;
    const int64_t per_block = std::max<int64_t>(1, width * int64_t(sizeof(acc_t)));
    const int64_t max_blocks = std::max<int64_t>(1, kPartialBudgetBytes / per_block);
    block_rows =
        std::max({kMinBlockRows, ceil_div(a.N, kTargetRowBlocks), ceil_div(a.N, max_blocks)});
    nblocks = a.N > 0 ? ceil_div(a.N, block_rows) : 0;
    partial = ws.take(nblocks * width);
  }
};

}  // namespace
}  // namespace cuda

using namespace cuda;

template <typename acc_t>
size_t cuda_workspace_bytes(const SurgicalGateForwardArgs<acc_t>&) {
  return 0;
}

template <typename acc_t>
size_t cuda_workspace_bytes(const SurgicalGateBackwardArgs<acc_t>& a) {
  if (a.N < 0 || a.d <= 0) return 0;
  Workspace<acc_t> ws{nullptr};
  const BackwardPlan<acc_t> plan(a, ws);
  return ws.used;
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind kind, const SurgicalGateForwardArgs<acc_t>& a, void*,
                        cudaStream_t stream) {
  if (a.N < 0 || a.d <= 0) return cudaErrorInvalidValue;
  return with_scalar<acc_t>(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.N == 0) return cudaSuccess;
    const int64_t d = a.d;
    if (warp_rows(d)) {
      const size_t smem = size_t(kRowWarps) * d * sizeof(acc_t);  // <= 16 KiB
      const int64_t grid = std::min(ceil_div(a.N, kRowWarps), kMaxRowGrid);
      forward_rows<scalar_t, acc_t, true>
          <<<unsigned(grid), kWarpRowThreads, smem, stream>>>(a, true);
    } else {
      const bool cache = d * int64_t(sizeof(acc_t)) <= kMaxDynamicSmem;
      const int64_t grid = std::min(a.N, kMaxRowGrid);
      forward_rows<scalar_t, acc_t, false>
          <<<unsigned(grid), row_threads(d), cache ? d * sizeof(acc_t) : 0, stream>>>(a, cache);
    }
    return cudaGetLastError();
  });
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind kind, const SurgicalGateBackwardArgs<acc_t>& a, void* workspace,
                        cudaStream_t stream) {
  if (a.N < 0 || a.d <= 0) return cudaErrorInvalidValue;
  Workspace<acc_t> ws{static_cast<char*>(workspace)};
  const BackwardPlan<acc_t> p(a, ws);
  if (p.nblocks > 0 && p.partial == nullptr) return cudaErrorInvalidValue;
  return with_scalar<acc_t>(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    const int64_t d = a.d;
    if (p.nblocks > 0) {
      if (warp_rows(d)) {
        const size_t smem = size_t(kRowWarps) * 2 * d * sizeof(acc_t);  // <= 32 KiB
        backward_rows<scalar_t, acc_t, true>
            <<<unsigned(p.nblocks), kWarpRowThreads, smem, stream>>>(a, p.block_rows, true,
                                                                     p.partial);
      } else {
        const bool smem_acc = 2 * d * int64_t(sizeof(acc_t)) <= kMaxDynamicSmem;
        backward_rows<scalar_t, acc_t, false>
            <<<unsigned(p.nblocks), row_threads(d), smem_acc ? 2 * d * sizeof(acc_t) : 0, stream>>>(
                a, p.block_rows, smem_acc, p.partial);
      }
    }
    // With N == 0 (no row blocks) this zero-fills dweight and dbias.
    sum_row_blocks<acc_t><<<unsigned(ceil_div(2 * d, kSumThreads)), kSumThreads, 0, stream>>>(
        p.partial, p.nblocks, d, a.dweight, a.dbias);
    return cudaGetLastError();
  });
}

#define SURGELLM_INSTANTIATE(T)                                                              \
  template size_t cuda_workspace_bytes<T>(const SurgicalGateForwardArgs<T>&);                \
  template cudaError_t cuda_launch<T>(ScalarKind, const SurgicalGateForwardArgs<T>&, void*,  \
                                      cudaStream_t);                                         \
  template size_t cuda_workspace_bytes<T>(const SurgicalGateBackwardArgs<T>&);               \
  template cudaError_t cuda_launch<T>(ScalarKind, const SurgicalGateBackwardArgs<T>&, void*, \
                                      cudaStream_t);
SURGELLM_INSTANTIATE(float)
SURGELLM_INSTANTIATE(double)
#undef SURGELLM_INSTANTIATE

}  // namespace surgellm
