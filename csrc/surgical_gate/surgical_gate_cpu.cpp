// fused_surgical_gate on the CPU: per row, g = sigmoid(logits),
// v = g * h + (1 - g) * s, z = LayerNorm(v) * weight + bias; and its backward.
//
// Compiled once per CPU capability (see dispatch.h). Rows run in parallel;
// the blend lives in one per-thread row buffer, never in memory beyond it
// (forward saves only mean and rstd; backward recomputes the blend). dweight
// and dbias reduce over fixed row chunks merged in chunk order, so every
// result is bitwise the same for any thread count.
#include "surgical_gate/surgical_gate_cpu.h"

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
  // Fills v (and g, for the backward) for row i; returns sum(v). A float
  // row with a logit outside the inline sigmoid's range is blended again
  // with the exact one; rows of bfloat16 / float16 take sigmoid_for_reduced.
  template <bool kKeepGate, bool kExactSigmoid = false>
  acc_t blend(int64_t i) {
    using Vec = Vectorized<acc_t>;
    struct State {
      Vec sum, inline_ok;  // sum of v; lanes whose logits so far were in range
    };
    const Vec zero(acc_t(0)), one(acc_t(1));
    const scalar_t *hr = h + i * d, *sr = s + i * d, *lr = logits + i * d;
    const State out = fold_vecs<acc_t>(
        d, State{zero, inline_range_lanes(zero)}, [&](int64_t f, int64_t n, State st) {
          prefetch_ahead(hr + f);
          prefetch_ahead(sr + f);
          prefetch_ahead(lr + f);
          const Vec lv = load_as_acc<scalar_t, acc_t>(lr + f, n);
          Vec gv;
          if constexpr (kExactSigmoid) {
            gv = sigmoid(lv);
          } else if constexpr (!std::is_same<scalar_t, acc_t>::value) {
            gv = sigmoid_for_reduced(lv);
          } else {
            gv = sigmoid_inline(lv);
            if constexpr (!kSigmoidInlineEverywhere)
              st.inline_ok = st.inline_ok & inline_range_lanes(lv);
          }
          // g * h + (1 - g) * s: exactly h where g is 1 and s where g is 0
          // (s + g * (h - s) is not, nor finite for huge h - s).
          const Vec vv = at::vec::fmadd(gv, load_as_acc<scalar_t, acc_t>(hr + f, n),
                                        (one - gv) * load_as_acc<scalar_t, acc_t>(sr + f, n));
          if constexpr (kKeepGate) store(gv, g.data() + f, n);
          store(vv, v.data() + f, n);
          st.sum = st.sum + Vec::set(zero, vv, n);
          return st;
        });
    if constexpr (!kExactSigmoid && !kSigmoidInlineEverywhere)
      if (!all_lanes(out.inline_ok)) return blend<kKeepGate, true>(i);
    return sum_lanes(out.sum);
  }
};

}  // namespace

template <typename scalar_t>
void surgical_gate_forward(const SurgicalGateForwardArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t d = a.d;
  const bool stream = stream_output<scalar_t>(3, 1, a.N * d);  // h, s, logits; z
  const acc_t *weight = a.weight, *bias = a.bias;
  at::parallel_for(0, a.N, row_grain(d), [&](int64_t begin, int64_t end) {
    BlendRows<scalar_t, acc_t> rows(a.h, a.s, a.logits, d);
    scalar_t* z = static_cast<scalar_t*>(a.z);
    const Vec zero(acc_t(0));
    for (int64_t i = begin; i < end; ++i) {
      const acc_t mean0 = rows.template blend<false>(i) / acc_t(d);
      const Vec vmean0(mean0);
      // Deviations from the first mean and their sum: the mean corrected by
      // it is exact for a constant row (whose z is then exactly the bias).
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
      const acc_t mean = mean0 + shift;
      const acc_t var = sum_lanes(dev.first) / acc_t(d) - shift * shift;
      const acc_t rstd = acc_t(1) / std::sqrt((var > acc_t(0) ? var : acc_t(0)) + a.eps);
      const Vec vmean(mean), vrstd(rstd);
      scalar_t* out = z + i * d;
      // weight, bias and stream by value: loop constants, not reloads.
      for_each_vec<acc_t>(d, [&, weight, bias, stream](int64_t f, int64_t n) {
        const Vec xhat = (load(rows.v.data() + f, n) - vmean) * vrstd;
        const Vec y = weight && bias ? at::vec::fmadd(xhat, load(weight + f, n), load(bias + f, n))
                      : weight       ? xhat * load(weight + f, n)
                      : bias         ? xhat + load(bias + f, n)
                                     : xhat;
        store_out(y, out + f, n, stream);
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
