// fused_iwn on CUDA (SPEC §2): the CUDA C++ fallback of the Triton kernels.
//
// Same two-phase scheme as the CPU and Triton kernels: row chunks write
// partial statistics to a workspace (no atomics on floating point), a tiny
// combine merges them in chunk order (deterministic), then an elementwise
// pass. One thread owns one feature column inside a (chunk, feature block)
// tile, so a warp reads 32 consecutive features of a row (coalesced).
// No torch headers: bindings.cpp passes raw pointers, sizes and the stream.
#include "iwn.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../include/iwn_math.h"

namespace surgellm {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGroups = 12288;  // shared-memory counters of one chunk

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Rows per chunk: enough chunks to fill the GPU, a fixed function of N only.
inline int64_t rows_per_chunk(int64_t N) { return ceil_div(N, 256) > 32 ? ceil_div(N, 256) : 32; }
inline int64_t num_chunks(int64_t N) { return ceil_div(N, rows_per_chunk(N)); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + exp(-v));
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// u = x * sigmoid(gate) at (i, f); s = the sigmoid (1 when ungated).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_u(const scalar_t* x, const scalar_t* gate_full,
                                        const acc_t* gate_vec, int64_t i, int64_t f, int64_t F,
                                        acc_t* s) {
  const acc_t xv = to_acc<acc_t>(x[i * F + f]);
  acc_t sv = acc_t(1);
  if (gate_full) sv = sigmoid(to_acc<acc_t>(gate_full[i * F + f]));
  else if (gate_vec) sv = sigmoid(gate_vec[f]);
  *s = sv;
  return xv * sv;
}

__device__ __forceinline__ int64_t key_at(const int32_t* keys, int64_t i) {
  return keys ? keys[i] : 0;
}

// Per (chunk, group, feature): count, mean and M2 (sum, then deviations).
template <typename scalar_t, typename acc_t>
__global__ void moments_partial(const scalar_t* x, const scalar_t* gate_full,
                                const acc_t* gate_vec, const int32_t* keys, int64_t N, int64_t F,
                                int64_t K, int64_t chunk_rows, acc_t* pcount, acc_t* pmean,
                                acc_t* pm2) {
  extern __shared__ int counts[];
  const int64_t ch = blockIdx.x;
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  const int64_t r0 = ch * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) counts[k] = 0;
  __syncthreads();
  for (int64_t i = r0 + threadIdx.x; i < r1; i += blockDim.x) atomicAdd(&counts[key_at(keys, i)], 1);
  __syncthreads();  // integer counts: exact whatever the order
  if (blockIdx.y == 0)
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) pcount[ch * K + k] = acc_t(counts[k]);
  if (f >= F) return;
  acc_t* mean = pmean + ch * K * F;
  acc_t* m2 = pm2 + ch * K * F;
  for (int64_t k = 0; k < K; ++k) {
    mean[k * F + f] = 0;
    m2[k * F + f] = 0;
  }
  acc_t s;
  for (int64_t i = r0; i < r1; ++i)
    mean[key_at(keys, i) * F + f] += load_u(x, gate_full, gate_vec, i, f, F, &s);
  for (int64_t k = 0; k < K; ++k)
    if (counts[k] > 0) mean[k * F + f] /= acc_t(counts[k]);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(keys, i);
    const acc_t d = load_u(x, gate_full, gate_vec, i, f, F, &s) - mean[k * F + f];
    m2[k * F + f] += d * d;
  }
}

template <typename acc_t>
__global__ void merge_counts(const acc_t* pcount, int64_t nchunks, int64_t K, acc_t* count) {
  for (int64_t k = blockIdx.x * blockDim.x + threadIdx.x; k < K; k += gridDim.x * blockDim.x) {
    acc_t n = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) n += pcount[ch * K + k];
    count[k] = n;
  }
}

// Chan-merge the chunks of every class of task blockIdx.y, then Eq.10-11.
template <typename acc_t>
__global__ void combine(const acc_t* pcount, const acc_t* pmean, const acc_t* pm2,
                        int64_t nchunks, int64_t F, int64_t C, bool pooled,
                        const acc_t* group_count, acc_t* group_mean, acc_t* group_m2,
                        acc_t* group_std, acc_t* mu, acc_t* sigma) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const int64_t t = blockIdx.y;
  const int64_t K = int64_t(gridDim.y) * C;
  if (f >= F) return;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t k = t * C + c;
    acc_t n = 0, mean = 0, m2 = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t off = (ch * K + k) * F + f;
      chan_merge(n, mean, m2, pcount[ch * K + k], pmean[off], pm2[off]);
    }
    group_mean[k * F + f] = mean;
    group_m2[k * F + f] = m2;
  }
  const int64_t base = t * C * F + f;
  combine_classes(C, group_count + t * C, group_mean + base, group_m2 + base, F, pooled,
                  group_std + base, mu + t * F + f, sigma + t * F + f);
}

// y = (u - mu_t) / (sigma_t + eps) * w + b, over (chunk, feature block) tiles.
template <typename scalar_t, typename acc_t>
__global__ void normalize(const scalar_t* x, const scalar_t* gate_full, const acc_t* gate_vec,
                          const int32_t* keys, int64_t N, int64_t F, int64_t key_div,
                          int64_t chunk_rows, const acc_t* mu, const acc_t* sigma,
                          const acc_t* weight, const acc_t* bias, acc_t eps, scalar_t* y) {
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  const int64_t r0 = blockIdx.x * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  const acc_t w = weight ? weight[f] : acc_t(1);
  const acc_t b = bias ? bias[f] : acc_t(0);
  acc_t s;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t t = key_at(keys, i) / key_div;
    const acc_t u = load_u(x, gate_full, gate_vec, i, f, F, &s);
    const acc_t v = (u - mu[t * F + f]) / (sigma[t * F + f] + eps) * w + b;
    y[i * F + f] = static_cast<scalar_t>(v);
  }
}

// Per (chunk, task): s1 = sum dy, s2 = sum dy (u - mu_t).
template <typename scalar_t, typename acc_t>
__global__ void task_sums_partial(const scalar_t* dy, const scalar_t* x, const scalar_t* gate_full,
                                  const acc_t* gate_vec, const int32_t* keys, int64_t N, int64_t F,
                                  int64_t T, int64_t key_div, int64_t chunk_rows, const acc_t* mu,
                                  acc_t* ps) {
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  const int64_t ch = blockIdx.x;
  const int64_t r0 = ch * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  acc_t* s = ps + ch * 2 * T * F;
  for (int64_t t = 0; t < 2 * T; ++t) s[t * F + f] = 0;
  acc_t sg;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t t = key_at(keys, i) / key_div;
    const acc_t g = to_acc<acc_t>(dy[i * F + f]);
    const acc_t u = load_u(x, gate_full, gate_vec, i, f, F, &sg);
    s[t * F + f] += g;
    s[(T + t) * F + f] += g * (u - mu[t * F + f]);
  }
}

template <typename acc_t>
__global__ void coefficients(const acc_t* ps, int64_t nchunks, int64_t F, int64_t T, int64_t C,
                             bool training, bool pooled, acc_t eps, const acc_t* weight,
                             const acc_t* group_count, const acc_t* group_mean,
                             const acc_t* group_std, const acc_t* mu, const acc_t* sigma, acc_t* P,
                             acc_t* A, acc_t* B, acc_t* center, acc_t* dweight, acc_t* dbias,
                             acc_t* du_dot_u) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  acc_t dw = 0, db = 0, du_u = 0;
  for (int64_t t = 0; t < T; ++t) {
    acc_t s1 = 0, s2 = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      s1 += ps[(ch * 2 * T + t) * F + f];
      s2 += ps[(ch * 2 * T + T + t) * F + f];
    }
    const int64_t base = t * C * F + f;
    acc_t dw_t, db_t, du_u_t;
    backward_coefficients(C, training ? group_count + t * C : nullptr,
                          training ? group_mean + base : nullptr,
                          training ? group_std + base : nullptr, F, pooled, training,
                          mu[t * F + f], sigma[t * F + f], weight ? weight[f] : acc_t(1), s1, s2,
                          eps, P + t * F + f, training ? A + base : nullptr,
                          training ? B + base : nullptr, training ? center + base : nullptr, &dw_t,
                          &db_t, &du_u_t);
    dw += dw_t;
    db += db_t;
    du_u += du_u_t;
  }
  dweight[f] = dw;
  dbias[f] = db;
  if (du_dot_u) du_dot_u[f] = du_u;
}

// dx = du * s, dgate = du * u * (1 - s); du = (dy - A) P + B (u - center).
template <typename scalar_t, typename acc_t>
__global__ void input_grad(const scalar_t* dy, const scalar_t* x, const scalar_t* gate_full,
                           const acc_t* gate_vec, const int32_t* keys, int64_t N, int64_t F,
                           int64_t key_div, int64_t chunk_rows, bool training, const acc_t* P,
                           const acc_t* A, const acc_t* B, const acc_t* center, scalar_t* dx,
                           scalar_t* dgate_full, acc_t* pgate) {
  const int64_t f = blockIdx.y * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  const int64_t ch = blockIdx.x;
  const int64_t r0 = ch * chunk_rows;
  const int64_t r1 = min(N, r0 + chunk_rows);
  acc_t gate_sum = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t k = key_at(keys, i);
    acc_t s;
    const acc_t u = load_u(x, gate_full, gate_vec, i, f, F, &s);
    acc_t g = to_acc<acc_t>(dy[i * F + f]);
    if (training) g -= A[k * F + f];
    acc_t du = g * P[(k / key_div) * F + f];
    if (training) du += B[k * F + f] * (u - center[k * F + f]);
    dx[i * F + f] = static_cast<scalar_t>(du * s);
    if (gate_full) dgate_full[i * F + f] = static_cast<scalar_t>(du * u * (acc_t(1) - s));
    gate_sum += du * u;
  }
  if (pgate) pgate[ch * F + f] = gate_sum;
}

// d gate = (1 - s) sum_i du_i u_i: in training that sum is closed-form
// (du_dot_u, see backward_coefficients); in eval it is reduced over chunks.
template <typename acc_t>
__global__ void gate_grad(const acc_t* pgate, const acc_t* du_dot_u, int64_t nchunks, int64_t F,
                          const acc_t* gate_vec, acc_t* dgate) {
  const int64_t f = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (f >= F) return;
  acc_t total = 0;
  if (du_dot_u) {
    total = du_dot_u[f];
  } else {
    for (int64_t ch = 0; ch < nchunks; ++ch) total += pgate[ch * F + f];
  }
  dgate[f] = total * (acc_t(1) - sigmoid(gate_vec[f]));
}

// Carves typed slices out of the byte workspace.
template <typename acc_t>
struct Workspace {
  char* base;
  size_t used = 0;
  acc_t* take(int64_t n) {
    acc_t* p = base ? reinterpret_cast<acc_t*>(base + used) : nullptr;
    used += ((n * sizeof(acc_t) + 255) / 256) * 256;
    return p;
  }
};

template <typename acc_t>
void forward_workspace(const IWNForwardArgs<acc_t>& a, Workspace<acc_t>& ws, acc_t** pcount,
                       acc_t** pmean, acc_t** pm2, acc_t** m2) {
  const int64_t K = a.training ? a.num_tasks * a.num_classes : 0;
  const int64_t nc = num_chunks(a.N);
  *pcount = ws.take(nc * K);
  *pmean = ws.take(nc * K * a.F);
  *pm2 = ws.take(nc * K * a.F);
  *m2 = ws.take(K * a.F);
}

template <typename acc_t>
void backward_workspace(const IWNBackwardArgs<acc_t>& a, Workspace<acc_t>& ws, acc_t** ps,
                        acc_t** P, acc_t** A, acc_t** B, acc_t** center, acc_t** pgate,
                        acc_t** du_dot_u) {
  const int64_t K = a.training ? a.num_tasks * a.num_classes : 0;
  const int64_t nc = num_chunks(a.N);
  *ps = ws.take(nc * 2 * a.num_tasks * a.F);
  *P = ws.take(a.num_tasks * a.F);
  *A = ws.take(K * a.F);
  *B = ws.take(K * a.F);
  *center = ws.take(K * a.F);
  *pgate = ws.take(nc * a.F);
  *du_dot_u = ws.take(a.F);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const IWNForwardArgs<acc_t>& a, void* workspace, cudaStream_t stream) {
  const int64_t N = a.N, F = a.F, T = a.num_tasks, C = a.num_classes;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* gate_full = static_cast<const scalar_t*>(a.gate_full);
  const int64_t chunk = rows_per_chunk(N), nc = num_chunks(N);
  const dim3 tiles(nc, ceil_div(F, kThreads));
  const acc_t* mu = a.mean_in;
  const acc_t* sigma = a.std_in;
  if (a.training) {
    const int64_t K = T * C;
    if (K > kMaxGroups) return cudaErrorInvalidValue;
    Workspace<acc_t> ws{static_cast<char*>(workspace)};
    acc_t *pcount, *pmean, *pm2, *m2;
    forward_workspace(a, ws, &pcount, &pmean, &pm2, &m2);
    moments_partial<scalar_t, acc_t><<<tiles, kThreads, K * sizeof(int), stream>>>(
        x, gate_full, a.gate_vec, a.keys, N, F, K, chunk, pcount, pmean, pm2);
    merge_counts<acc_t><<<ceil_div(K, kThreads), kThreads, 0, stream>>>(pcount, nc, K,
                                                                        a.group_count);
    combine<acc_t><<<dim3(ceil_div(F, kThreads), T), kThreads, 0, stream>>>(
        pcount, pmean, pm2, nc, F, C, a.pooled, a.group_count, a.group_mean, m2, a.group_std,
        a.mu, a.sigma);
    mu = a.mu;
    sigma = a.sigma;
  }
  normalize<scalar_t, acc_t><<<tiles, kThreads, 0, stream>>>(
      x, gate_full, a.gate_vec, a.keys, N, F, a.training ? C : 1, chunk, mu, sigma, a.weight,
      a.bias, a.eps, static_cast<scalar_t*>(a.y));
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const IWNBackwardArgs<acc_t>& a, void* workspace,
                            cudaStream_t stream) {
  const int64_t N = a.N, F = a.F, T = a.num_tasks, C = a.num_classes;
  const int64_t key_div = a.training ? C : 1;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  const auto* gate_full = static_cast<const scalar_t*>(a.gate_full);
  const int64_t chunk = rows_per_chunk(N), nc = num_chunks(N);
  const dim3 tiles(nc, ceil_div(F, kThreads));
  const int64_t fblocks = ceil_div(F, kThreads);
  Workspace<acc_t> ws{static_cast<char*>(workspace)};
  acc_t *ps, *P, *A, *B, *center, *pgate, *du_dot_u;
  backward_workspace(a, ws, &ps, &P, &A, &B, &center, &pgate, &du_dot_u);
  task_sums_partial<scalar_t, acc_t><<<tiles, kThreads, 0, stream>>>(
      dy, x, gate_full, a.gate_vec, a.keys, N, F, T, key_div, chunk, a.mu, ps);
  coefficients<acc_t><<<fblocks, kThreads, 0, stream>>>(
      ps, nc, F, T, C, a.training, a.pooled, a.eps, a.weight, a.group_count, a.group_mean,
      a.group_std, a.mu, a.sigma, P, A, B, center, a.dweight, a.dbias, du_dot_u);
  input_grad<scalar_t, acc_t><<<tiles, kThreads, 0, stream>>>(
      dy, x, gate_full, a.gate_vec, a.keys, N, F, key_div, chunk, a.training, P, A, B, center,
      static_cast<scalar_t*>(a.dx), static_cast<scalar_t*>(a.dgate_full),
      a.gate_vec && !a.training ? pgate : nullptr);
  if (a.gate_vec)
    gate_grad<acc_t><<<fblocks, kThreads, 0, stream>>>(
        pgate, a.training ? du_dot_u : nullptr, nc, F, a.gate_vec, a.dgate_vec);
  return cudaGetLastError();
}

}  // namespace

template <typename acc_t>
size_t iwn_forward_workspace_bytes(const IWNForwardArgs<acc_t>& args) {
  Workspace<acc_t> ws{nullptr};
  acc_t *a, *b, *c, *d;
  forward_workspace(args, ws, &a, &b, &c, &d);
  return ws.used > 0 ? ws.used : 1;
}

template <typename acc_t>
size_t iwn_backward_workspace_bytes(const IWNBackwardArgs<acc_t>& args) {
  Workspace<acc_t> ws{nullptr};
  acc_t *a, *b, *c, *d, *e, *f, *g;
  backward_workspace(args, ws, &a, &b, &c, &d, &e, &f, &g);
  return ws.used > 0 ? ws.used : 1;
}

template <typename acc_t>
cudaError_t iwn_forward(ScalarKind kind, const IWNForwardArgs<acc_t>& args, void* workspace,
                        cudaStream_t stream) {
  if constexpr (std::is_same<acc_t, double>::value) {
    return kind == ScalarKind::Float64 ? launch_forward<double, double>(args, workspace, stream)
                                       : cudaErrorInvalidValue;
  } else {
    switch (kind) {
      case ScalarKind::Float32: return launch_forward<float, float>(args, workspace, stream);
      case ScalarKind::Float16: return launch_forward<__half, float>(args, workspace, stream);
      case ScalarKind::BFloat16:
        return launch_forward<__nv_bfloat16, float>(args, workspace, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

template <typename acc_t>
cudaError_t iwn_backward(ScalarKind kind, const IWNBackwardArgs<acc_t>& args, void* workspace,
                         cudaStream_t stream) {
  if constexpr (std::is_same<acc_t, double>::value) {
    return kind == ScalarKind::Float64 ? launch_backward<double, double>(args, workspace, stream)
                                       : cudaErrorInvalidValue;
  } else {
    switch (kind) {
      case ScalarKind::Float32: return launch_backward<float, float>(args, workspace, stream);
      case ScalarKind::Float16: return launch_backward<__half, float>(args, workspace, stream);
      case ScalarKind::BFloat16:
        return launch_backward<__nv_bfloat16, float>(args, workspace, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

template size_t iwn_forward_workspace_bytes<float>(const IWNForwardArgs<float>&);
template size_t iwn_forward_workspace_bytes<double>(const IWNForwardArgs<double>&);
template size_t iwn_backward_workspace_bytes<float>(const IWNBackwardArgs<float>&);
template size_t iwn_backward_workspace_bytes<double>(const IWNBackwardArgs<double>&);
template cudaError_t iwn_forward<float>(ScalarKind, const IWNForwardArgs<float>&, void*,
                                        cudaStream_t);
template cudaError_t iwn_forward<double>(ScalarKind, const IWNForwardArgs<double>&, void*,
                                         cudaStream_t);
template cudaError_t iwn_backward<float>(ScalarKind, const IWNBackwardArgs<float>&, void*,
                                         cudaStream_t);
template cudaError_t iwn_backward<double>(ScalarKind, const IWNBackwardArgs<double>&, void*,
                                          cudaStream_t);

}  // namespace cuda
}  // namespace surgellm
