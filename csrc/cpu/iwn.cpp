// fused_iwn on the CPU: u = x * sigmoid(gate), class-balanced statistics
// (SPEC §2, Eq.10-11), y = (u - mu) / (sigma + eps) * w + b; and its backward.
//
// Compiled once per CPU capability (CPU_CAPABILITY = DEFAULT / AVX2 / AVX512
// with matching -m flags, see setup.py and CMakeLists.txt): at::vec picks the
// vector width from those macros. at::parallel_for runs over fixed row chunks
// whose partials are merged in chunk order, so every result is bitwise the
// same for any thread count. u is never materialized beyond one row per thread.
#include "iwn.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../include/iwn_math.h"

#ifndef CPU_CAPABILITY
#error "compile iwn.cpp with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace surgellm {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Rows per reduction chunk: about N / 64, at least 128, and small enough
// (~1 MiB of data) for the second pass over a chunk to hit L2. Depends on the
// shape only, never on the thread count: that is what makes the chunked
// reductions deterministic.
inline int64_t rows_per_chunk(int64_t N, int64_t F) {
  const int64_t cache_rows = std::max<int64_t>(128, (int64_t(1) << 18) / F);
  return std::min(cache_rows, std::max<int64_t>(128, (N + 63) / 64));
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Grain of row-parallel elementwise passes: about 16K elements per task.
inline int64_t row_grain(int64_t F) { return std::max<int64_t>(1, 16384 / F); }
constexpr int64_t kFeatureGrain = 256;

template <typename acc_t>
void sigmoid_row(const acc_t* logits, acc_t* out, int64_t F) {
  using Vec = Vectorized<acc_t>;
  const Vec one(acc_t(1));
  int64_t f = 0;
  for (; f + Vec::size() <= F; f += Vec::size()) {
    (one / (one + Vec::loadu(logits + f).neg().exp())).store(out + f);
  }
  for (; f < F; ++f) out[f] = acc_t(1) / (acc_t(1) + std::exp(-logits[f]));
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

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, scalar_t* dst, int64_t F) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    if (src != dst) std::copy(src, src + F, dst);
  } else {
    at::vec::convert(src, dst, F);
  }
}

// Kernel scratch from c10's CPU allocator (not std::vector), so that memory
// profilers -- and the benchmarks' peak-memory column -- see it.
template <typename T>
struct Scratch {
  c10::DataPtr ptr;
  int64_t n;
  explicit Scratch(int64_t n_, bool zero = true)
      : ptr(c10::GetCPUAllocator()->allocate(std::max<int64_t>(n_, 1) * sizeof(T))), n(n_) {
    if (zero) std::fill(data(), data() + n, T(0));
  }
  T* data() const { return static_cast<T*>(ptr.get()); }
  T& operator[](int64_t i) const { return data()[i]; }
  bool empty() const { return n == 0; }
};

// One row of u = x * s, read a vector at a time: either x and the per-feature
// s = sigmoid(gate) multiplied on the fly (no buffer pass), or a row already
// materialized in a per-thread buffer (s == nullptr).
template <typename acc_t>
struct RowU {
  using Vec = Vectorized<acc_t>;
  const acc_t* x;
  const acc_t* s;
  Vec vec(int64_t f) const { return s ? Vec::loadu(x + f) * Vec::loadu(s + f) : Vec::loadu(x + f); }
  acc_t at(int64_t f) const { return s ? x[f] * s[f] : x[f]; }
};

// Rows of u = x * sigmoid(gate) in the accumulation type. float32/float64
// data with no gate or a (F,) gate is read in place; reduced-precision data
// and per-instance gates go through per-thread row buffers (never a
// full-size temporary).
template <typename scalar_t, typename acc_t>
struct GatedRows {
  const scalar_t* x;
  const scalar_t* gate_full;  // per-instance logits, or null
  const acc_t* gate_sig;      // per-feature sigmoid(gate), or null
  int64_t F;
  std::vector<acc_t> u_buf, sig_buf, logit_buf;

  GatedRows(const void* x_, const void* gate_full_, const acc_t* gate_sig_, int64_t F_)
      : x(static_cast<const scalar_t*>(x_)),
        gate_full(static_cast<const scalar_t*>(gate_full_)),
        gate_sig(gate_sig_), F(F_), u_buf(F_),
        sig_buf(gate_full_ ? F_ : 0), logit_buf(gate_full_ ? F_ : 0) {}

  // u of row i; sig() is then that row's sigmoid(gate) (null when ungated).
  RowU<acc_t> u(int64_t i) {
    const acc_t* xa = as_acc(x + i * F, u_buf.data(), F);
    if (!gate_full) return {xa, gate_sig};
    sigmoid_row(as_acc(gate_full + i * F, logit_buf.data(), F), sig_buf.data(), F);
    at::vec::map2([](Vectorized<acc_t> a, Vectorized<acc_t> b) { return a * b; },
                  u_buf.data(), xa, sig_buf.data(), F);
    return {u_buf.data(), nullptr};
  }
  const acc_t* sig() const { return gate_full ? sig_buf.data() : gate_sig; }
};

template <typename acc_t>
std::vector<acc_t> gate_sigmoid(const acc_t* logits, int64_t F) {
  std::vector<acc_t> sig;
  if (logits) {
    sig.resize(F);
    sigmoid_row(logits, sig.data(), F);
  }
  return sig;
}

inline int64_t key_of(const int32_t* keys, int64_t i) { return keys ? keys[i] : 0; }

// dst = u (one row).
template <typename acc_t>
inline void store_u(const RowU<acc_t>& u, acc_t* dst, int64_t F) {
  using Vec = Vectorized<acc_t>;
  int64_t f = 0;
  for (; f + Vec::size() <= F; f += Vec::size()) u.vec(f).store(dst + f);
  for (; f < F; ++f) dst[f] = u.at(f);
}

// d = u - shift; sum += d; sumsq += d * d (one row).
template <typename acc_t>
inline void add_shifted(const RowU<acc_t>& u, const acc_t* shift, acc_t* sum, acc_t* sumsq,
                        int64_t F) {
  using Vec = Vectorized<acc_t>;
  int64_t f = 0;
  for (; f + Vec::size() <= F; f += Vec::size()) {
    const Vec d = u.vec(f) - Vec::loadu(shift + f);
    (Vec::loadu(sum + f) + d).store(sum + f);
    at::vec::fmadd(d, d, Vec::loadu(sumsq + f)).store(sumsq + f);
  }
  for (; f < F; ++f) {
    const acc_t d = u.at(f) - shift[f];
    sum[f] += d;
    sumsq[f] += d * d;
  }
}

// (sum d, sum d^2) of n rows -> (mean, M2), in place.
template <typename acc_t>
inline void finish_shifted(const acc_t* shift, acc_t n, acc_t* sum_to_mean, acc_t* sumsq_to_m2,
                           int64_t F) {
  const acc_t inv = acc_t(1) / n;
  for (int64_t f = 0; f < F; ++f) {
    const acc_t d = sum_to_mean[f];
    const acc_t m2 = sumsq_to_m2[f] - d * d * inv;
    sum_to_mean[f] = shift[f] + d * inv;
    sumsq_to_m2[f] = m2 > acc_t(0) ? m2 : acc_t(0);
  }
}

// Chan merge of chunk summaries (n_b, mean_b, m2_b) into (n_a, mean, m2) for
// features [f0, f1); n_a is the count merged so far.
template <typename acc_t>
inline void chan_merge_row(acc_t n_a, acc_t n_b, acc_t* mean, acc_t* m2, const acc_t* mean_b,
                           const acc_t* m2_b, int64_t f0, int64_t f1) {
  using Vec = Vectorized<acc_t>;
  const acc_t frac = n_b / (n_a + n_b);
  const acc_t coef = n_a * frac;
  const Vec vfrac(frac), vcoef(coef);
  int64_t f = f0;
  for (; f + Vec::size() <= f1; f += Vec::size()) {
    const Vec ma = Vec::loadu(mean + f);
    const Vec delta = Vec::loadu(mean_b + f) - ma;
    at::vec::fmadd(delta, vfrac, ma).store(mean + f);
    const Vec m2v = Vec::loadu(m2 + f) + Vec::loadu(m2_b + f);
    at::vec::fmadd(delta * delta, vcoef, m2v).store(m2 + f);
  }
  for (; f < f1; ++f) {
    const acc_t delta = mean_b[f] - mean[f];
    mean[f] += delta * frac;
    m2[f] += m2_b[f] + delta * delta * coef;
  }
}

// Pass 1 of training: per-(task, class, feature) count, mean and M2 of u.
template <typename scalar_t, typename acc_t>
void group_moments(const IWNForwardArgs<acc_t>& a, const acc_t* gate_sig, acc_t* count,
                   acc_t* mean, acc_t* m2) {
  const int64_t N = a.N, F = a.F, K = a.num_tasks * a.num_classes;
  const int64_t chunk = rows_per_chunk(N, F), nchunks = ceil_div(N, chunk);
  Scratch<acc_t> pcount(nchunks * K), pmean(nchunks * K * F), pm2(nchunks * K * F);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.x, a.gate_full, gate_sig, F);
    std::vector<acc_t> shift(K * F);
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* cnt = pcount.data() + ch * K;
      acc_t* mn = pmean.data() + ch * K * F;
      acc_t* sq = pm2.data() + ch * K * F;
      // One pass over the chunk with shifted sums: d = u - shift_k, where
      // shift_k is the group's first row in the chunk, accumulating sum d and
      // sum d^2; then mean = shift + sum d / n, M2 = sum d^2 - (sum d)^2 / n.
      // The shift keeps the squares small (no cancellation when |mean| >> std)
      // and makes nearly-constant groups exact (d is exact for close values).
      const int64_t r0 = ch * chunk, r1 = std::min(N, (ch + 1) * chunk);
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t k = key_of(a.keys, i);
        const RowU<acc_t> u = rows.u(i);
        acc_t* sh = shift.data() + k * F;
        if (cnt[k] == acc_t(0)) store_u(u, sh, F);
        cnt[k] += acc_t(1);
        add_shifted(u, sh, mn + k * F, sq + k * F, F);
      }
      for (int64_t k = 0; k < K; ++k) {
        if (cnt[k] == acc_t(0)) continue;
        finish_shifted(shift.data() + k * F, cnt[k], mn + k * F, sq + k * F, F);
      }
    }
  });
  std::fill(count, count + K, acc_t(0));
  std::fill(mean, mean + K * F, acc_t(0));
  std::fill(m2, m2 + K * F, acc_t(0));
  at::parallel_for(0, F, kFeatureGrain, [&](int64_t f0, int64_t f1) {
    for (int64_t k = 0; k < K; ++k) {
      acc_t n = 0;
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const acc_t nb = pcount[ch * K + k];
        if (nb == acc_t(0)) continue;
        const int64_t off = (ch * K + k) * F;
        chan_merge_row(n, nb, mean + k * F, m2 + k * F, pmean.data() + off, pm2.data() + off, f0,
                       f1);
        n += nb;
      }
    }
  });
  for (int64_t ch = 0; ch < nchunks; ++ch)
    for (int64_t k = 0; k < K; ++k) count[k] += pcount[ch * K + k];
}

// y = (u - mu_t) * scale_t + bias, with scale_t = w / (sigma_t + eps).
template <typename scalar_t, typename acc_t>
void normalize_rows(const IWNForwardArgs<acc_t>& a, const acc_t* gate_sig, const acc_t* mu,
                    const acc_t* scale, int64_t key_div) {
  using Vec = Vectorized<acc_t>;
  const int64_t F = a.F;
  scalar_t* y = static_cast<scalar_t*>(a.y);
  at::parallel_for(0, a.N, row_grain(F), [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.x, a.gate_full, gate_sig, F);
    std::vector<acc_t> out_buf(std::is_same<scalar_t, acc_t>::value ? 0 : F);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = key_of(a.keys, i) / key_div;
      const RowU<acc_t> u = rows.u(i);
      const acc_t* m = mu + t * F;
      const acc_t* s = scale + t * F;
      acc_t* out = out_buf.empty() ? reinterpret_cast<acc_t*>(y + i * F) : out_buf.data();
      int64_t f = 0;
      if (a.bias) {
        for (; f + Vec::size() <= F; f += Vec::size())
          at::vec::fmadd(u.vec(f) - Vec::loadu(m + f), Vec::loadu(s + f),
                         Vec::loadu(a.bias + f)).store(out + f);
        for (; f < F; ++f) out[f] = (u.at(f) - m[f]) * s[f] + a.bias[f];
      } else {
        for (; f + Vec::size() <= F; f += Vec::size())
          ((u.vec(f) - Vec::loadu(m + f)) * Vec::loadu(s + f)).store(out + f);
        for (; f < F; ++f) out[f] = (u.at(f) - m[f]) * s[f];
      }
      if (!out_buf.empty()) store_row(out, y + i * F, F);
    }
  });
}

template <typename acc_t>
std::vector<acc_t> scale_table(const acc_t* sigma, const acc_t* weight, int64_t T, int64_t F,
                               acc_t eps) {
  std::vector<acc_t> scale(T * F);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < F; ++f)
      scale[t * F + f] = (weight ? weight[f] : acc_t(1)) / (sigma[t * F + f] + eps);
  return scale;
}

template <typename scalar_t>
void forward_impl(const IWNForwardArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t F = a.F, T = a.num_tasks, C = a.num_classes;
  const std::vector<acc_t> sig = gate_sigmoid(a.gate_vec, F);
  const acc_t* gate_sig = sig.empty() ? nullptr : sig.data();
  if (!a.training) {
    const std::vector<acc_t> scale = scale_table(a.std_in, a.weight, T, F, a.eps);
    normalize_rows<scalar_t>(a, gate_sig, a.mean_in, scale.data(), 1);
    return;
  }
  Scratch<acc_t> m2(T * C * F, false);
  group_moments<scalar_t>(a, gate_sig, a.group_count, a.group_mean, m2.data());
  at::parallel_for(0, F, kFeatureGrain, [&](int64_t f0, int64_t f1) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t f = f0; f < f1; ++f) {
        const int64_t base = t * C * F + f;
        combine_classes(C, a.group_count + t * C, a.group_mean + base, m2.data() + base, F,
                        a.pooled, a.group_std + base, a.mu + t * F + f, a.sigma + t * F + f);
      }
  });
  const std::vector<acc_t> scale = scale_table(a.sigma, a.weight, T, F, a.eps);
  normalize_rows<scalar_t>(a, gate_sig, a.mu, scale.data(), C);
}

template <typename scalar_t>
void backward_impl(const IWNBackwardArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.N, F = a.F, T = a.num_tasks, C = a.num_classes;
  const int64_t key_div = a.training ? C : 1;
  const int64_t chunk = rows_per_chunk(N, F), nchunks = ceil_div(N, chunk);
  const std::vector<acc_t> sig = gate_sigmoid(a.gate_vec, F);
  const acc_t* gate_sig = sig.empty() ? nullptr : sig.data();
  const scalar_t* dy = static_cast<const scalar_t*>(a.dy);

  // Pass 1: per task, s1 = sum dy and s2 = sum dy * (u - mu).
  Scratch<acc_t> ps(nchunks * 2 * T * F);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.x, a.gate_full, gate_sig, F);
    std::vector<acc_t> dy_buf(F);
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* s = ps.data() + ch * 2 * T * F;
      for (int64_t i = ch * chunk; i < std::min(N, (ch + 1) * chunk); ++i) {
        const int64_t t = key_of(a.keys, i) / key_div;
        const RowU<acc_t> u = rows.u(i);
        const acc_t* g = as_acc(dy + i * F, dy_buf.data(), F);
        const acc_t* m = a.mu + t * F;
        acc_t* s1 = s + t * F;
        acc_t* s2 = s + (T + t) * F;
        int64_t f = 0;
        for (; f + Vec::size() <= F; f += Vec::size()) {
          const Vec gv = Vec::loadu(g + f);
          (Vec::loadu(s1 + f) + gv).store(s1 + f);
          at::vec::fmadd(gv, u.vec(f) - Vec::loadu(m + f), Vec::loadu(s2 + f)).store(s2 + f);
        }
        for (; f < F; ++f) {
          s1[f] += g[f];
          s2[f] += g[f] * (u.at(f) - m[f]);
        }
      }
    }
  });
  std::vector<acc_t> sums(2 * T * F, 0);
  at::parallel_for(0, 2 * T * F, kFeatureGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t ch = 0; ch < nchunks; ++ch)
      for (int64_t j = j0; j < j1; ++j) sums[j] += ps[ch * 2 * T * F + j];
  });

  // Tiny combine: per (task, feature) coefficients of dL/du, and dw, db.
  const int64_t K = T * key_div;
  std::vector<acc_t> P(T * F), A(a.training ? K * F : 0), B(A.size()), center(A.size());
  std::vector<acc_t> dw_t(T * F), db_t(T * F), du_u(T * F);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < F; ++f) {
      const int64_t base = t * C * F + f;
      const bool tr = a.training;
      backward_coefficients(C, tr ? a.group_count + t * C : nullptr,
                            tr ? a.group_mean + base : nullptr, tr ? a.group_std + base : nullptr,
                            F, a.pooled, tr, a.mu[t * F + f], a.sigma[t * F + f],
                            a.weight ? a.weight[f] : acc_t(1), sums[t * F + f],
                            sums[(T + t) * F + f], a.eps, &P[t * F + f],
                            tr ? &A[base] : nullptr, tr ? &B[base] : nullptr,
                            tr ? &center[base] : nullptr, &dw_t[t * F + f], &db_t[t * F + f],
                            &du_u[t * F + f]);
    }
  for (int64_t f = 0; f < F; ++f) {
    acc_t dw = 0, db = 0;
    for (int64_t t = 0; t < T; ++t) {
      dw += dw_t[t * F + f];
      db += db_t[t * F + f];
    }
    a.dweight[f] = dw;
    a.dbias[f] = db;
  }

  // Pass 2: du = (dy - A_k) * P_t + B_k * (u - center_k); dx = du * sigmoid(gate);
  // dgate = du * u * (1 - sigmoid(gate)), reduced over rows for a (F,) gate.
  // One fused vector loop per row; outputs go straight to dx / dgate when the
  // data type is the accumulation type (else through a row buffer).
  constexpr bool direct = std::is_same<scalar_t, acc_t>::value;
  scalar_t* dx = static_cast<scalar_t*>(a.dx);
  scalar_t* dgate_full = static_cast<scalar_t*>(a.dgate_full);
  // A (F,) gate's gradient needs sum_i du_i u_i: in closed form in training
  // (see backward_coefficients), reduced over rows in eval.
  Scratch<acc_t> pgate(a.gate_vec && !a.training ? nchunks * F : 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.x, a.gate_full, gate_sig, F);
    std::vector<acc_t> dy_buf(F), dx_buf(direct ? 0 : F), dg_buf(direct ? 0 : F);
    const Vec one(acc_t(1));
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* pg = pgate.empty() ? nullptr : pgate.data() + ch * F;
      for (int64_t i = ch * chunk; i < std::min(N, (ch + 1) * chunk); ++i) {
        const int64_t k = key_of(a.keys, i);
        const RowU<acc_t> u = rows.u(i);
        const acc_t* s = rows.sig();
        const acc_t* g = as_acc(dy + i * F, dy_buf.data(), F);
        const acc_t* p = P.data() + (k / key_div) * F;
        const acc_t* av = a.training ? A.data() + k * F : nullptr;
        const acc_t* bv = a.training ? B.data() + k * F : nullptr;
        const acc_t* cv = a.training ? center.data() + k * F : nullptr;
        acc_t* dxr = direct ? reinterpret_cast<acc_t*>(dx + i * F) : dx_buf.data();
        acc_t* dgr = !dgate_full ? nullptr
                     : direct    ? reinterpret_cast<acc_t*>(dgate_full + i * F)
                                 : dg_buf.data();
        auto du_at = [&](int64_t f) {
          if (!av) return Vec::loadu(g + f) * Vec::loadu(p + f);
          const Vec du = (Vec::loadu(g + f) - Vec::loadu(av + f)) * Vec::loadu(p + f);
          return at::vec::fmadd(Vec::loadu(bv + f), u.vec(f) - Vec::loadu(cv + f), du);
        };
        int64_t f = 0;
        for (; f + Vec::size() <= F; f += Vec::size()) {
          const Vec du = du_at(f);
          if (!s) {
            du.store(dxr + f);
            continue;
          }
          const Vec sv = Vec::loadu(s + f);
          (du * sv).store(dxr + f);
          if (pg) {
            at::vec::fmadd(du, u.vec(f), Vec::loadu(pg + f)).store(pg + f);
          } else if (dgr) {
            (du * u.vec(f) * (one - sv)).store(dgr + f);
          }
        }
        for (; f < F; ++f) {
          const acc_t uf = u.at(f);
          acc_t du = av ? (g[f] - av[f]) * p[f] + bv[f] * (uf - cv[f]) : g[f] * p[f];
          if (!s) {
            dxr[f] = du;
            continue;
          }
          dxr[f] = du * s[f];
          if (pg)
            pg[f] += du * uf;
          else if (dgr)
            dgr[f] = du * uf * (acc_t(1) - s[f]);
        }
        if (!direct) {
          store_row(dxr, dx + i * F, F);
          if (dgr) store_row(dgr, dgate_full + i * F, F);
        }
      }
    }
  });
  if (a.gate_vec) {
    for (int64_t f = 0; f < F; ++f) {
      acc_t total = 0;
      if (a.training) {
        for (int64_t t = 0; t < T; ++t) total += du_u[t * F + f];
      } else {
        for (int64_t ch = 0; ch < nchunks; ++ch) total += pgate[ch * F + f];
      }
      a.dgate_vec[f] = total * (acc_t(1) - sig[f]);
    }
  }
}

}  // namespace

template <typename scalar_t>
void iwn_forward(const IWNForwardArgs<acc_type<scalar_t>>& args) {
  forward_impl<scalar_t>(args);
}

template <typename scalar_t>
void iwn_backward(const IWNBackwardArgs<acc_type<scalar_t>>& args) {
  backward_impl<scalar_t>(args);
}

#define SURGELLM_INSTANTIATE(T)                                            \
  template void iwn_forward<T>(const IWNForwardArgs<acc_type<T>>&);         \
  template void iwn_backward<T>(const IWNBackwardArgs<acc_type<T>>&);
SURGELLM_INSTANTIATE(float)
SURGELLM_INSTANTIATE(double)
SURGELLM_INSTANTIATE(c10::BFloat16)
SURGELLM_INSTANTIATE(c10::Half)
#undef SURGELLM_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace surgellm
