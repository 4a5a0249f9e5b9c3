// Arithmetic of fused_iwn shared by the CPU (C++) and CUDA kernels.
//
// Everything here works on one feature column at a time and is host/device
// inline, so both backends compute the small per-(task, feature) steps with
// the same code. Notation: per (task t, class c): n_c rows, rounded mean
// m_c and its rounding residual rho_c = mean of (u - m_c) (the exact mean
// is m_c + rho_c), M2_c = sum of squared deviations from m_c, and the
// population deviation about the exact mean s_c = sqrt(M2_c / n_c - rho_c^2);
// C' = the classes present in task t (n_c > 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "iwn/iwn_args.h"

#if defined(__CUDACC__)
#define SURGELLM_HD __host__ __device__ __forceinline__
#else
#define SURGELLM_HD inline
#endif

namespace surgellm {

// Merging row-chunk summaries (n_ch, m_ch, M2_ch, R_ch) in chunk order, where
// M2_ch = sum (u - m_ch)^2 and R_ch = sum (u - m_ch) are taken about the
// chunk's rounded mean m_ch (R_ch is that rounding, 0 in exact arithmetic).
// First the mean, as Chan et al. merge it (merge_mean, every chunk in turn).
// Then, about that merged (rounded) mean M, exactly:
//   sum (u - M)^2 = sum_ch M2_ch + 2 (m_ch - M) R_ch + n_ch (m_ch - M)^2,
//   sum (u - M)   = sum_ch n_ch (m_ch - M) + R_ch
// (merge_about adds one chunk's terms; the second, over n, is the mean
// residual). Chan's own M2 update drops the cross term 2 (m_ch - M) R_ch and
// is about the exact mean of the m_ch, not M: both are of the size of
// n (rounding of the mean)^2, which is the whole variance of a constant
// feature at a large magnitude. Merging in a fixed order makes the result
// independent of how work was scheduled.
// Counts are scalars (T); the moments (V) are scalars too, or -- on the CPU
// -- vectors of consecutive features of one group, merged lane by lane.
template <typename T, typename V>
SURGELLM_HD void merge_mean(T& n, V& mean, T n_b, V mean_b) {
  if (n_b == T(0)) return;
  const T total = n + n_b;
  mean = mean + (mean_b - mean) * V(n_b / total);
  n = total;
}

template <typename T, typename V>
SURGELLM_HD void merge_about(V& m2, V& residual_sum, T n_b, V mean_b, V m2_b, V r_b, V mean) {
  const V d = mean_b - mean;
  m2 = m2 + (m2_b + d * (V(n_b) * d + V(T(2)) * r_b));
  residual_sum = residual_sum + (V(n_b) * d + r_b);
}

// Group k, feature f of IWNMergeArgs: the parts merged in part order, first
// the mean, then M2 and the residual about it. Writes the group's count too
// (from feature 0).
template <typename T>
SURGELLM_HD void merge_parts_at(const IWNMergeArgs<T>& a, int64_t k, int64_t f) {
  const int64_t G = a.num_groups, F = a.F;
  T n = 0, mean = 0;
  for (int64_t p = 0; p < a.num_parts; ++p)
    merge_mean(n, mean, a.count[p * G + k], a.mean[(p * G + k) * F + f]);
  T m2 = 0, residual_sum = 0;
  for (int64_t p = 0; p < a.num_parts; ++p) {
    const T n_b = a.count[p * G + k];
    const int64_t i = (p * G + k) * F + f;
    if (n_b > T(0)) merge_about(m2, residual_sum, n_b, a.mean[i], a.m2[i], a.residual_sum[i], mean);
  }
  a.out_mean[k * F + f] = mean;
  a.out_m2[k * F + f] = m2;
  a.out_mean_residual[k * F + f] = n > T(0) ? residual_sum / n : T(0);
  if (f == 0) a.out_count[k] = n;
}

template <typename T>
SURGELLM_HD T safe_sqrt(T v) {
  // Rounding can leave v slightly negative: 0. NaN stays NaN (a non-finite
  // input poisons its feature's statistics, as in BatchNorm, never silently).
  return v > T(0) ? std::sqrt(v) : (v == v ? T(0) : v);
}

// Eq.10-11 for task t and feature f: mu = mean_c m_c, and
// sigma = mean_c s_c ("class_mean", the paper) or
// sigma = sqrt(mean_c (s_c^2 + (m_c - mu)^2)) ("pooled"), over the classes
// present. Writes s_c (0 for absent classes), mu and sigma; a task with no
// rows gets mu = sigma = 0 (no row reads them) and keeps its running
// statistics, which otherwise move by r += momentum * (batch - r).
// The class moments are taken about the exact mean m_c + rho_c: the mean
// itself, and s_c^2 = M2_c / n_c - rho_c^2 (M2_c is about m_c, merged as
// merge_about does). So a constant feature has mu equal to its value and
// s_c = 0 (up to the rounding of rho_c^2, far below eps), and its y is
// exactly the bias: the rounding of the mean would otherwise be divided by
// sigma + eps, with sigma of the size of that rounding. For the same reason
// mu is summed as the first present class's mean plus the mean of the
// differences from it: equal class means give mu equal to them, exactly
// (their plain sum would round, and C' u / C' need not be u).
template <typename T>
SURGELLM_HD T exact_class_mean(const IWNCombineArgs<T>& a, int64_t i) {
  return a.mean[i] + a.mean_residual[i];
}

template <typename T>
SURGELLM_HD T exact_class_std(const IWNCombineArgs<T>& a, T n, int64_t i) {
  const T rho = a.mean_residual[i];
  return safe_sqrt(a.m2[i] / n - rho * rho);
}

template <typename T>
SURGELLM_HD void combine_at(const IWNCombineArgs<T>& a, int64_t t, int64_t f) {
  const int64_t C = a.num_classes, F = a.F;
  const T* count = a.count + t * C;
  const int64_t base = t * C * F + f;
  int64_t present = 0;
  T first_mean = 0, sum_mean = 0, sum_std = 0;  // sum_mean: of m_c - first_mean
  for (int64_t c = 0; c < C; ++c) {
    T sd = 0;
    if (count[c] > T(0)) {
      sd = exact_class_std(a, count[c], base + c * F);
      const T m = exact_class_mean(a, base + c * F);
      if (present == 0) first_mean = m;
      sum_mean += m - first_mean;
      sum_std += sd;
      ++present;
    }
    a.group_std[base + c * F] = sd;
  }
  T mu = 0, sigma = 0;
  if (present > 0) {
    mu = first_mean + sum_mean / T(present);
    sigma = sum_std / T(present);
    if (a.pooled) {
      T spread = 0;
      for (int64_t c = 0; c < C; ++c) {
        if (count[c] > T(0)) {
          const T d = exact_class_mean(a, base + c * F) - mu;
          const T sd = a.group_std[base + c * F];
          spread += sd * sd + d * d;
        }
      }
      sigma = safe_sqrt(spread / T(present));
    }
  }
  a.mu[t * F + f] = mu;
  a.sigma[t * F + f] = sigma;
  if (a.running_mean && present > 0) {
    T& rm = a.running_mean[t * F + f];
    T& rs = a.running_std[t * F + f];
    rm += a.momentum * (mu - rm);
    rs += a.momentum * (sigma - rs);
  }
}

// Backward coefficients for feature f, every task in order. With
// y = (u - mu) r w + b, r = 1 / (sigma + eps) and the task sums
// s1 = sum dy, s2 = sum dy (u - mu):
//   dL/du_i = scale (dy_i - dy_shift_c) + dev_coef_c (u_i - center_c)  (scale = w r)
// where scale * dy_shift_c = -dL/dmu / (C' n_c), i.e. dy_shift_c = s1 / (C' n_c)
// (kept in units of dy so that dy - dy_shift cancels exactly where it should),
// and the sigma term is
//   class_mean: dev_coef_c = dL/dsigma / (C' n_c s_c), center_c = m_c
//   pooled:     dev_coef_c = dL/dsigma / (C' n_c sigma), center_c = mu
// (0 where the deviation is 0: a constant class gets no gradient through it).
// The rounding of the centers: where a class's rows nearly coincide, s_c is
// tiny and the rounding error rho of its center (about an ulp) is first-order
// in u_i - center_c. The exact center is center + rho (mean_residual from
// the moments; for "pooled" the residual of mu); dev_coef (u - center - rho)
// is folded into dy_shift: scale * dy_shift gains dev_coef * rho, and
// dev_coef / scale = -r s2 / (C' n_c dev), in which the weight cancels.
// In eval the statistics are constants: only scale is written.
// In training s2 is first corrected to the exact mu (mu's own rounding
// residual, from the classes' mean residuals).
// dweight = sum_t sum dy yhat, dbias = sum_t s1, and du_dot_u = sum_i dL/du_i u_i
// in closed form: y does not change when u is scaled (mu and sigma scale with
// it) except through eps, so in training that sum is eps r^2 w s2 -- exact,
// where summing dL/du_i u_i over rows would cancel large terms. A (F) gate's
// gradient is (1 - sigmoid(gate)) times it.
template <typename T>
SURGELLM_HD void coefficients_at(const IWNCoefficientsArgs<T>& a, int64_t f) {
  const int64_t F = a.F, TT = a.num_tasks, C = a.num_classes;
  const T w = a.weight ? a.weight[f] : T(1);
  T dweight = 0, dbias = 0, du_dot_u = 0;
  for (int64_t t = 0; t < TT; ++t) {
    const T s1 = a.sums[t * F + f];
    const T mu = a.mu[t * F + f];
    const T r = T(1) / (a.sigma[t * F + f] + a.eps);
    const T* count = a.training ? a.count + t * C : nullptr;
    const int64_t base = t * C * F + f;
    int64_t present = 0;
    T mu_residual = 0;  // the exact mean of the exact class means, minus mu
    if (a.training) {
      for (int64_t c = 0; c < C; ++c) {
        if (count[c] > T(0)) {
          mu_residual += (a.group_mean[base + c * F] - mu) + a.mean_residual[base + c * F];
          ++present;
        }
      }
      if (present > 0) mu_residual /= T(present);
    }
    // s2 was summed around the rounded mu; sum dy (u - exact mu) is s2 less
    // mu_residual * s1 (which matters where sigma is tiny: a constant
    // feature, whose closed-form gate gradient is then 0 as it should be).
    const T s2 = a.sums[(TT + t) * F + f] - mu_residual * s1;
    const T dy_yhat = r * s2;
    a.scale[t * F + f] = w * r;
    // The parameters' gradients, from this rank's own sums (the same sums
    // unless data-parallel).
    const T p1 = a.param_sums[t * F + f];
    const T p_dy_yhat = r * (a.param_sums[(TT + t) * F + f] - mu_residual * p1);
    dweight += p_dy_yhat;
    dbias += p1;
    du_dot_u += a.eps * r * w * p_dy_yhat;
    if (!a.training) continue;
    const T d_sigma = -r * w * dy_yhat;
    for (int64_t c = 0; c < C; ++c) {
      T shift = 0, coef = 0, center = 0;
      if (count[c] > T(0)) {
        const T inv = T(1) / (T(present) * count[c]);
        const T dev = a.pooled ? a.sigma[t * F + f] : a.group_std[base + c * F];
        const T rho = a.pooled ? mu_residual : a.mean_residual[base + c * F];
        shift = dev > T(0) ? inv * (s1 - dy_yhat * rho / dev) : s1 * inv;
        coef = dev > T(0) ? d_sigma * inv / dev : T(0);
        center = a.pooled ? mu : a.group_mean[base + c * F];
      }
      a.dy_shift[base + c * F] = shift;
      a.dev_coef[base + c * F] = coef;
      a.center[base + c * F] = center;
    }
  }
  a.dweight[f] = dweight;
  a.dbias[f] = dbias;
  a.du_dot_u[f] = du_dot_u;
}

}  // namespace surgellm
