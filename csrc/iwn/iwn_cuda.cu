// The fused_iwn phases on CUDA: the CUDA C++ alternative to the Triton kernels.
//
// Same scheme as the CPU kernels: row chunks write partial statistics to a
// workspace (no atomics on floating point), merged in chunk order
// (deterministic); the per-(task, feature) steps share iwn_math.h with the
// CPU. One thread owns one feature column inside a (chunk, feature block)
// tile, so a warp reads 32 consecutive features of a row (coalesced).
// Keys are not range-checked on the host (that would be a host sync): a row
// whose key lies outside [0, num_keys) is skipped by every reduction and gets
// NaN outputs. No torch headers: iwn_kernels.cpp passes raw pointers, sizes
// and the stream.
#include "iwn/iwn_cuda.cuh"

#include "common/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "iwn/iwn_math.h"

namespace surgellm {
namespace cuda {
namespace {

constexpr int kThreads = 128;
// Partial buffers of a chunked reduction stay under this many bytes.
constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;

// Rows per chunk: about 256 chunks to fill the GPU, at least 32 rows, and
// few enough chunks that `width` partial values per chunk fit the budget.
// A function of the shapes only (never of the device), for determinism.
template <typename acc_t>
int64_t rows_per_chunk(int64_t N, int64_t width) {
  const int64_t per_chunk = std::max<int64_t>(1, width * int64_t(sizeof(acc_t)));
  const int64_t max_chunks = std::max<int64_t>(1, kPartialBudgetBytes / per_chunk);
  return std::max({int64_t(32), ceil_div(N, 256), ceil_div(N, max_chunks)});
}

template <typename acc_t>
__device__ __forceinline__ acc_t nan_value() {
  if constexpr (std::is_same<acc_t, double>::value)
    return __longlong_as_double(0x7ff8000000000000LL);
  else
    return __int_as_float(0x7fc00000);
}

// u = x * sigmoid(gate) at (i, f); s = the sigmoid (1 when ungated).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_u(const IWNRows<acc_t>& r, int64_t i, int64_t f, acc_t* s) {
  const auto* x = static_cast<const scalar_t*>(r.x);
  const auto* gate_full = static_cast<const scalar_t*>(r.gate_full);
  const acc_t xv = to_acc<acc_t>(x[i * r.F + f]);
  acc_t sv = acc_t(1);
  if (gate_full)
    sv = sigmoid(to_acc<acc_t>(gate_full[i * r.F + f]));
  else if (r.gate_vec)
    sv = sigmoid(r.gate_vec[f]);
  *s = sv;
  return xv * sv;
}

// Row i's key, or -1 when it lies outside [0, num_keys).
template <typename acc_t>
__device__ __forceinline__ int64_t key_at(const IWNRows<acc_t>& r, int64_t i, int64_t num_keys) {
  const int64_t k = r.keys ? r.keys[i] : 0;
  return k >= 0 && k < num_keys ? k : -1;
}

// Per (chunk, group, feature): mean, then M2 and the residual sum of the
// deviations (a second pass); per (chunk, group) the count.
template <typename scalar_t, typename acc_t>
__global__ void moments_partial(IWNMomentsArgs<acc_t> a, int64_t chunk_rows, acc_t* pcount,
                                acc_t* pmean, acc_t* pm2, acc_t* pres) {
  extern __shared__ int counts[];
  const int64_t N = a.rows.N, F = a.rows.F, G = a.num_groups;
  const int64_t ch = blockIdx.x;
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  const int64_t r0 = ch * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  for (int64_t k = threadIdx.x; k < G; k += blockDim.x) counts[k] = 0;
  __syncthreads();
  for (int64_t i = r0 + threadIdx.x; i < r1; i += blockDim.x) {
    const int64_t k = key_at(a.rows, i, G);
    if (k >= 0) atomicAdd(&counts[k], 1);
  }
  __syncthreads();  // integer counts: exact whatever the order
  if (blockIdx.y == 0)
    for (int64_t k = threadIdx.x; k < G; k += blockDim.x) pcount[ch * G + k] = acc_t(counts[k]);
  if (f >= F) return;
  acc_t* mean = pmean + ch * G * F;
  acc_t* m2 = pm2 + ch * G * F;
  acc_t* res = pres + ch * G * F;
  for (int64_t k = 0; k < G; ++k) {
    mean[k * F + f] = 0;
    m2[k * F + f] = 0;
    res[k * F + f] = 0;
  }
  acc_t s;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(a.rows, i, G);
    if (k >= 0) mean[k * F + f] += load_u<scalar_t>(a.rows, i, f, &s);
  }
  for (int64_t k = 0; k < G; ++k)
    if (counts[k] > 0) mean[k * F + f] /= acc_t(counts[k]);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(a.rows, i, G);
    if (k < 0) continue;
    const acc_t d = load_u<scalar_t>(a.rows, i, f, &s) - mean[k * F + f];
    m2[k * F + f] += d * d;
    res[k * F + f] += d;
  }
}

// The parts' summaries (row chunks, or ranks) of every group merged in part
// order: merge_parts_at of iwn_math.h, one thread per (group, feature).
template <typename acc_t>
__global__ void moments_merge(IWNMergeArgs<acc_t> a) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (f < a.F) merge_parts_at(a, int64_t(blockIdx.y), f);
}

template <typename acc_t>
__global__ void combine(IWNCombineArgs<acc_t> a) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (f < a.F) combine_at(a, int64_t(blockIdx.y), f);
}

// y = (u - mu_t) / (sigma_t + eps) * w + b, over (row block, feature block) tiles.
template <typename scalar_t, typename acc_t>
__global__ void apply(IWNApplyArgs<acc_t> a, int64_t chunk_rows) {
  const int64_t N = a.rows.N, F = a.rows.F;
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  const int64_t r0 = blockIdx.x * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  const acc_t w = a.weight ? a.weight[f] : acc_t(1);
  const acc_t b = a.bias ? a.bias[f] : acc_t(0);
  auto* y = static_cast<scalar_t*>(a.y);
  acc_t s;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(a.rows, i, a.num_tasks * a.key_div);
    acc_t v = nan_value<acc_t>();
    if (k >= 0) {
      const int64_t t = k / a.key_div;
      const acc_t u = load_u<scalar_t>(a.rows, i, f, &s);
      v = (u - a.mu[t * F + f]) / (a.sigma[t * F + f] + a.eps) * w + b;
    }
    y[i * F + f] = from_acc<scalar_t>(v);
  }
}

// Per (chunk, task): s1 = sum dy, s2 = sum dy (u - mu_t).
template <typename scalar_t, typename acc_t>
__global__ void task_sums_partial(IWNTaskSumsArgs<acc_t> a, int64_t chunk_rows, acc_t* ps) {
  const int64_t N = a.rows.N, F = a.rows.F, T = a.num_tasks;
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  const int64_t ch = blockIdx.x;
  const int64_t r0 = ch * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  acc_t* s = ps + ch * 2 * T * F;
  for (int64_t t = 0; t < 2 * T; ++t) s[t * F + f] = 0;
  acc_t sg;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(a.rows, i, T * a.key_div);
    if (k < 0) continue;
    const int64_t t = k / a.key_div;
    const acc_t g = to_acc<acc_t>(dy[i * F + f]);
    const acc_t u = load_u<scalar_t>(a.rows, i, f, &sg);
    s[t * F + f] += g;
    s[(T + t) * F + f] += g * (u - a.mu[t * F + f]);
  }
}

// Sums `width` partial values over chunks in chunk order.
template <typename acc_t>
__global__ void sum_chunks(const acc_t* partial, int64_t nchunks, int64_t width, acc_t* out) {
  const int64_t j = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (j >= width) return;
  acc_t total = 0;
  for (int64_t ch = 0; ch < nchunks; ++ch) total += partial[ch * width + j];
  out[j] = total;
}

template <typename acc_t>
__global__ void coefficients(IWNCoefficientsArgs<acc_t> a) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (f < a.F) coefficients_at(a, f);
}

// dx = du * s, dgate = du * u * (1 - s); du = (dy - dy_shift) scale + dev_coef (u - center).
template <typename scalar_t, typename acc_t>
__global__ void input_grad(IWNInputGradArgs<acc_t> a, int64_t chunk_rows, acc_t* pgate) {
  const int64_t N = a.rows.N, F = a.rows.F;
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  const int64_t ch = blockIdx.x;
  const int64_t r0 = ch * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  auto* dx = static_cast<scalar_t*>(a.dx);
  auto* dgate_full = static_cast<scalar_t*>(a.dgate_full);
  acc_t gate_sum = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(a.rows, i, a.num_tasks * a.key_div);
    if (k < 0) {
      dx[i * F + f] = from_acc<scalar_t>(nan_value<acc_t>());
      if (dgate_full) dgate_full[i * F + f] = from_acc<scalar_t>(nan_value<acc_t>());
      continue;
    }
    acc_t s;
    const acc_t u = load_u<scalar_t>(a.rows, i, f, &s);
    acc_t g = to_acc<acc_t>(dy[i * F + f]);
    if (a.training) g -= a.dy_shift[k * F + f];
    acc_t du = g * a.scale[(k / a.key_div) * F + f];
    if (a.training) du += a.dev_coef[k * F + f] * (u - a.center[k * F + f]);
    dx[i * F + f] = from_acc<scalar_t>(du * s);
    if (dgate_full) dgate_full[i * F + f] = from_acc<scalar_t>(du * u * (acc_t(1) - s));
    gate_sum += du * u;
  }
  if (pgate) pgate[ch * F + f] = gate_sum;
}

// d gate = (1 - s) sum_i du_i u_i: in training that sum is closed-form
// (du_dot_u, see coefficients_at); in eval it was reduced over chunks.
template <typename acc_t>
__global__ void vec_gate_grad(const acc_t* du_dot_u, int64_t F, const acc_t* gate_vec,
                              acc_t* dgate) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (f < F) dgate[f] = du_dot_u[f] * (acc_t(1) - sigmoid(gate_vec[f]));
}

// The launches' workspace layouts, shared by the size queries and the launches.
template <typename acc_t>
struct MomentsPlan {
  using acc_type = acc_t;
  int64_t chunk, nchunks;
  acc_t *pcount, *pmean, *pm2, *pres;
  MomentsPlan(const IWNMomentsArgs<acc_t>& a, Workspace<acc_t>& ws) {
    chunk = rows_per_chunk<acc_t>(a.rows.N, 3 * a.num_groups * a.rows.F);
    nchunks = ceil_div(a.rows.N, chunk);
    pcount = ws.take(nchunks * a.num_groups);
    pmean = ws.take(nchunks * a.num_groups * a.rows.F);
    pm2 = ws.take(nchunks * a.num_groups * a.rows.F);
    pres = ws.take(nchunks * a.num_groups * a.rows.F);
  }
};

template <typename acc_t>
struct TaskSumsPlan {
  using acc_type = acc_t;
  int64_t chunk, nchunks, width;
  acc_t* partial;
  TaskSumsPlan(const IWNTaskSumsArgs<acc_t>& a, Workspace<acc_t>& ws) {
    width = 2 * a.num_tasks * a.rows.F;
    chunk = rows_per_chunk<acc_t>(a.rows.N, width);
    nchunks = ceil_div(a.rows.N, chunk);
    partial = ws.take(nchunks * width);
  }
};

template <typename acc_t>
struct InputGradPlan {
  using acc_type = acc_t;
  int64_t chunk, nchunks;
  acc_t *pgate, *gate_sum;
  InputGradPlan(const IWNInputGradArgs<acc_t>& a, Workspace<acc_t>& ws) {
    chunk = rows_per_chunk<acc_t>(a.rows.N, a.rows.F);
    nchunks = ceil_div(a.rows.N, chunk);
    const bool reduce = a.rows.gate_vec && !a.training;
    pgate = ws.take(reduce ? nchunks * a.rows.F : 0);
    gate_sum = ws.take(reduce ? a.rows.F : 0);
  }
};

// F <= kMaxFeatures (iwn_kernels.cpp's check): ceil(F / 128) blocks fit grid.y.
static_assert(kThreads == 128, "kMaxFeatures counts blocks of 128 features");
dim3 row_tiles(int64_t nchunks, int64_t F) { return dim3(nchunks, ceil_div(F, kThreads)); }

template <typename acc_t>
void launch_merge(const IWNMergeArgs<acc_t>& a, cudaStream_t stream) {
  moments_merge<acc_t><<<dim3(ceil_div(a.F, kThreads), a.num_groups), kThreads, 0, stream>>>(a);
}

// Workspace sizes: the launch's plan laid out over no memory.
template <typename Plan, typename Args>
size_t plan_bytes(const Args& a) {
  Workspace<typename Plan::acc_type> ws{nullptr};
  const Plan plan(a, ws);
  return ws.used;
}

}  // namespace
}  // namespace cuda

using namespace cuda;

template <typename acc_t>
size_t cuda_workspace_bytes(const IWNMomentsArgs<acc_t>& a) {
  return plan_bytes<MomentsPlan<acc_t>>(a);
}
template <typename acc_t>
size_t cuda_workspace_bytes(const IWNTaskSumsArgs<acc_t>& a) {
  return plan_bytes<TaskSumsPlan<acc_t>>(a);
}
template <typename acc_t>
size_t cuda_workspace_bytes(const IWNInputGradArgs<acc_t>& a) {
  return plan_bytes<InputGradPlan<acc_t>>(a);
}
template <typename acc_t>
size_t cuda_workspace_bytes(const IWNMergeArgs<acc_t>&) {
  return 0;
}
template <typename acc_t>
size_t cuda_workspace_bytes(const IWNCombineArgs<acc_t>&) {
  return 0;
}
template <typename acc_t>
size_t cuda_workspace_bytes(const IWNApplyArgs<acc_t>&) {
  return 0;
}
template <typename acc_t>
size_t cuda_workspace_bytes(const IWNCoefficientsArgs<acc_t>&) {
  return 0;
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind kind, const IWNMomentsArgs<acc_t>& a, void* workspace,
                        cudaStream_t stream) {
  if (a.num_groups > kMaxGroups) return cudaErrorInvalidValue;
  Workspace<acc_t> ws{static_cast<char*>(workspace)};
  const MomentsPlan<acc_t> p(a, ws);
  return with_scalar<acc_t>(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    moments_partial<scalar_t, acc_t>
        <<<row_tiles(p.nchunks, a.rows.F), kThreads, a.num_groups * sizeof(int), stream>>>(
            a, p.chunk, p.pcount, p.pmean, p.pm2, p.pres);
    launch_merge(IWNMergeArgs<acc_t>{p.pcount, p.pmean, p.pm2, p.pres, p.nchunks, a.num_groups,
                                     a.rows.F, a.count, a.mean, a.m2, a.mean_residual},
                 stream);
    return cudaGetLastError();
  });
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind, const IWNMergeArgs<acc_t>& a, void*, cudaStream_t stream) {
  if (a.num_groups > kMaxGroups) return cudaErrorInvalidValue;
  launch_merge(a, stream);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind, const IWNCombineArgs<acc_t>& a, void*, cudaStream_t stream) {
  if (a.num_tasks > kMaxTasks) return cudaErrorInvalidValue;
  combine<acc_t><<<dim3(ceil_div(a.F, kThreads), a.num_tasks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind kind, const IWNApplyArgs<acc_t>& a, void*, cudaStream_t stream) {
  const int64_t chunk = rows_per_chunk<acc_t>(a.rows.N, 0);
  return with_scalar<acc_t>(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    apply<scalar_t, acc_t>
        <<<row_tiles(ceil_div(a.rows.N, chunk), a.rows.F), kThreads, 0, stream>>>(a, chunk);
    return cudaGetLastError();
  });
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind kind, const IWNTaskSumsArgs<acc_t>& a, void* workspace,
                        cudaStream_t stream) {
  Workspace<acc_t> ws{static_cast<char*>(workspace)};
  const TaskSumsPlan<acc_t> p(a, ws);
  return with_scalar<acc_t>(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    task_sums_partial<scalar_t, acc_t>
        <<<row_tiles(p.nchunks, a.rows.F), kThreads, 0, stream>>>(a, p.chunk, p.partial);
    sum_chunks<acc_t><<<ceil_div(p.width, kThreads), kThreads, 0, stream>>>(p.partial, p.nchunks,
                                                                            p.width, a.sums);
    return cudaGetLastError();
  });
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind, const IWNCoefficientsArgs<acc_t>& a, void*,
                        cudaStream_t stream) {
  coefficients<acc_t><<<ceil_div(a.F, kThreads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t cuda_launch(ScalarKind kind, const IWNInputGradArgs<acc_t>& a, void* workspace,
                        cudaStream_t stream) {
  Workspace<acc_t> ws{static_cast<char*>(workspace)};
  const InputGradPlan<acc_t> p(a, ws);
  const int64_t F = a.rows.F;
  return with_scalar<acc_t>(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    const bool reduce = a.rows.gate_vec && !a.training;
    input_grad<scalar_t, acc_t>
        <<<row_tiles(p.nchunks, F), kThreads, 0, stream>>>(a, p.chunk, reduce ? p.pgate : nullptr);
    if (a.rows.gate_vec) {
      const acc_t* total = a.du_dot_u;
      if (reduce) {
        sum_chunks<acc_t>
            <<<ceil_div(F, kThreads), kThreads, 0, stream>>>(p.pgate, p.nchunks, F, p.gate_sum);
        total = p.gate_sum;
      }
      vec_gate_grad<acc_t>
          <<<ceil_div(F, kThreads), kThreads, 0, stream>>>(total, F, a.rows.gate_vec, a.dgate_vec);
    }
    return cudaGetLastError();
  });
}

#define SURGELLM_INSTANTIATE_PHASE(ARGS, T)                \
  template size_t cuda_workspace_bytes<T>(const ARGS<T>&); \
  template cudaError_t cuda_launch<T>(ScalarKind, const ARGS<T>&, void*, cudaStream_t);
#define SURGELLM_INSTANTIATE(T)                      \
  SURGELLM_INSTANTIATE_PHASE(IWNMomentsArgs, T)      \
  SURGELLM_INSTANTIATE_PHASE(IWNMergeArgs, T)        \
  SURGELLM_INSTANTIATE_PHASE(IWNCombineArgs, T)      \
  SURGELLM_INSTANTIATE_PHASE(IWNApplyArgs, T)        \
  SURGELLM_INSTANTIATE_PHASE(IWNTaskSumsArgs, T)     \
  SURGELLM_INSTANTIATE_PHASE(IWNCoefficientsArgs, T) \
  SURGELLM_INSTANTIATE_PHASE(IWNInputGradArgs, T)
SURGELLM_INSTANTIATE(float)
SURGELLM_INSTANTIATE(double)
#undef SURGELLM_INSTANTIATE_PHASE
#undef SURGELLM_INSTANTIATE

}  // namespace surgellm
