// fused_surgical_gate on the CPU: per row, g = sigmoid(logits),
// v = g * h + (1 - g) * s, z = LayerNorm(v) * weight + bias; and its backward.
//
// Compiled once per CPU capability (see dispatch.h). Rows run in parallel;
// the blend lives in one per-thread row buffer, never in memory beyond it
// (forward saves only mean and rstd; backward recomputes the blend). dweight
// and dbias reduce over fixed row chunks merged in chunk order, so every
// result is bitwise the same for any thread count.
#include "surgical_gate/surgical_gate_cpu.h"

#include <tuple>
#include <utility>

#include "common/cpu_vec.h"

namespace surgellm {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// One row's blend v = g * h + (1 - g) * s and gate g, in per-thread buffers
// (L1-resident), computed in one loop that reads h, s and the logits of the
// row together -- data of any floating type converted in registers.
template <typename scalar_t, typename acc_t>
struct BlendRows {
  const scalar_t *h, *s, *logits;
  int64_t d;
  std::vector<acc_t> g, v;
  BlendRows(const void* h_, const void* s_, const void* l_, int64_t d_)
      : h(static_cast<const scalar_t*>(h_)),
        s(static_cast<const scalar_t*>(s_)),
        logits(static_cast<const scalar_t*>(l_)),
        d(d_),
        g(d_),
        v(d_) {}
  using Vec = Vectorized<acc_t>;

  // g of a vector of logits: rows of bfloat16 / float16 take
  // sigmoid_for_reduced, float rows sigmoid_inline (or the exact sigmoid).
  template <bool kExactSigmoid>
  static Vec gate_of(const Vec& logit) {
    if constexpr (kExactSigmoid)
      return sigmoid(logit);
    else if constexpr (!std::is_same<scalar_t, acc_t>::value)
      return sigmoid_for_reduced(logit);
    else
      return sigmoid_inline(logit);
  }

  // g * h + (1 - g) * s, with (1 - g) * s as s - g * s (one fused
  // instruction where the build has them, and no rounding of 1 - g): for
  // finite h and s, exactly h where g is 1 and s where g is 0 (s + g * (h - s)
  // is not, nor finite for huge h - s), and s where h == s (bar exact
  // rounding ties), as the GPU kernels give it: a row of h == s constant
  // stays constant, z = bias. The DEFAULT build has no fused instructions, and
  // its two roundings miss s about once in a hundred values: it picks s there
  // (where g is a number: a NaN gate gives NaN, as the fused steps do).
  static Vec mix(const Vec& g, const Vec& hv, const Vec& sv) {
    const Vec v = at::vec::fmadd(g, hv, at::vec::fnmadd(g, sv, sv));
#if defined(CPU_CAPABILITY_DEFAULT)
    return Vec::blendv(v, sv, (hv == sv) & (g == g));
#else
    return v;
#endif
  }

  // Fills v[f0:] (and g, for the backward) for row i; returns its sum. A
  // float row with a logit outside the inline sigmoid's range is blended
  // again with the exact one.
  template <bool kKeepGate, bool kExactSigmoid = false>
  acc_t blend(int64_t i, int64_t f0 = 0) {
    struct State {
      Vec sum, inline_ok;  // sum of v; lanes whose logits so far were in range
    };
    const Vec zero(acc_t(0));
    const scalar_t *hr = h + i * d + f0, *sr = s + i * d + f0, *lr = logits + i * d + f0;
    acc_t *gr = g.data() + f0, *vr = v.data() + f0;
    const State out = fold_vecs<acc_t>(
        d - f0, State{zero, inline_range_lanes(zero)}, [&](int64_t f, int64_t n, State st) {
          prefetch_ahead(hr + f);
          prefetch_ahead(sr + f);
          prefetch_ahead(lr + f);
          const Vec lv = load_as_acc<scalar_t, acc_t>(lr + f, n);
          const Vec gv = gate_of<kExactSigmoid>(lv);
          if constexpr (!kExactSigmoid && !kSigmoidInlineEverywhere &&
                        std::is_same<scalar_t, acc_t>::value)
            st.inline_ok = st.inline_ok & inline_range_lanes(lv);
          const Vec vv = mix(gv, load_as_acc<scalar_t, acc_t>(hr + f, n),
                             load_as_acc<scalar_t, acc_t>(sr + f, n));
          if constexpr (kKeepGate) store(gv, gr + f, n);
          store(vv, vr + f, n);
          st.sum = st.sum + Vec::set(zero, vv, n);
          return st;
        });
    if constexpr (!kExactSigmoid && !kSigmoidInlineEverywhere)
      if (!all_lanes(out.inline_ok)) return blend<kKeepGate, true>(i, f0);
    return sum_lanes(out.sum);
  }

  // v of row i's value f alone, the same bits as the row's passes give it.
  acc_t blend_one(int64_t i, int64_t f) const {
    const int64_t k = i * d + f;
    const Vec vv =
        mix(gate_of<false>(load_as_acc<scalar_t, acc_t>(logits + k, 1)),
            load_as_acc<scalar_t, acc_t>(h + k, 1), load_as_acc<scalar_t, acc_t>(s + k, 1));
    acc_t lanes[Vec::size()];
    vv.store(lanes);
    return lanes[0];
  }

  // Sums of a row's values less a shift c, and of their squares (lanes past
  // n unchanged).
  struct Moments {
    Vec sum, sumsq;
  };
  static Moments add_deviations(const Moments& m, const Vec& vv, const Vec& c, int64_t n) {
    const Vec dv = vv - c;
    return {Vec::set(m.sum, m.sum + dv, n), Vec::set(m.sumsq, at::vec::fmadd(dv, dv, m.sumsq), n)};
  }

  // blend<false> of a row of reduced values that returns, in place of v's
  // sum, the sums of v - c and of (v - c)^2. Values that load two vectors at
  // a time in lanes of their own order (lanes_reordered: bfloat16) do so, v
  // holding each whole block of 2W values in those lanes, for an output loop
  // that reads it so (its per-feature coefficients arranged to match) and
  // stores the pair back in order; the tail in order. One unpack per vector
  // in place of a widen and a shift.
  std::pair<acc_t, acc_t> blend_moments(int64_t i, acc_t c) {
    constexpr int64_t W = Vec::size();
    const scalar_t *hr = h + i * d, *sr = s + i * d, *lr = logits + i * d;
    const Vec vc(c), zero(acc_t(0));
    Moments m0{zero, zero}, m1{zero, zero};
    int64_t f = 0;
    if constexpr (lanes_reordered<scalar_t>())
      for (; f + 2 * W <= d; f += 2 * W) {
        prefetch_ahead(hr + f);
        prefetch_ahead(sr + f);
        prefetch_ahead(lr + f);
        const auto [l0, l1] = load_lanes_any_order(lr + f);
        const auto [h0, h1] = load_lanes_any_order(hr + f);
        const auto [s0, s1] = load_lanes_any_order(sr + f);
        const Vec v0 = mix(gate_of<false>(l0), h0, s0), v1 = mix(gate_of<false>(l1), h1, s1);
        v0.store(v.data() + f);
        v1.store(v.data() + f + W);
        m0 = add_deviations(m0, v0, vc, W);
        m1 = add_deviations(m1, v1, vc, W);
      }
    const Moments rest = fold_vecs<acc_t>(d - f, m0, [&](int64_t k, int64_t n, const Moments& m) {
      prefetch_ahead(hr + f + k);
      prefetch_ahead(sr + f + k);
      prefetch_ahead(lr + f + k);
      const Vec vv = mix(gate_of<false>(load_as_acc<scalar_t, acc_t>(lr + f + k, n)),
                         load_as_acc<scalar_t, acc_t>(hr + f + k, n),
                         load_as_acc<scalar_t, acc_t>(sr + f + k, n));
      store(vv, v.data() + f + k, n);
      return add_deviations(m, vv, vc, n);
    });
    return {sum_lanes(rest.sum + m1.sum), sum_lanes(rest.sumsq + m1.sumsq)};
  }
};

}  // namespace

// Bits the bfloat16 / float16 forward's one-pass variance may lose (see
// surgical_gate_forward): 20 of float's 24 are left, against the 8 or 11
// the output keeps.
constexpr int kMaxShiftBits = 4;

template <typename scalar_t>
void surgical_gate_forward(const SurgicalGateForwardArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t d = a.d;
  constexpr int64_t W = Vec::size();
  constexpr bool kPairs = lanes_reordered<scalar_t>();  // blend_moments' pairs
  constexpr bool kReduced = !std::is_same<scalar_t, acc_t>::value;
  const bool stream = stream_output<scalar_t>(3, 1, a.N * d);  // h, s, logits; z
  // weight and bias arranged as blend_moments leaves v (where it does).
  const acc_t* coef[2] = {a.weight, a.bias};
  const int64_t coef_rows[2] = {1, 1};
  std::vector<acc_t> arranged[2];
  arrange_each<scalar_t>(coef, coef_rows, d, arranged);
  const acc_t *weight = coef[0], *bias = coef[1];
  at::parallel_for(0, a.N, row_grain(d), [&](int64_t begin, int64_t end) {
    BlendRows<scalar_t, acc_t> rows(a.h, a.s, a.logits, d);
    scalar_t* z = static_cast<scalar_t*>(a.z);
    // Mean and variance of the row in rows.v from its deviations from mean0
    // and their sum: the mean corrected by it is exact for a constant row
    // (whose z is then exactly the bias).
    auto moments_about = [&rows, d](acc_t mean0) {
      const Vec vmean0(mean0), zero(acc_t(0));
      using Sums = std::pair<Vec, Vec>;  // of squared deviations, of deviations
      const Sums dev = fold_vecs_chained<acc_t>(
          d, Sums(zero, zero),
          [&](int64_t f, int64_t n, const Sums& acc) {
            const Vec dv = load(rows.v.data() + f, n) - vmean0;
            return Sums(Vec::set(acc.first, at::vec::fmadd(dv, dv, acc.first), n),
                        Vec::set(acc.second, acc.second + dv, n));
          },
          add_pairs<Vec>);
      const acc_t shift = sum_lanes(dev.second) / acc_t(d);
      return std::make_pair(mean0 + shift, sum_lanes(dev.first) / acc_t(d) - shift * shift);
    };
    for (int64_t i = begin; i < end; ++i) {
      acc_t mean, var;
      if constexpr (kReduced) {
        // Mean and variance in the pass that blends, about the row's first
        // value c: a constant row's deviations are exactly 0 (z is exactly
        // the bias). The subtraction loses log2(1 + shift^2 / var) of
        // float's 24 bits, typically about one; where c is an outlier, up
        // to log2(d), and past kMaxShiftBits the row takes the second pass
        // over v that float rows take (which took 14% of the bfloat16
        // forward's time at 4096x768 on every row).
        const acc_t c = rows.blend_one(i, 0);
        const auto [sum, sumsq] = rows.blend_moments(i, c);
        const acc_t shift = sum / acc_t(d);
        mean = c + shift;
        var = sumsq / acc_t(d) - shift * shift;
        if (shift * shift > acc_t((1 << kMaxShiftBits) - 1) * var)
          std::tie(mean, var) = moments_about(mean);
      } else {
        std::tie(mean, var) = moments_about(rows.template blend<false>(i) / acc_t(d));
      }
      const acc_t rstd = acc_t(1) / std::sqrt(row_variance(var) + a.eps);
      const Vec vmean(mean), vrstd(rstd);
      scalar_t* out = z + i * d;
      // weight and bias by value: loop constants, not reloads.
      auto z_of = [&, weight, bias](int64_t f, int64_t n) {
        const Vec xhat = (load(rows.v.data() + f, n) - vmean) * vrstd;
        return weight && bias ? at::vec::fmadd(xhat, load(weight + f, n), load(bias + f, n))
               : weight       ? xhat * load(weight + f, n)
               : bias         ? xhat + load(bias + f, n)
                              : xhat;
      };
      int64_t f = 0;
      if constexpr (kPairs)
        for (; f + 2 * W <= d; f += 2 * W)
          store_lanes_any_order(z_of(f, W), z_of(f + W, W), out + f, stream);
      for_each_vec<acc_t>(d - f, [&, f, stream](int64_t k, int64_t n) {
        store_out(z_of(f + k, n), out + f + k, n, stream);
      });
      a.mean[i] = mean;
      a.rstd[i] = rstd;
    }
    if (stream) stream_fence();
  });
}

// dv = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dz * w;
// dh = dv g, ds = dv (1 - g), dlogits = dv (h - s) g (1 - g).
template <typename scalar_t>
void surgical_gate_backward(const SurgicalGateBackwardArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.N, d = a.d;
  const int64_t chunk = rows_per_chunk(N, d * sizeof(scalar_t), 2 * d * sizeof(acc_t));
  const int64_t nchunks = ceil_div(N, chunk);
  const scalar_t* dz = static_cast<const scalar_t*>(a.dz);
  Scratch<acc_t> partial(nchunks * 2 * d);  // per chunk: sum dz xhat, then sum dz
  // dz, h, s, logits; dh, ds, dlogits (three outputs: never streamed)
  const bool stream = stream_output<scalar_t>(4, 3, N * d);
  const acc_t* weight = a.weight;
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    BlendRows<scalar_t, acc_t> rows(a.h, a.s, a.logits, d);
    scalar_t *dh = static_cast<scalar_t*>(a.dh), *ds = static_cast<scalar_t*>(a.ds),
             *dl = static_cast<scalar_t*>(a.dlogits);
    const Vec one(acc_t(1));
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* pw = partial.data() + ch * 2 * d;
      acc_t* pb = pw + d;
      for (int64_t i = ch * chunk; i < std::min(N, (ch + 1) * chunk); ++i) {
        rows.template blend<true>(i);
        const scalar_t *hr = rows.h + i * d, *sr = rows.s + i * d;
        const scalar_t* g = dz + i * d;
        const Vec mean(a.mean[i]), rstd(a.rstd[i]);
        // Row sums of dxhat and dxhat * xhat (dz's unused lanes load as 0).
        using Sums = std::pair<Vec, Vec>;
        const Sums c = fold_vecs_chained<acc_t>(
            d, Sums(Vec(acc_t(0)), Vec(acc_t(0))),
            [&, weight](int64_t f, int64_t n, const Sums& acc) {
              prefetch_ahead(g + f);
              const Vec gz = load_as_acc<scalar_t, acc_t>(g + f, n);
              const Vec xhat = (load(rows.v.data() + f, n) - mean) * rstd;
              const Vec dxhat = weight ? gz * load(weight + f, n) : gz;
              store(at::vec::fmadd(gz, xhat, load(pw + f, n)), pw + f, n);
              store(load(pb + f, n) + gz, pb + f, n);
              return Sums(acc.first + dxhat, at::vec::fmadd(dxhat, xhat, acc.second));
            },
            add_pairs<Vec>);
        const Vec m1(sum_lanes(c.first) / acc_t(d)), m2(sum_lanes(c.second) / acc_t(d));
        scalar_t *dhr = dh + i * d, *dsr = ds + i * d, *dlr = dl + i * d;
        for_each_vec<acc_t>(d, [&, weight, stream](int64_t f, int64_t n) {
          const Vec gz = load_as_acc<scalar_t, acc_t>(g + f, n);
          const Vec xhat = (load(rows.v.data() + f, n) - mean) * rstd;
          const Vec dxhat = weight ? gz * load(weight + f, n) : gz;
          const Vec dv = rstd * (dxhat - m1 - xhat * m2);
          const Vec gv = load(rows.g.data() + f, n);
          store_out(dv * gv, dhr + f, n, stream);
          store_out(dv * (one - gv), dsr + f, n, stream);
          const Vec hs =
              load_as_acc<scalar_t, acc_t>(hr + f, n) - load_as_acc<scalar_t, acc_t>(sr + f, n);
          store_out(dv * hs * gv * (one - gv), dlr + f, n, stream);
        });
      }
    }
    if (stream) stream_fence();
  });
  Scratch<acc_t> total(2 * d, false);
  sum_chunks(partial, nchunks, 2 * d, total.data());
  std::copy(total.data(), total.data() + d, a.dweight);
  std::copy(total.data() + d, total.data() + 2 * d, a.dbias);
}

#define SURGELLM_INSTANTIATE(T)                                                        \
  template void surgical_gate_forward<T>(const SurgicalGateForwardArgs<acc_type<T>>&); \
  template void surgical_gate_backward<T>(const SurgicalGateBackwardArgs<acc_type<T>>&);
SURGELLM_INSTANTIATE(float)
SURGELLM_INSTANTIATE(double)
SURGELLM_INSTANTIATE(c10::BFloat16)
SURGELLM_INSTANTIATE(c10::Half)
#undef SURGELLM_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace surgellm
