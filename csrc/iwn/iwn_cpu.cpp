// The fused_iwn phases on the CPU. With u = x * sigmoid(gate):
//   group moments  per (task, class): count, mean and M2 of u
//   combine        Eq.10-11 per task (iwn_math.h), running-statistics update
//   apply          y = (u - mu_t) / (sigma_t + eps) * w + b
//   task sums      per task: sum dy and sum dy (u - mu_t)
//   coefficients   of dL/du per (task, class) (iwn_math.h), dweight, dbias
//   input grad     dx, dgate
//
// Compiled once per CPU capability (CPU_CAPABILITY = DEFAULT / AVX2 / AVX512
// with matching -m flags, see setup.py and CMakeLists.txt): at::vec picks the
// vector width from those macros. Reductions run over fixed row chunks whose
// partials are merged in chunk order, so every result is bitwise the same for
// any thread count. u is never materialized beyond one row per thread. Every
// row loop is vector code to the end: the last partial vector uses counted
// loads and stores, so the last features of a row round like the others.
#include "iwn/iwn_cpu.h"

#include "common/cpu_vec.h"
#include "iwn/iwn_math.h"

namespace surgellm {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// One row of u = x * s, read a vector at a time: x (of any floating type,
// converted in registers) and the per-feature s = sigmoid(gate) multiplied
// on the fly (s == nullptr: no gate), or a row already materialized in a
// per-thread buffer (per-instance gates): as x when x is of the accumulation
// type, else `materialized`.
template <typename scalar_t, typename acc_t>
struct RowU {
  const scalar_t* x;
  const acc_t* s;
  const acc_t* materialized = nullptr;
  Vectorized<acc_t> vec(int64_t f, int64_t n) const {
    if constexpr (!std::is_same<scalar_t, acc_t>::value)
      if (materialized) return load(materialized + f, n);
    const Vectorized<acc_t> v = load_as_acc<scalar_t, acc_t>(x + f, n);
    return s ? v * load(s + f, n) : v;
  }
};

// Rows of u = x * sigmoid(gate) in the accumulation type, one per thread at
// a time. With no gate or a (F) gate, rows are read in place (converted in
// registers); per-instance gates go through per-thread row buffers (never a
// full-size temporary).
template <typename scalar_t, typename acc_t>
struct GatedRows {
  const scalar_t* x;
  const scalar_t* gate_full;  // per-instance logits, or null
  const acc_t* gate_sig;      // per-feature sigmoid(gate), or null
  int64_t F;
  std::vector<acc_t> u_buf, sig_buf, logit_buf;

  GatedRows(const IWNRows<acc_t>& r, const acc_t* gate_sig_)
      : x(static_cast<const scalar_t*>(r.x)),
        gate_full(static_cast<const scalar_t*>(r.gate_full)),
        gate_sig(gate_sig_),
        F(r.F),
        u_buf(r.gate_full ? r.F : 0),
        sig_buf(r.gate_full ? r.F : 0),
        logit_buf(r.gate_full ? r.F : 0) {}

  // u of row i; sig() is then that row's sigmoid(gate) (null when ungated).
  RowU<scalar_t, acc_t> u(int64_t i) {
    if (!gate_full) return {x + i * F, gate_sig};
    sigmoid_row(as_acc(gate_full + i * F, logit_buf.data(), F), sig_buf.data(), F);
    for_each_vec<acc_t>(F, [&](int64_t f, int64_t n) {
      store(load_as_acc<scalar_t, acc_t>(x + i * F + f, n) * load(sig_buf.data() + f, n),
            u_buf.data() + f, n);
    });
    if constexpr (std::is_same<scalar_t, acc_t>::value)
      return {u_buf.data(), nullptr};  // read as x, ungated
    else
      return {nullptr, nullptr, u_buf.data()};
  }
  const acc_t* sig() const { return gate_full ? sig_buf.data() : gate_sig; }
};

inline int64_t key_of(const int32_t* keys, int64_t i) { return keys ? keys[i] : 0; }

// The apply's per task and feature coefficients: y = (x - mu) * scale + bias,
// scale = w / (sigma + eps). x - mu stays as it is, not folded into a shift
// bias - mu * scale as BatchNorm's one fmadd: with a (nearly) constant
// feature scale is about 1 / eps, and the shift's rounding (an ulp of
// mu / eps) would come out in y, where x - mu is exactly 0.
template <typename acc_t>
struct ApplyCoefficients {
  std::vector<acc_t> scale, zeros;  // scale (T, F); zeros (F) stand in for no bias
  const acc_t *mu, *bias;

  explicit ApplyCoefficients(const IWNApplyArgs<acc_t>& a)
      : scale(a.num_tasks * a.rows.F),
        zeros(a.bias ? 0 : a.rows.F, acc_t(0)),
        mu(a.mu),
        bias(a.bias ? a.bias : zeros.data()) {
    for (int64_t j = 0; j < int64_t(scale.size()); ++j)
      scale[j] = (a.weight ? a.weight[j % a.rows.F] : acc_t(1)) / (a.sigma[j] + a.eps);
  }
  ApplyCoefficients(const ApplyCoefficients&) = delete;  // bias may point into zeros
};

// Rows of one group a few at a time. The group moments read a chunk's rows
// group by group: per block of rows the group's sums are loaded and stored
// once (per row, those loads and stores, not the data, would bound it), and
// each sum still adds its rows one by one in row order (the same result as
// row by row).
constexpr int64_t kRowBlock = 4;

// A chunk's rows [r0, r1) sorted by group (group_of(i) in [0, G)), stably:
// group g's rows are order[start[g], start[g + 1]). Keeps its index buffers
// from call to call (one per thread).
struct RowsByGroup {
  std::vector<int64_t> start, next, order;

  template <typename GroupOf>
  void sort(int64_t r0, int64_t r1, int64_t G, const GroupOf& group_of) {
    start.assign(G + 1, 0);
    for (int64_t i = r0; i < r1; ++i) ++start[group_of(i) + 1];
    for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
    next.assign(start.begin(), start.end() - 1);
    order.resize(r1 - r0);
    for (int64_t i = r0; i < r1; ++i) order[next[group_of(i)]++] = i;
  }

  // body(g, rows, n): group g's sorted rows, up to `block` (<= kRowBlock)
  // at a time; rows points into `order`.
  template <typename Body>
  void visit_group(int64_t g, int64_t block, const Body& body) const {
    for (int64_t j = start[g]; j < start[g + 1]; j += block)
      body(g, order.data() + j, std::min(block, start[g + 1] - j));
  }
};

}  // namespace

// -- channels first: planes of L positions (x of shape (N, F, L)) -----------------------
// Instance i's feature f is the plane x + (i * F + f) * L. No gate. Every
// pass reads each plane once: the reductions run in parallel over features
// (each thread owns its features' statistics: no partial buffers) and add
// the planes of a feature in instance order, so results are bitwise the same
// at any thread count; the elementwise passes run in parallel over planes.
// A reduction's thread reads, per instance, the planes of a block of its
// features (for_each_instance_planes): one run of memory, where a feature's
// planes alone are runs of L values a whole sample apart, each a new stream
// for the hardware prefetcher (at 64x256x28x28 bfloat16 the moments read
// 9.5 GB/s so, where the apply moved 37 GB/s).

// A reduction thread's per-plane statistics: within L2 (one feature at a
// time when its N planes' statistics need more).
constexpr int64_t kPlaneStatsBytes = int64_t(1) << 17;

// body(i, f) for the planes of features [f0, f1) of instances [0, N): each
// instance's planes in memory order, instances in order (so each feature
// still sees its planes in instance order).
template <typename Body>
inline void for_each_instance_planes(int64_t N, int64_t f0, int64_t f1, const Body& body) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t f = f0; f < f1; ++f) body(i, f);
}

// out = fn(a, b, l, n) over a plane or a row of L values (b == nullptr:
// fn(a, a, l, n)), a and b vectors of n values as acc, read and written as
// scalar_t: for bfloat16 / float16 two vectors per full load and store,
// their lanes as load_lanes_any_order gives them -- per-lane coefficients
// read at l must be arranged so (arrange_lanes) -- then the tail in order (n
// < vector size in the last call only); with non-temporal stores when
// `stream` (store_out; bfloat16 pairs, store_lanes_any_order).
template <typename scalar_t, typename acc_t, typename Fn>
inline void map_values(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t L, bool stream,
                       const Fn& fn) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t l = 0;
  if constexpr (!std::is_same<scalar_t, acc_t>::value) {
    for (; l + 2 * W <= L; l += 2 * W) {
      const auto [a0, a1] = load_lanes_any_order(a + l);
      Vec b0 = a0, b1 = a1;
      if (b) std::tie(b0, b1) = load_lanes_any_order(b + l);
      store_lanes_any_order(fn(a0, b0, l, W), fn(a1, b1, l + W, W), out + l, stream);
    }
  }
  for (; l < L; l += W) {
    const int64_t n = std::min(W, L - l);
    const Vec va = load_as_acc<scalar_t, acc_t>(a + l, n);
    store_out(fn(va, b ? load_as_acc<scalar_t, acc_t>(b + l, n) : va, l, n), out + l, n, stream);
  }
}

// map_values over a plane of one feature: fn(a, b), the same for every lane.
// Streamed, the values before out's first 64-byte boundary go first, with
// ordinary stores: the rest then starts a cache line, and each of its
// non-temporal stores writes whole lines. A plane of 28 x 28 bfloat16 values
// (1568 bytes) starts mid-line every other plane, whose stores would all be
// ordinary ones split across two lines.
template <typename scalar_t, typename acc_t, typename Fn>
inline void map_plane(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t L, bool stream,
                      const Fn& fn) {
  using Vec = Vectorized<acc_t>;
  auto same_for_every_lane = [&](const Vec& va, const Vec& vb, int64_t, int64_t) {
    return fn(va, vb);
  };
  int64_t head = 0;
  if (stream) {
    const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(out) % 64);
    if (misaligned % int64_t(sizeof(scalar_t)) == 0)
      head = std::min(L, (64 - misaligned) % 64 / int64_t(sizeof(scalar_t)));
  }
  if (head > 0) map_values<scalar_t, acc_t>(a, b, out, head, false, same_for_every_lane);
  map_values<scalar_t, acc_t>(a + head, b ? b + head : nullptr, out + head, L - head, stream,
                              same_for_every_lane);
}

// Per group and feature: count, mean and M2 of the planes. Each plane's own
// moments first -- its mean m_p, then M2_p and R_p = sum (v - m_p) about it,
// while the plane is in L1 -- then the planes of a group merged in instance
// order as row chunks are (merge_mean, then merge_about the merged mean).
template <typename scalar_t>
void planes_group_moments(const IWNMomentsArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.rows.N, F = a.rows.F, L = a.rows.L, G = a.num_groups;
  const scalar_t* x = static_cast<const scalar_t*>(a.rows.x);
  std::fill(a.count, a.count + G, acc_t(0));
  for (int64_t i = 0; i < N; ++i) a.count[key_of(a.rows.keys, i)] += acc_t(L);
  if (L == 0) {  // no positions: empty groups
    for (acc_t* out : {a.mean, a.m2, a.mean_residual}) std::fill(out, out + G * F, acc_t(0));
    return;
  }
  // Per-plane moments of a block of features at a time (kPlaneStatsBytes of
  // them per thread, or one feature's), then merged feature by feature.
  const int64_t block =
      std::max<int64_t>(1, kPlaneStatsBytes / std::max<int64_t>(1, 3 * N * sizeof(acc_t)));
  at::parallel_for(0, F, 1, [&](int64_t f0, int64_t f1) {
    const int64_t width = std::min(block, f1 - f0);
    std::vector<acc_t> pmean(width * N), pm2(width * N), pres(width * N), n(G), mean(G), m2(G),
        res(G);
    for (int64_t fb = f0; fb < f1; fb += width) {
      const int64_t fe = std::min(f1, fb + width);
      for_each_instance_planes(N, fb, fe, [&](int64_t i, int64_t f) {
        const scalar_t* p = x + (i * F + f) * L;
        // Four sums in turn (fold_vecs_chained): one would wait on each add.
        const Vec zero(acc_t(0));
        const Vec sum = fold_vecs_chained<acc_t>(
            L, zero,
            [&](int64_t l, int64_t n, const Vec& acc) {
              return acc + load_as_acc<scalar_t, acc_t>(p + l, n);  // 0 past the tail
            },
            std::plus<Vec>());
        const acc_t m = sum_lanes(sum) / acc_t(L);
        const Vec mv(m);
        const auto [sq, rs] = fold_vecs_chained<acc_t>(
            L, std::pair<Vec, Vec>(zero, zero),
            [&](int64_t l, int64_t n, const std::pair<Vec, Vec>& acc) {
              const Vec d = Vec::set(zero, load_as_acc<scalar_t, acc_t>(p + l, n) - mv, n);
              return std::pair<Vec, Vec>(at::vec::fmadd(d, d, acc.first), acc.second + d);
            },
            add_pairs<Vec>);
        const int64_t j = (f - fb) * N + i;
        pmean[j] = m;
        pm2[j] = sum_lanes(sq);
        pres[j] = sum_lanes(rs);
      });
      for (int64_t f = fb; f < fe; ++f) {
        const acc_t *fmean = pmean.data() + (f - fb) * N, *fm2 = pm2.data() + (f - fb) * N,
                    *fres = pres.data() + (f - fb) * N;
        std::fill(n.begin(), n.end(), acc_t(0));
        std::fill(mean.begin(), mean.end(), acc_t(0));
        for (int64_t i = 0; i < N; ++i) {
          const int64_t k = key_of(a.rows.keys, i);
          merge_mean(n[k], mean[k], acc_t(L), fmean[i]);
        }
        std::fill(m2.begin(), m2.end(), acc_t(0));
        std::fill(res.begin(), res.end(), acc_t(0));
        for (int64_t i = 0; i < N; ++i) {
          const int64_t k = key_of(a.rows.keys, i);
          merge_about(m2[k], res[k], acc_t(L), fmean[i], fm2[i], fres[i], mean[k]);
        }
        for (int64_t k = 0; k < G; ++k) {
          a.mean[k * F + f] = mean[k];
          a.m2[k * F + f] = m2[k];
          a.mean_residual[k * F + f] = n[k] > acc_t(0) ? res[k] / n[k] : acc_t(0);
        }
      }
    }
  });
}

// Elementwise over planes: body(i, f, plane offset), in parallel over planes;
// a task that streamed its stores ends with stream_fence().
template <typename Body>
inline void for_each_plane(int64_t N, int64_t F, int64_t L, bool stream, const Body& body) {
  at::parallel_for(0, N * F, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t j = begin; j < end; ++j) body(j / F, j % F, j * L);
                     if (stream) stream_fence();
                   });
}

// y = (x - mu_t) * scale_t + bias (ApplyCoefficients), over planes.
template <typename scalar_t>
void planes_apply(const IWNApplyArgs<acc_type<scalar_t>>& a,
                  const ApplyCoefficients<acc_type<scalar_t>>& c) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t F = a.rows.F, L = a.rows.L;
  const scalar_t* x = static_cast<const scalar_t*>(a.rows.x);
  scalar_t* y = static_cast<scalar_t*>(a.y);
  const bool stream = stream_output<scalar_t>(1, 1, a.rows.N * F * L);  // x; y
  for_each_plane(a.rows.N, F, L, stream, [&](int64_t i, int64_t f, int64_t off) {
    const int64_t j = key_of(a.rows.keys, i) / a.key_div * F + f;
    const Vec m(c.mu[j]), s(c.scale[j]), b(c.bias[f]);
    map_plane<scalar_t, acc_t>(x + off, nullptr, y + off, L, stream, [&](const Vec& v, const Vec&) {
      return at::vec::fmadd(v - m, s, b);
    });
  });
}

// Per task: sums[0] = sum dy, sums[1] = sum dy (x - mu_t), in parallel over features.
template <typename scalar_t>
void planes_task_sums(const IWNTaskSumsArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.rows.N, F = a.rows.F, L = a.rows.L, T = a.num_tasks;
  const scalar_t* x = static_cast<const scalar_t*>(a.rows.x);
  const scalar_t* dy = static_cast<const scalar_t*>(a.dy);
  at::parallel_for(0, F, 1, [&](int64_t f0, int64_t f1) {
    // The thread's sums, sum dy then sum dy (x - mu) of (task, feature),
    // kept apart from its neighbour's (no cache line written by both on
    // every instance) and copied out at the end.
    const int64_t width = f1 - f0;
    std::vector<acc_t> sums(2 * T * width, acc_t(0));
    for_each_instance_planes(N, f0, f1, [&](int64_t i, int64_t f) {
      const int64_t t = key_of(a.rows.keys, i) / a.key_div;
      const int64_t off = (i * F + f) * L;
      const Vec m(a.mu[t * F + f]);
      const Vec zero(acc_t(0));
      const auto [s1, s2] = fold_vecs_chained<acc_t>(
          L, std::pair<Vec, Vec>(zero, zero),
          [&](int64_t l, int64_t n, const std::pair<Vec, Vec>& acc) {
            const Vec g = load_as_acc<scalar_t, acc_t>(dy + off + l, n);  // 0 past the tail
            const Vec v = load_as_acc<scalar_t, acc_t>(x + off + l, n);
            return std::pair<Vec, Vec>(acc.first + g, at::vec::fmadd(g, v - m, acc.second));
          },
          add_pairs<Vec>);
      sums[t * width + f - f0] += sum_lanes(s1);
      sums[(T + t) * width + f - f0] += sum_lanes(s2);
    });
    for (int64_t r = 0; r < 2 * T; ++r)
      std::copy_n(sums.data() + r * width, width, a.sums + r * F + f0);
  });
}

// du = (dy - dy_shift_k) * scale_t + dev_coef_k * (x - center_k) (eval:
// dy * scale_t), as the rows' input gradient; dx = du (no gate).
template <typename scalar_t>
void planes_input_grad(const IWNInputGradArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t F = a.rows.F, L = a.rows.L;
  const scalar_t* x = static_cast<const scalar_t*>(a.rows.x);
  const scalar_t* dy = static_cast<const scalar_t*>(a.dy);
  scalar_t* dx = static_cast<scalar_t*>(a.dx);
  // dy, x (in training), dx
  const bool stream = stream_output<scalar_t>(a.training ? 2 : 1, 1, a.rows.N * F * L);
  for_each_plane(a.rows.N, F, L, stream, [&](int64_t i, int64_t f, int64_t off) {
    const int64_t k = key_of(a.rows.keys, i);
    const Vec p(a.scale[(k / a.key_div) * F + f]);
    if (!a.training) {
      map_plane<scalar_t, acc_t>(dy + off, nullptr, dx + off, L, stream,
                                 [&](const Vec& g, const Vec&) { return g * p; });
      return;
    }
    const Vec shift(a.dy_shift[k * F + f]), coef(a.dev_coef[k * F + f]),
        center(a.center[k * F + f]);
    map_plane<scalar_t, acc_t>(dy + off, x + off, dx + off, L, stream,
                               [&](const Vec& g, const Vec& v) {
                                 return at::vec::fmadd(coef, v - center, (g - shift) * p);
                               });
  });
}

// Adds rows of one group to a group's sums about `center`: sq += (u - c)^2,
// dev += u - c, the rows one by one in their order, the sums loaded and
// stored once per block of rows. The rows of a block read x in place and
// share their gate: RowU::vec's arithmetic, its tests taken once per block.
// ahead[r]: a row visited later, asked for (software prefetch) at the same
// offset as row r: rows visited group by group jump through memory, where
// the hardware prefetcher, which follows runs of addresses, starts each row
// late.
template <typename scalar_t, typename acc_t>
inline void add_deviations(const RowU<scalar_t, acc_t>* u, const scalar_t* const* ahead, int64_t nr,
                           const acc_t* center, acc_t* sq, acc_t* dev, int64_t F) {
  using Vec = Vectorized<acc_t>;
  auto sums_of = [&](auto rows, auto row_vec) {
    for_each_vec<acc_t>(F, [&](int64_t f, int64_t n) {
      const Vec c = load(center + f, n);
      Vec q = load(sq + f, n), e = load(dev + f, n);
      for (int64_t r = 0; r < rows(); ++r) {
        const Vec d = row_vec(r, f, n) - c;
        q = at::vec::fmadd(d, d, q);
        e = e + d;
      }
      store(q, sq + f, n);
      store(e, dev + f, n);
    });
  };
  // A whole block's row count known to the compiler: its row loop unrolled,
  // up to 5% off the moments (same arithmetic, same bits).
  auto sums = [&](auto row_vec) {
    if (nr == kRowBlock)
      sums_of([] { return kRowBlock; }, row_vec);
    else
      sums_of([nr] { return nr; }, row_vec);
  };
  if (nr == 1) return sums([&](int64_t, int64_t f, int64_t n) { return u[0].vec(f, n); });
  const scalar_t* x[kRowBlock];
  for (int64_t r = 0; r < nr; ++r) x[r] = u[r].x;
  if (const acc_t* s = u[0].s)
    return sums([&, s](int64_t r, int64_t f, int64_t n) {
      __builtin_prefetch(ahead[r] + f);
      return load_as_acc<scalar_t, acc_t>(x[r] + f, n) * load(s + f, n);
    });
  sums([&](int64_t r, int64_t f, int64_t n) {
    __builtin_prefetch(ahead[r] + f);
    return load_as_acc<scalar_t, acc_t>(x[r] + f, n);
  });
}

// A chunk's group moments in one pass, group by group (its rows sorted by
// group: one group's three sums in use at a time, in the L1 cache, where row
// order would keep every group's in use, 90 KiB for 10 groups of 768
// floats), about a shift per group and feature, K = the mean of the group's
// first kShiftRows rows in the chunk: S1 = sum (u - K), S2 = sum (u - K)^2,
// then mean = K + S1 / n, d = mean - K, the residual R = sum (u - mean) =
// S1 - n d and M2 = sum (u - mean)^2 = S2 - d (S1 + R) (about K + d, which
// is the mean up to the rounding of d). The subtraction costs M2 the bits of
// S2 / M2 = 1 + n d^2 / M2: at most 1 + n / 8, as the 8 rows alone put
// 8 d^2 into M2, and for independent rows d^2 is about var / 8 (a sixth of
// a bit). A group with a lane where S2 > kMaxShiftLoss M2 (K far from the
// mean: outlying first rows, as a run of one sample's positions can be; a
// constant feature whose 8-row mean rounds; inf, NaN) reads its rows in the
// chunk again, from cache, in two passes: their sum gives its mean, then M2
// sums squared deviations from it. Either way a rounded mean costs M2 only a
// second-order error (n (mean error)^2), whatever the data's offset.
constexpr int64_t kShiftRows = 8;
constexpr double kMaxShiftLoss = 4;
// How far ahead the group moments ask for rows: the next block, and at
// least 4 KiB: rows of 64 floats asked for four rows ahead arrived late, and
// rows of 768 asked for sixteen rows ahead were no faster than four.
constexpr int64_t kAheadBytes = 4096;

// Per group: count, mean and M2 of u, chunk by chunk as above. Chunks then
// merge in chunk order (iwn_merge_moments): the mean, then M2 and the
// residual about that merged (rounded) mean, cross terms included: M2 is the
// sum of squares about the mean returned.
template <typename scalar_t>
void iwn_group_moments(const IWNMomentsArgs<acc_type<scalar_t>>& a) {
  if (a.rows.L != 1) return planes_group_moments<scalar_t>(a);
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.rows.N, F = a.rows.F, G = a.num_groups;
  const int64_t chunk = rows_per_chunk(N, F * sizeof(scalar_t), 3 * G * F * sizeof(acc_t));
  const int64_t nchunks = ceil_div(N, chunk);
  const std::vector<acc_t> sig = gate_sigmoid(a.rows.gate_vec, F);
  const acc_t* gate_sig = sig.empty() ? nullptr : sig.data();
  // Per-instance gates materialize each row in one per-thread buffer: one
  // row at a time.
  const int64_t block = a.rows.gate_full ? 1 : kRowBlock;
  // One chunk (small batches): its summaries are the result, written in place.
  const bool one = nchunks == 1;
  const int64_t ahead_rows =
      std::max(kRowBlock, ceil_div(kAheadBytes, F * static_cast<int64_t>(sizeof(scalar_t))));
  // Zeroed chunk by chunk by the thread that fills them, while in its cache.
  Scratch<acc_t> pcount(one ? 0 : nchunks * G, false), pmean(one ? 0 : nchunks * G * F, false),
      pm2(one ? 0 : nchunks * G * F, false), pres(one ? 0 : nchunks * G * F, false);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.rows, gate_sig);
    RowsByGroup by_group;
    // Per feature, whether the one pass kept its bits, and (where a lane did
    // not) the one-pass mean, M2 and residual of the others.
    std::vector<acc_t> one_pass_ok(F), one_pass;
    // sum += u; then a sum over `count` rows becomes their mean.
    auto add_row = [F](acc_t* sum, const RowU<scalar_t, acc_t>& u) {
      for_each_vec<acc_t>(
          F, [&](int64_t f, int64_t n) { store(load(sum + f, n) + u.vec(f, n), sum + f, n); });
    };
    auto to_mean = [F](acc_t* sum, acc_t count) {
      const Vec inv(acc_t(1) / count);
      for_each_vec<acc_t>(F,
                          [&](int64_t f, int64_t n) { store(load(sum + f, n) * inv, sum + f, n); });
    };
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* cnt = one ? a.count : pcount.data() + ch * G;
      acc_t* mean = one ? a.mean : pmean.data() + ch * G * F;         // K, then the mean
      acc_t* m2 = one ? a.m2 : pm2.data() + ch * G * F;               // S2, then M2
      acc_t* res = one ? a.mean_residual : pres.data() + ch * G * F;  // S1, then R
      for (acc_t* out : {mean, m2, res}) std::fill(out, out + G * F, acc_t(0));
      const int64_t r0 = ch * chunk, r1 = std::min(N, (ch + 1) * chunk);
      by_group.sort(r0, r1, G, [&](int64_t i) { return key_of(a.rows.keys, i); });
      const int64_t* order = by_group.order.data();
      const std::vector<int64_t>& start = by_group.start;
      // Adds a block of group k's rows to its sums about mean + k F, asking
      // for the row ahead_rows places later in the sorted order with each.
      auto add_block = [&](int64_t k, const int64_t* rows_k, int64_t nr) {
        RowU<scalar_t, acc_t> u[kRowBlock];
        const scalar_t* ahead[kRowBlock];
        for (int64_t r = 0; r < nr; ++r) {
          u[r] = rows.u(rows_k[r]);
          const int64_t later = rows_k - order + r + ahead_rows;
          ahead[r] = rows.x + (later < r1 - r0 ? order[later] : rows_k[r]) * F;
        }
        add_deviations(u, ahead, nr, mean + k * F, m2 + k * F, res + k * F, F);
      };
      for (int64_t k = 0; k < G; ++k) {
        const int64_t rows_k = start[k + 1] - start[k], shift_rows = std::min(rows_k, kShiftRows);
        cnt[k] = static_cast<acc_t>(rows_k);
        if (rows_k == 0) continue;
        for (int64_t r = 0; r < shift_rows; ++r) add_row(mean + k * F, rows.u(order[start[k] + r]));
        to_mean(mean + k * F, static_cast<acc_t>(shift_rows));
        by_group.visit_group(k, block, add_block);
        const Vec inv(acc_t(1) / cnt[k]), n(cnt[k]), loss(static_cast<acc_t>(kMaxShiftLoss));
        acc_t *mk = mean + k * F, *qk = m2 + k * F, *rk = res + k * F;
        const Vec all(acc_t(0)),
            kept = fold_vecs<acc_t>(F, all == all, [&](int64_t f, int64_t w, Vec ok) {
              const Vec shift = load(mk + f, w), s1 = load(rk + f, w), s2 = load(qk + f, w);
              const Vec m = shift + s1 * inv;
              const Vec d = m - shift;
              const Vec r = s1 - n * d;
              const Vec q = s2 - d * (s1 + r);
              store(m, mk + f, w);
              store(q, qk + f, w);
              store(r, rk + f, w);
              // NaN compares false: its lane takes the two passes.
              const Vec lane_ok = q * loss >= s2;
              store(lane_ok, one_pass_ok.data() + f, w);
              return Vec::set(ok, ok & lane_ok, w);
            });
        if (!all_lanes(kept)) {  // the two passes, from cache, for the lanes that need them
          // The other lanes keep their one-pass bits: a NaN in one feature
          // leaves every other feature as it would be without it.
          acc_t* const sums[3] = {mk, qk, rk};
          one_pass.resize(3 * F);  // taken on the first fallback only
          for (int64_t p = 0; p < 3; ++p) {
            std::copy(sums[p], sums[p] + F, one_pass.begin() + p * F);
            std::fill(sums[p], sums[p] + F, acc_t(0));
          }
          for (int64_t j = start[k]; j < start[k + 1]; ++j) add_row(mk, rows.u(order[j]));
          to_mean(mk, cnt[k]);
          by_group.visit_group(k, block, add_block);
          for_each_vec<acc_t>(F, [&](int64_t f, int64_t w) {
            const Vec ok = load(one_pass_ok.data() + f, w);
            for (int64_t p = 0; p < 3; ++p)
              store(Vec::blendv(load(sums[p] + f, w), load(one_pass.data() + p * F + f, w), ok),
                    sums[p] + f, w);
          });
        }
      }
    }
  });
  if (one) {  // the residual sums over the group's count
    for (int64_t k = 0; k < G; ++k) {
      if (a.count[k] == acc_t(0)) continue;
      acc_t* out = a.mean_residual + k * F;
      for (int64_t f = 0; f < F; ++f) out[f] /= a.count[k];
    }
    return;
  }
  iwn_merge_moments(IWNMergeArgs<acc_t>{pcount.data(), pmean.data(), pm2.data(), pres.data(),
                                        nchunks, G, F, a.count, a.mean, a.m2, a.mean_residual});
}

// Parts' moments merged in part order, per group: merge_parts_at's steps
// (merge_mean, then merge_about the merged mean), lane by lane the same
// arithmetic. A part at a time over a block of features, the merged moments
// held in the outputs (in cache): one lane's merge is a chain of dependent
// steps through all parts, which one vector at a time would wait on.
template <typename acc_t>
void iwn_merge_moments(const IWNMergeArgs<acc_t>& a) {
  using Vec = Vectorized<acc_t>;
  const int64_t G = a.num_groups, F = a.F, P = a.num_parts;
  for (int64_t k = 0; k < G; ++k) {
    acc_t n = 0;
    for (int64_t p = 0; p < P; ++p) n += a.count[p * G + k];
    a.out_count[k] = n;
  }
  at::parallel_for(0, F, kFeatureGrain, [&](int64_t f0, int64_t f1) {
    for (int64_t k = 0; k < G; ++k) {
      acc_t *mean = a.out_mean + k * F + f0, *m2 = a.out_m2 + k * F + f0,
            *residual = a.out_mean_residual + k * F + f0;
      for (acc_t* out : {mean, m2, residual}) std::fill(out, out + (f1 - f0), acc_t(0));
      acc_t n = 0;
      for (int64_t p = 0; p < P; ++p) {
        const acc_t n_b = a.count[p * G + k];
        if (n_b == acc_t(0)) continue;
        const acc_t* mean_b = a.mean + (p * G + k) * F + f0;
        for_each_vec<acc_t>(f1 - f0, [&, n, n_b](int64_t j, int64_t w) {
          acc_t n_lane = n;
          Vec m = load(mean + j, w);
          merge_mean(n_lane, m, n_b, load(mean_b + j, w));
          store(m, mean + j, w);
        });
        n += n_b;
      }
      for (int64_t p = 0; p < P; ++p) {
        const acc_t n_b = a.count[p * G + k];
        if (!(n_b > acc_t(0))) continue;
        const int64_t part = (p * G + k) * F + f0;
        for_each_vec<acc_t>(f1 - f0, [&, n_b, part](int64_t j, int64_t w) {
          Vec q = load(m2 + j, w), r = load(residual + j, w);
          merge_about(q, r, n_b, load(a.mean + part + j, w), load(a.m2 + part + j, w),
                      load(a.residual_sum + part + j, w), load(mean + j, w));
          store(q, m2 + j, w);
          store(r, residual + j, w);
        });
      }
      for_each_vec<acc_t>(f1 - f0, [&](int64_t j, int64_t w) {
        store(n > acc_t(0) ? load(residual + j, w) / Vec(n) : Vec(acc_t(0)), residual + j, w);
      });
    }
  });
}

// iwn_math.h's per-feature steps a vector of n consecutive features at a
// time: the same arithmetic lane by lane, the same bits. One feature at a
// time, their divisions bound them: the backward's coefficients for ten
// classes of 768 features took 29-32 us so, 15-16 us by vectors.
template <typename acc_t>
struct FeatureLanes {
  using V = Vectorized<acc_t>;
  int64_t n;
  V load(const acc_t* p) const { return CPU_CAPABILITY::load(p, n); }
  void store(acc_t* p, const V& v) const { CPU_CAPABILITY::store(v, p, n); }
  static V safe_sqrt(const V& v) {
    const V zero(acc_t(0));
    return V::blendv(V::blendv(v, zero, v == v), v.sqrt(), v > zero);
  }
  static V if_positive(const V& v, const V& yes, const V& no) {
    return V::blendv(no, yes, v > V(acc_t(0)));
  }
  static V if_zero(const V& v, const V& yes, const V& no) {
    return V::blendv(no, yes, v == V(acc_t(0)));
  }
};

// body(f, lanes) over the features, in parallel, a vector at a time.
template <typename acc_t, typename Body>
void for_each_feature_vec(int64_t F, const Body& body) {
  at::parallel_for(0, F, kFeatureGrain, [&](int64_t f0, int64_t f1) {
    for_each_vec<acc_t>(f1 - f0,
                        [&](int64_t j, int64_t n) { body(f0 + j, FeatureLanes<acc_t>{n}); });
  });
}

template <typename acc_t>
void iwn_combine(const IWNCombineArgs<acc_t>& a) {
  for_each_feature_vec<acc_t>(a.F, [&](int64_t f, const FeatureLanes<acc_t>& lanes) {
    for (int64_t t = 0; t < a.num_tasks; ++t) combine_at(a, t, f, lanes);
  });
}

// y = (u - mu_t) * scale_t + bias (ApplyCoefficients).
template <typename scalar_t>
void iwn_apply(const IWNApplyArgs<acc_type<scalar_t>>& a) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t F = a.rows.F;
  const std::vector<acc_t> sig = gate_sigmoid(a.rows.gate_vec, F);
  const acc_t* gate_sig = sig.empty() ? nullptr : sig.data();
  const ApplyCoefficients<acc_t> c(a);
  if (a.rows.L != 1) return planes_apply<scalar_t>(a, c);
  // mu, scale, bias, sigmoid(gate): rows read in place (map_values) take
  // them arranged as their lanes arrive; rows of per-instance gates in order.
  const acc_t* coef[4] = {c.mu, c.scale.data(), c.bias, gate_sig};
  const int64_t coef_rows[4] = {a.num_tasks, a.num_tasks, 1, 1};
  std::vector<acc_t> arranged[4];
  if (!a.rows.gate_full) arrange_each<scalar_t>(coef, coef_rows, F, arranged);
  const bool stream = stream_output<scalar_t>(1, 1, a.rows.N * F);  // x; y
  at::parallel_for(0, a.rows.N, row_grain(F), [&](int64_t begin, int64_t end) {
    // Locals of the task for what the inner loops read, not reads through
    // the captures: those are loaded again after every store of a reduced
    // type (which may alias them).
    const scalar_t* x = static_cast<const scalar_t*>(a.rows.x);
    scalar_t* y = static_cast<scalar_t*>(a.y);
    const acc_t *mu = coef[0], *scale = coef[1], *bias = coef[2], *s = coef[3];
    const int32_t* keys = a.rows.keys;
    const int64_t key_div = a.key_div;
    const bool streamed = stream;
    GatedRows<scalar_t, acc_t> rows(a.rows, gate_sig);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = key_of(keys, i) / key_div;
      const acc_t *m = mu + t * F, *sc = scale + t * F;
      auto affine = [&](const Vec& u, int64_t f, int64_t n) {
        return at::vec::fmadd(u - load(m + f, n), load(sc + f, n), load(bias + f, n));
      };
      if (a.rows.gate_full) {  // u through the per-thread row buffer
        const RowU<scalar_t, acc_t> u = rows.u(i);
        for_each_vec<acc_t>(F, [&](int64_t f, int64_t n) {
          store_out(affine(u.vec(f, n), f, n), y + i * F + f, n, streamed);
        });
      } else if (s) {  // u = x * s, x read in place
        map_values<scalar_t, acc_t>(x + i * F, nullptr, y + i * F, F, streamed,
                                    [&](const Vec& v, const Vec&, int64_t f, int64_t n) {
                                      return affine(v * load(s + f, n), f, n);
                                    });
      } else {
        map_values<scalar_t, acc_t>(
            x + i * F, nullptr, y + i * F, F, streamed,
            [&](const Vec& v, const Vec&, int64_t f, int64_t n) { return affine(v, f, n); });
      }
    }
    if (streamed) stream_fence();
  });
}

// Per task: sums[0] = sum dy, sums[1] = sum dy (u - mu_t).
template <typename scalar_t>
void iwn_task_sums(const IWNTaskSumsArgs<acc_type<scalar_t>>& a) {
  if (a.rows.L != 1) return planes_task_sums<scalar_t>(a);
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.rows.N, F = a.rows.F, T = a.num_tasks;
  const int64_t width = 2 * T * F;
  const int64_t chunk = rows_per_chunk(N, F * sizeof(scalar_t), width * sizeof(acc_t));
  const int64_t nchunks = ceil_div(N, chunk);
  const std::vector<acc_t> sig = gate_sigmoid(a.rows.gate_vec, F);
  const acc_t* gate_sig = sig.empty() ? nullptr : sig.data();
  const scalar_t* dy = static_cast<const scalar_t*>(a.dy);
  const bool one = nchunks == 1;                             // then the sums are written in place
  Scratch<acc_t> partial(one ? 0 : nchunks * width, false);  // zeroed per chunk, as moments'
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.rows, gate_sig);
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* s = one ? a.sums : partial.data() + ch * width;
      std::fill(s, s + width, acc_t(0));
      for (int64_t i = ch * chunk; i < std::min(N, (ch + 1) * chunk); ++i) {
        const int64_t t = key_of(a.rows.keys, i) / a.key_div;
        const RowU<scalar_t, acc_t> u = rows.u(i);
        const acc_t* m = a.mu + t * F;
        acc_t* s1 = s + t * F;
        acc_t* s2 = s + (T + t) * F;
        for_each_vec<acc_t>(F, [&](int64_t f, int64_t n) {
          const Vec gv = load_as_acc<scalar_t, acc_t>(dy + i * F + f, n);
          store(load(s1 + f, n) + gv, s1 + f, n);
          store(at::vec::fmadd(gv, u.vec(f, n) - load(m + f, n), load(s2 + f, n)), s2 + f, n);
        });
      }
    }
  });
  if (!one) sum_chunks(partial, nchunks, width, a.sums);
}

template <typename acc_t>
void iwn_coefficients(const IWNCoefficientsArgs<acc_t>& a) {
  for_each_feature_vec<acc_t>(
      a.F, [&](int64_t f, const FeatureLanes<acc_t>& lanes) { coefficients_at(a, f, lanes); });
}

// du = (dy - dy_shift_k) * scale_t + dev_coef_k * (u - center_k) (eval: dy * scale_t);
// dx = du * sigmoid(gate); dgate = du * u * (1 - sigmoid(gate)), which a (F)
// gate reduces over rows (in closed form in training, see coefficients_at).
// dx of rows read in place (map_values), when dx is all there is to write:
// training (ungated or a (F) gate, whose gradient task sums gave) and
// ungated eval. The per-feature coefficients arranged as map_values' lanes
// arrive; the same arithmetic as the general loop below.
template <typename scalar_t>
void rows_input_grad_in_place(const IWNInputGradArgs<acc_type<scalar_t>>& a,
                              const acc_type<scalar_t>* gate_sig) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.rows.N, F = a.rows.F, keys_rows = a.num_tasks * a.key_div;
  // scale (T, F); dy_shift, dev_coef, center (T * C, F) in training; sigmoid(gate) (F)
  const bool t = a.training;
  const acc_t* coef[5] = {a.scale, t ? a.dy_shift : nullptr, t ? a.dev_coef : nullptr,
                          t ? a.center : nullptr, gate_sig};
  const int64_t coef_rows[5] = {a.num_tasks, keys_rows, keys_rows, keys_rows, 1};
  std::vector<acc_t> arranged[5];
  arrange_each<scalar_t>(coef, coef_rows, F, arranged);
  const bool stream = stream_output<scalar_t>(a.training ? 2 : 1, 1, N * F);  // dy, x; dx
  at::parallel_for(0, N, row_grain(F), [&](int64_t begin, int64_t end) {
    // Locals of the task (see iwn_apply).
    const scalar_t* dy = static_cast<const scalar_t*>(a.dy);
    const scalar_t* x = static_cast<const scalar_t*>(a.rows.x);
    scalar_t* dx = static_cast<scalar_t*>(a.dx);
    const acc_t *scale = coef[0], *dy_shift = coef[1], *dev_coef = coef[2], *center = coef[3];
    const int32_t* keys = a.rows.keys;
    const int64_t key_div = a.key_div;
    const bool streamed = stream;
    auto rows = [&](auto gated) {
      constexpr bool kGated = decltype(gated)::value;
      const acc_t* s = coef[4];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = key_of(keys, i), row = i * F;
        const acc_t* p = scale + (k / key_div) * F;
        if (!a.training) {
          map_values<scalar_t, acc_t>(
              dy + row, nullptr, dx + row, F, streamed,
              [&](const Vec& g, const Vec&, int64_t f, int64_t n) { return g * load(p + f, n); });
          continue;
        }
        const acc_t *sh = dy_shift + k * F, *co = dev_coef + k * F, *ce = center + k * F;
        map_values<scalar_t, acc_t>(
            dy + row, x + row, dx + row, F, streamed,
            [&](const Vec& g, const Vec& v, int64_t f, int64_t n) {
              const Vec du = (g - load(sh + f, n)) * load(p + f, n);
              if constexpr (kGated) {
                const Vec sv = load(s + f, n);
                return at::vec::fmadd(load(co + f, n), v * sv - load(ce + f, n), du) * sv;
              } else {
                return at::vec::fmadd(load(co + f, n), v - load(ce + f, n), du);
              }
            });
      }
    };
    if (coef[4])
      rows(std::true_type{});
    else
      rows(std::false_type{});
    if (streamed) stream_fence();
  });
  if (gate_sig)
    for (int64_t f = 0; f < F; ++f) a.dgate_vec[f] = a.du_dot_u[f] * (acc_t(1) - gate_sig[f]);
}

template <typename scalar_t>
void iwn_input_grad(const IWNInputGradArgs<acc_type<scalar_t>>& a) {
  if (a.rows.L != 1) return planes_input_grad<scalar_t>(a);
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = a.rows.N, F = a.rows.F;
  const bool reduce_gate = a.rows.gate_vec && !a.training;
  const int64_t chunk = rows_per_chunk(N, F * sizeof(scalar_t), F * sizeof(acc_t));
  const int64_t nchunks = ceil_div(N, chunk);
  const std::vector<acc_t> sig = gate_sigmoid(a.rows.gate_vec, F);
  const acc_t* gate_sig = sig.empty() ? nullptr : sig.data();
  if (!a.rows.gate_full && !reduce_gate) return rows_input_grad_in_place<scalar_t>(a, gate_sig);
  const scalar_t* dy = static_cast<const scalar_t*>(a.dy);
  Scratch<acc_t> pgate(reduce_gate ? nchunks * F : 0);
  scalar_t* dx = static_cast<scalar_t*>(a.dx);
  scalar_t* dgate = static_cast<scalar_t*>(a.dgate_full);
  // dy, and x where u is read; dx, and dgate
  const bool reads_x = a.training || a.rows.gate_vec || dgate;
  const bool stream = stream_output<scalar_t>(1 + reads_x, 1 + (dgate != nullptr), N * F);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    GatedRows<scalar_t, acc_t> rows(a.rows, gate_sig);
    const Vec one(acc_t(1));
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* pg = reduce_gate ? pgate.data() + ch * F : nullptr;
      for (int64_t i = ch * chunk; i < std::min(N, (ch + 1) * chunk); ++i) {
        const int64_t k = key_of(a.rows.keys, i);
        const RowU<scalar_t, acc_t> u = rows.u(i);
        const acc_t* s = rows.sig();
        const acc_t* p = a.scale + (k / a.key_div) * F;
        const acc_t* shift = a.training ? a.dy_shift + k * F : nullptr;
        const acc_t* coef = a.training ? a.dev_coef + k * F : nullptr;
        const acc_t* center = a.training ? a.center + k * F : nullptr;
        const int64_t row = i * F;
        for_each_vec<acc_t>(F, [&](int64_t f, int64_t n) {
          Vec du = load_as_acc<scalar_t, acc_t>(dy + row + f, n);
          if (shift) {
            du = (du - load(shift + f, n)) * load(p + f, n);
            du = at::vec::fmadd(load(coef + f, n), u.vec(f, n) - load(center + f, n), du);
          } else {
            du = du * load(p + f, n);
          }
          if (!s) {
            store_out(du, dx + row + f, n, stream);
            return;
          }
          const Vec sv = load(s + f, n);
          store_out(du * sv, dx + row + f, n, stream);
          if (pg)
            store(at::vec::fmadd(du, u.vec(f, n), load(pg + f, n)), pg + f, n);
          else if (dgate)
            store_out(du * u.vec(f, n) * (one - sv), dgate + row + f, n, stream);
        });
      }
    }
    if (stream) stream_fence();
  });
  if (a.rows.gate_vec) {
    if (reduce_gate) sum_chunks(pgate, nchunks, F, a.dgate_vec);
    for (int64_t f = 0; f < F; ++f) {
      const acc_t total = reduce_gate ? a.dgate_vec[f] : a.du_dot_u[f];
      a.dgate_vec[f] = total * (acc_t(1) - sig[f]);
    }
  }
}

#define SURGELLM_INSTANTIATE_ROWS(T)                                      \
  template void iwn_group_moments<T>(const IWNMomentsArgs<acc_type<T>>&); \
  template void iwn_apply<T>(const IWNApplyArgs<acc_type<T>>&);           \
  template void iwn_task_sums<T>(const IWNTaskSumsArgs<acc_type<T>>&);    \
  template void iwn_input_grad<T>(const IWNInputGradArgs<acc_type<T>>&);
SURGELLM_INSTANTIATE_ROWS(float)
SURGELLM_INSTANTIATE_ROWS(double)
SURGELLM_INSTANTIATE_ROWS(c10::BFloat16)
SURGELLM_INSTANTIATE_ROWS(c10::Half)
#undef SURGELLM_INSTANTIATE_ROWS
#define SURGELLM_INSTANTIATE_ACC(T)                           \
  template void iwn_merge_moments<T>(const IWNMergeArgs<T>&); \
  template void iwn_combine<T>(const IWNCombineArgs<T>&);     \
  template void iwn_coefficients<T>(const IWNCoefficientsArgs<T>&);
SURGELLM_INSTANTIATE_ACC(float)
SURGELLM_INSTANTIATE_ACC(double)
#undef SURGELLM_INSTANTIATE_ACC

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace surgellm
