// Arithmetic of fused_iwn shared by the CPU (C++) and CUDA kernels.
//
// Everything here works on one feature column at a time and is host/device
// inline, so both backends compute the tiny combine steps with the same code.
// Notation (SPEC §2): per (task t, class c): n_c rows, mean m_c, M2_c = sum of
// squared deviations, s_c = sqrt(M2_c / n_c); C' = classes present in task t.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SURGELLM_HD __host__ __device__ __forceinline__
#else
#define SURGELLM_HD inline
#endif

namespace surgellm {

// Chan et al.'s pairwise merge of two (count, mean, M2) summaries. Merging in
// a fixed order makes the result independent of how work was scheduled.
template <typename T>
SURGELLM_HD void chan_merge(T& n, T& mean, T& m2, T n_b, T mean_b, T m2_b) {
  if (n_b == T(0)) return;
  const T total = n + n_b;
  const T frac = n_b / total;
  const T delta = mean_b - mean;
  mean += delta * frac;
  m2 += m2_b + delta * delta * n * frac;
  n = total;
}

// Eq.10-11 for one task and one feature: mu = mean_c m_c and
// sigma = mean_c s_c ("class_mean") or sqrt(mean_c (s_c^2 + (m_c - mu)^2))
// ("pooled"), over the classes present. Class c's values sit at index
// c * stride of mean / m2 / group_std. Writes s_c into group_std. A task with
// no rows gets mu = sigma = 0 (no row reads them). Returns C'.
template <typename T>
SURGELLM_HD int64_t combine_classes(int64_t num_classes, const T* count, const T* mean,
                                    const T* m2, int64_t stride, bool pooled, T* group_std,
                                    T* mu_out, T* sigma_out) {
  int64_t present = 0;
  T sum_mean = 0, sum_std = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    T sd = 0;
    if (count[c] > T(0)) {
      const T var = m2[c * stride] / count[c];
      sd = var > T(0) ? std::sqrt(var) : T(0);
      sum_mean += mean[c * stride];
      sum_std += sd;
      ++present;
    }
    group_std[c * stride] = sd;
  }
  if (present == 0) {
    *mu_out = T(0);
    *sigma_out = T(0);
    return 0;
  }
  const T mu = sum_mean / T(present);
  T sigma = sum_std / T(present);
  if (pooled) {
    T spread = 0;
    for (int64_t c = 0; c < num_classes; ++c) {
      if (count[c] > T(0)) {
        const T d = mean[c * stride] - mu;
        const T sd = group_std[c * stride];
        spread += sd * sd + d * d;
      }
    }
    spread /= T(present);
    sigma = spread > T(0) ? std::sqrt(spread) : T(0);
  }
  *mu_out = mu;
  *sigma_out = sigma;
  return present;
}

// Backward coefficients for one task and one feature. With
// y = (u - mu) r w + b, r = 1 / (sigma + eps) and the task sums
// s1 = sum dy, s2 = sum dy (u - mu):
//   dL/du_i = P (dy_i - A_c) + B_c (u_i - center_c)          (P = w r)
// where P A_c = -dL/dmu / (C' n_c), i.e. A_c = s1 / (C' n_c) (kept in units
// of dy so that dy - A cancels exactly where it should), and the sigma term is
//   class_mean: B_c = dL/dsigma / (C' n_c s_c), center_c = m_c
//   pooled:     B_c = dL/dsigma / (C' n_c sigma), center_c = mu
// (0 where the deviation is 0: a constant class gets no gradient through it).
// In eval (training == false) statistics are constants: A = B = 0.
// Also returns this task's parts of dweight (sum dy yhat) and dbias (sum dy),
// and, in training, sum_i dL/du_i u_i in closed form: y does not change when
// u is scaled (mu, sigma scale with it) except through eps, so that sum is
// eps r^2 w s2 -- exact, where summing dL/du_i u_i over rows would cancel
// large terms. A per-feature gate's gradient is (1 - sigmoid(gate)) times it.
template <typename T>
SURGELLM_HD void backward_coefficients(int64_t num_classes, const T* count, const T* mean,
                                       const T* group_std, int64_t stride, bool pooled,
                                       bool training, T mu, T sigma, T w, T s1, T s2, T eps,
                                       T* P, T* A, T* B, T* center, T* dweight, T* dbias,
                                       T* du_dot_u) {
  const T r = T(1) / (sigma + eps);
  const T dy_yhat = r * s2;
  *P = w * r;
  *dweight = dy_yhat;
  *dbias = s1;
  *du_dot_u = eps * r * w * dy_yhat;
  if (!training) return;
  int64_t present = 0;
  for (int64_t c = 0; c < num_classes; ++c) present += count[c] > T(0);
  const T d_sigma = -r * w * dy_yhat;
  for (int64_t c = 0; c < num_classes; ++c) {
    T a = 0, b = 0, cen = 0;
    if (count[c] > T(0)) {
      const T inv = T(1) / (T(present) * count[c]);
      const T dev = pooled ? sigma : group_std[c * stride];
      a = s1 * inv;
      b = dev > T(0) ? d_sigma * inv / dev : T(0);
      cen = pooled ? mu : mean[c * stride];
    }
    A[c * stride] = a;
    B[c * stride] = b;
    center[c * stride] = cen;
  }
}

}  // namespace surgellm
