// Arithmetic of fused_iwn shared by the CPU (C++) and CUDA kernels.
//
// Everything here is host/device inline and works on one feature column at
// a time, or on the CPU on a vector of consecutive features lane by lane
// (merge_mean, merge_about; the Lanes of combine_at and coefficients_at), so
// both backends compute the small per-(task, feature) steps with the same
// code. Notation: per (task t, class c): n_c rows, rounded mean
// m_c and its rounding residual rho_c = mean of (u - m_c) (the exact mean
// is m_c + rho_c), M2_c = sum of squared deviations from m_c, and the
// population deviation about the exact mean s_c = sqrt(M2_c / n_c - rho_c^2);
// C' = the classes present in task t (n_c > 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "iwn/iwn_args.h"

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

// The per-(task, class, feature) steps below take one feature at a time
// (OneFeature: a CUDA thread's) or, on the CPU, a vector of consecutive
// features, lane by lane the same arithmetic (iwn_cpu.cpp). Lanes gives the
// value type V, loads and stores of a table's entries at feature f, and the
// two choices these steps make per value.
template <typename T>
struct OneFeature {
  using V = T;
  SURGELLM_HD T load(const T* p) const { return *p; }
  SURGELLM_HD void store(T* p, T v) const { *p = v; }
  // Rounding can leave v slightly negative: 0. NaN stays NaN (a non-finite
  // input poisons its feature's statistics, as in BatchNorm, never silently).
  SURGELLM_HD static T safe_sqrt(T v) { return v > T(0) ? std::sqrt(v) : (v == v ? T(0) : v); }
  SURGELLM_HD static T if_positive(T v, T yes, T no) { return v > T(0) ? yes : no; }
  SURGELLM_HD static T if_zero(T v, T yes, T no) { return v == T(0) ? yes : no; }
};

// r + m (batch - r), from the batch's end where m >= 1/2 (as torch.lerp
// chooses its end): m = 1 gives the batch value itself, which r + (batch - r)
// rounds away where r is far larger.
template <typename T, typename V>
SURGELLM_HD V running_update(V r, V batch, T m) {
  return m < T(0.5) ? r + V(m) * (batch - r) : batch - (batch - r) * V(T(1) - m);
}

// Eq.10-11 for task t and feature f: mu = mean_c m_c, and
// sigma = mean_c s_c ("class_mean", the paper) or
// sigma = sqrt(mean_c (s_c^2 + (m_c - mu)^2)) ("pooled"), over the classes
// present. Writes s_c (0 for absent classes), mu and sigma; a task with no
// rows gets mu = sigma = 0 (no row reads them) and keeps its running
// statistics, which otherwise move by r += momentum * (batch - r)
// (running_update).
// The class moments are taken about the exact mean m_c + rho_c: the mean
// itself, and s_c^2 = M2_c / n_c - rho_c^2 (M2_c is about m_c, merged as
// merge_about does). So a constant feature has mu equal to its value and
// s_c = 0 (up to the rounding of rho_c^2, far below eps), and its y is
// exactly the bias: the rounding of the mean would otherwise be divided by
// sigma + eps, with sigma of the size of that rounding. For the same reason
// mu is summed as the first present class's mean plus the mean of the
// differences from it: equal class means give mu equal to them, exactly
// (their plain sum would round, and C' u / C' need not be u).
template <typename T, typename Lanes>
SURGELLM_HD typename Lanes::V exact_class_mean(const IWNCombineArgs<T>& a, int64_t i,
                                               const Lanes& l) {
  return l.load(a.mean + i) + l.load(a.mean_residual + i);
}

template <typename T, typename Lanes>
SURGELLM_HD typename Lanes::V exact_class_std(const IWNCombineArgs<T>& a, T n, int64_t i,
                                              const Lanes& l) {
  using V = typename Lanes::V;
  const V rho = l.load(a.mean_residual + i);
  return l.safe_sqrt(l.load(a.m2 + i) / V(n) - rho * rho);
}

template <typename T, typename Lanes = OneFeature<T>>
SURGELLM_HD void combine_at(const IWNCombineArgs<T>& a, int64_t t, int64_t f,
                            const Lanes& l = Lanes()) {
  using V = typename Lanes::V;
  const int64_t C = a.num_classes, F = a.F;
  const T* count = a.count + t * C;
  const int64_t base = t * C * F + f;
  int64_t present = 0;
  V first_mean(T(0)), sum_mean(T(0)), sum_std(T(0));  // sum_mean: of m_c - first_mean
  for (int64_t c = 0; c < C; ++c) {
    V sd(T(0));
    if (count[c] > T(0)) {
      sd = exact_class_std(a, count[c], base + c * F, l);
      const V m = exact_class_mean(a, base + c * F, l);
      if (present == 0) first_mean = m;
      sum_mean = sum_mean + (m - first_mean);
      sum_std = sum_std + sd;
      ++present;
    }
    l.store(a.group_std + base + c * F, sd);
  }
  V mu(T(0)), sigma(T(0));
  if (present > 0) {
    mu = first_mean + sum_mean / V(T(present));
    sigma = sum_std / V(T(present));
    if (a.pooled) {
      V spread(T(0));
      for (int64_t c = 0; c < C; ++c) {
        if (count[c] > T(0)) {
          const V d = exact_class_mean(a, base + c * F, l) - mu;
          const V sd = l.load(a.group_std + base + c * F);
          spread = spread + (sd * sd + d * d);
        }
      }
      sigma = l.safe_sqrt(spread / V(T(present)));
    }
  }
  l.store(a.mu + t * F + f, mu);
  l.store(a.sigma + t * F + f, sigma);
  if (a.running_mean && present > 0) {
    const V rm = l.load(a.running_mean + t * F + f), rs = l.load(a.running_std + t * F + f);
    l.store(a.running_mean + t * F + f, running_update(rm, mu, a.momentum));
    l.store(a.running_std + t * F + f, running_update(rs, sigma, a.momentum));
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
template <typename T, typename Lanes = OneFeature<T>>
SURGELLM_HD void coefficients_at(const IWNCoefficientsArgs<T>& a, int64_t f,
                                 const Lanes& l = Lanes()) {
  using V = typename Lanes::V;
  const int64_t F = a.F, TT = a.num_tasks, C = a.num_classes;
  const V w = a.weight ? l.load(a.weight + f) : V(T(1));
  V dweight(T(0)), dbias(T(0)), du_dot_u(T(0));
  for (int64_t t = 0; t < TT; ++t) {
    const V s1 = l.load(a.sums + t * F + f);
    const V mu = l.load(a.mu + t * F + f);
    const V r = V(T(1)) / (l.load(a.sigma + t * F + f) + V(a.eps));
    const T* count = a.training ? a.count + t * C : nullptr;
    const int64_t base = t * C * F + f;
    int64_t present = 0;
    V mu_residual(T(0));  // the exact mean of the exact class means, minus mu
    if (a.training) {
      for (int64_t c = 0; c < C; ++c) {
        if (count[c] > T(0)) {
          mu_residual = mu_residual + ((l.load(a.group_mean + base + c * F) - mu) +
                                       l.load(a.mean_residual + base + c * F));
          ++present;
        }
      }
      if (present > 0) mu_residual = mu_residual / V(T(present));
    }
    // s2 was summed around the rounded mu; sum dy (u - exact mu) is s2 less
    // mu_residual * s1 (which matters where sigma is tiny: a constant
    // feature, whose closed-form gate gradient is then 0 as it should be).
    const V s2 = l.load(a.sums + (TT + t) * F + f) - mu_residual * s1;
    const V dy_yhat = r * s2;
    l.store(a.scale + t * F + f, w * r);
    // The parameters' gradients, from this rank's own sums (the same sums
    // unless data-parallel).
    const V p1 = l.load(a.param_sums + t * F + f);
    // A task with no rows (its sums empty: 0) adds no terms, where r may be
    // infinite (eps = 0, sigma = 0: inf * 0 made the weight's and the gate's
    // gradients NaN); a task with rows passes NaN on as the reference does.
    const V p2 = l.load(a.param_sums + (TT + t) * F + f) - mu_residual * p1;
    auto unless_absent = [&](const V& term) {
      return l.if_zero(p1, l.if_zero(p2, V(T(0)), term), term);
    };
    const V p_dy_yhat = unless_absent(r * p2);
    dweight = dweight + p_dy_yhat;
    dbias = dbias + p1;
    du_dot_u = du_dot_u + unless_absent(V(a.eps) * r * w * p_dy_yhat);
    if (!a.training) continue;
    const V d_sigma = -r * w * dy_yhat;
    for (int64_t c = 0; c < C; ++c) {
      V shift(T(0)), coef(T(0)), center(T(0));
      if (count[c] > T(0)) {
        const V inv(T(1) / (T(present) * count[c]));
        const V dev = l.load(a.pooled ? a.sigma + t * F + f : a.group_std + base + c * F);
        const V rho = a.pooled ? mu_residual : l.load(a.mean_residual + base + c * F);
        shift = l.if_positive(dev, inv * (s1 - dy_yhat * rho / dev), s1 * inv);
        coef = l.if_positive(dev, d_sigma * inv / dev, V(T(0)));
        center = a.pooled ? mu : l.load(a.group_mean + base + c * F);
      }
      l.store(a.dy_shift + base + c * F, shift);
      l.store(a.dev_coef + base + c * F, coef);
      l.store(a.center + base + c * F, center);
    }
  }
  l.store(a.dweight + f, dweight);
  l.store(a.dbias + f, dbias);
  l.store(a.du_dot_u + f, du_dot_u);
}

}  // namespace surgellm
