// The CPU and CUDA implementations of the fused_iwn phase ops (schemas in
// iwn.cpp): output and workspace allocation, dtype dispatch, and the kernel
// call -- the CPU build for this processor (iwn_cpu.cpp), or a CUDA launch on
// x's device and its current stream (iwn_cuda.cu). Kernels take raw pointers
// only.
//
// The phase ops are the op's internals: surgellm::iwn checks the user's
// arguments (check_iwn_args) and converts every tensor before any phase
// runs. What is asserted here is the layout each kernel reads (check_tensor,
// common/kernel_call.h), so that a direct call through torch.ops.surgellm
// never hands a kernel a bad pointer: on the CPU the keys are range-checked
// too (one cheap pass). The CUDA kernels treat a key outside its range as an
// invalid row (skipped by the reductions, NaN outputs) and never index with
// it: _iwn_group_keys checks the labels and task ids first, but not under
// CUDA graph capture, and keys may come straight from a direct call.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/kernel_call.h"
#include "iwn/iwn_cpu.h"
#ifdef SURGELLM_WITH_CUDA
#include "iwn/iwn_cuda.cuh"
#endif

namespace surgellm {
namespace {

using at::Tensor;
using std::optional;

// On the CPU, every key must lie in [0, upper) (the kernels index with it).
void check_keys_cpu(const optional<Tensor>& keys, int64_t upper) {
  if (!keys.has_value() || !keys->is_cpu()) return;
  const int32_t* k = keys->const_data_ptr<int32_t>();
  const int64_t n = keys->numel();
  // Two comparisons per key, no early exit: a loop the compiler vectorizes
  // (every phase checks the keys again), the offender looked for only when
  // there is one. last = upper - 1 within [-1, INT32_MAX].
  const int32_t last = static_cast<int32_t>(
      std::clamp<int64_t>(upper, 0, int64_t(std::numeric_limits<int32_t>::max()) + 1) - 1);
  const auto outside = [last](int32_t v) { return int32_t(v < 0) | int32_t(v > last); };
  int32_t any = 0;
  for (int64_t i = 0; i < n; ++i) any |= outside(k[i]);
  if (!any) return;
  SURGELLM_CHECK(false, "keys must lie in [0, ", upper, "), got ",
                 *std::find_if(k, k + n, outside));
}

// The checks of every row pass (x, keys, gate) and their kernel arguments.
template <typename acc_t>
IWNRows<acc_t> rows_args(const Tensor& x, const optional<Tensor>& keys,
                         const optional<Tensor>& gate) {
  const bool full_gate = gate.has_value() && gate->dim() == 2;
  return {x.const_data_ptr(),
          full_gate ? gate->const_data_ptr() : nullptr,
          full_gate ? nullptr : ptr_or_null<acc_t>(gate),
          ptr_or_null<int32_t>(keys),
          x.size(0),
          x.size(1),
          x.dim() == 3 ? x.size(2) : 1};
}

at::ScalarType check_rows(const Tensor& x, const optional<Tensor>& keys,
                          const optional<Tensor>& gate, int64_t num_keys) {
  SURGELLM_CHECK(x.dim() == 2 || x.dim() == 3, "x must be 2-D (N, F) or 3-D (N, F, L), got ",
                 x.dim(), " dimensions");
  SURGELLM_CHECK(x.is_contiguous(), "x must be contiguous");
  SURGELLM_CHECK(x.is_cpu() || x.is_cuda(), "x must be a CPU or CUDA tensor, got ", x.device());
  const bool planes = x.dim() == 3 && x.size(2) != 1;
  SURGELLM_CHECK(!planes || x.is_cpu(),
                 "x of shape (N, F, L) (channels first) is read by the CPU kernels only");
  SURGELLM_CHECK(!planes || !gate.has_value(), "x of shape (N, F, L) takes no gate");
  const auto st = x.scalar_type();
  SURGELLM_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                 "x must be float32, float64, float16 or bfloat16, got ", st);
  const int64_t N = x.size(0), F = x.size(1);
  SURGELLM_CHECK(F > 0, "x must have at least one feature (F > 0)");
#ifdef SURGELLM_WITH_CUDA
  SURGELLM_CHECK_VALUE(!x.is_cuda() || F <= cuda::kMaxFeatures,
                       "x: the CUDA C++ kernels take at most ", cuda::kMaxFeatures,
                       " features, got ", F, "; run this call on the CPU");
#endif
  const auto acc = acc_scalar_type(st);
  check_optional(keys, "keys", x, {N}, at::kInt);
  check_keys_cpu(keys, num_keys);
  if (gate.has_value()) {
    if (gate->dim() == 1)
      check_tensor(*gate, "gate", x, {F}, acc);
    else
      check_tensor(*gate, "gate", x, {N, F}, st);
  }
  return acc;
}

int64_t num_tasks_of(const Tensor& stats, const Tensor& x, const char* name) {
  SURGELLM_CHECK(stats.dim() == 2 && stats.size(0) >= 1 && stats.size(1) == x.size(1), name,
                 " must have shape (num_tasks, ", x.size(1), "), got ", stats.sizes());
  return stats.size(0);
}

// -- forward phases --------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> iwn_group_moments(const Tensor& x,
                                                             const optional<Tensor>& keys,
                                                             const optional<Tensor>& gate,
                                                             int64_t num_groups) {
  SURGELLM_CHECK(num_groups >= 1, "num_groups must be positive, got ", num_groups);
  const auto acc = check_rows(x, keys, gate, num_groups);
  const int64_t F = x.size(1);
#ifdef SURGELLM_WITH_CUDA
  // Before any kernel or running-statistics update: a failed call changes nothing.
  SURGELLM_CHECK_VALUE(!x.is_cuda() || num_groups <= cuda::kMaxGroups,
                       "num_classes: the CUDA C++ kernels hold at most ", cuda::kMaxGroups,
                       " (task, class) groups, got num_tasks * num_classes = ", num_groups,
                       "; use fewer classes or tasks, or the Triton backend "
                       "(SURGELLM_BACKEND=triton), which has no such limit");
#endif
  const auto opts = x.options().dtype(acc);
  // The kernels write every element; no rows: empty groups, all zeros.
  Tensor count = at::empty({num_groups}, opts), mean = at::empty({num_groups, F}, opts),
         m2 = at::empty({num_groups, F}, opts), residual = at::empty({num_groups, F}, opts);
  if (x.size(0) == 0) {
    for (Tensor* t : {&count, &mean, &m2, &residual}) t->zero_();
    return {count, mean, m2, residual};
  }
  SURGELLM_DISPATCH_FLOATS(x, "iwn_group_moments", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const IWNMomentsArgs<acc_t> a{
        rows_args<acc_t>(x, keys, gate), num_groups,
        count.mutable_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(),
        m2.mutable_data_ptr<acc_t>(),    residual.mutable_data_ptr<acc_t>()};
    run_phase("group_moments", x, a, [&] { SURGELLM_CPU_KERNEL(iwn_group_moments, scalar_t, a); });
  });
  return {count, mean, m2, residual};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> iwn_merge_moments(const Tensor& count,
                                                             const Tensor& mean, const Tensor& m2,
                                                             const Tensor& residual_sum) {
  SURGELLM_CHECK(mean.dim() == 3 && mean.size(2) > 0,
                 "mean must be 3-D (parts, groups, F > 0), got ", mean.sizes());
  const int64_t P = mean.size(0), G = mean.size(1), F = mean.size(2);
  const auto acc = mean.scalar_type();
  SURGELLM_CHECK(acc == at::kFloat || acc == at::kDouble, "mean must be float32 or float64");
  check_tensor(mean, "mean", mean, {P, G, F}, acc);
  check_tensor(count, "count", mean, {P, G}, acc);
  check_tensor(m2, "m2", mean, {P, G, F}, acc);
  check_tensor(residual_sum, "residual_sum", mean, {P, G, F}, acc);
#ifdef SURGELLM_WITH_CUDA
  SURGELLM_CHECK(!mean.is_cuda() || G <= cuda::kMaxGroups, "the CUDA kernels hold at most ",
                 cuda::kMaxGroups, " (task, class) groups, got ", G);
#endif
  const auto opts = mean.options();
  Tensor out_count = at::empty({G}, opts), out_mean = at::empty({G, F}, opts),
         out_m2 = at::empty({G, F}, opts), out_residual = at::empty({G, F}, opts);
  if (G == 0) return {out_count, out_mean, out_m2, out_residual};
  AT_DISPATCH_FLOATING_TYPES(acc, "iwn_merge_moments", [&] {
    const IWNMergeArgs<scalar_t> a{count.const_data_ptr<scalar_t>(),
                                   mean.const_data_ptr<scalar_t>(),
                                   m2.const_data_ptr<scalar_t>(),
                                   residual_sum.const_data_ptr<scalar_t>(),
                                   P,
                                   G,
                                   F,
                                   out_count.mutable_data_ptr<scalar_t>(),
                                   out_mean.mutable_data_ptr<scalar_t>(),
                                   out_m2.mutable_data_ptr<scalar_t>(),
                                   out_residual.mutable_data_ptr<scalar_t>()};
    run_phase("merge_moments", mean, a,
              [&] { SURGELLM_CPU_KERNEL(iwn_merge_moments, scalar_t, a); });
  });
  return {out_count, out_mean, out_m2, out_residual};
}

std::tuple<Tensor, Tensor, Tensor> iwn_combine(const Tensor& count, const Tensor& mean,
                                               const Tensor& m2, const Tensor& mean_residual,
                                               int64_t num_tasks, bool pooled, double momentum,
                                               const optional<Tensor>& running_mean,
                                               const optional<Tensor>& running_std) {
  SURGELLM_CHECK(mean.dim() == 2 && mean.size(1) > 0, "mean must be 2-D (groups, F > 0), got ",
                 mean.sizes());
  const int64_t G = mean.size(0), F = mean.size(1);
  SURGELLM_CHECK(num_tasks >= 1 && G % num_tasks == 0, "num_tasks (", num_tasks,
                 ") must divide the number of groups (", G, ")");
  const auto acc = mean.scalar_type();
  SURGELLM_CHECK(acc == at::kFloat || acc == at::kDouble, "mean must be float32 or float64");
  SURGELLM_CHECK(mean.is_contiguous(), "mean must be contiguous");
  check_tensor(count, "count", mean, {G}, acc);
  check_tensor(m2, "m2", mean, {G, F}, acc);
  check_tensor(mean_residual, "mean_residual", mean, {G, F}, acc);
  SURGELLM_CHECK(running_mean.has_value() == running_std.has_value(),
                 "running_mean and running_std must be given together");
  for (const auto* r : {&running_mean, &running_std}) {
    if (!r->has_value()) continue;
    const auto& t = **r;
    SURGELLM_CHECK(t.numel() == num_tasks * F && t.size(-1) == F && t.is_contiguous() &&
                       t.scalar_type() == acc && t.device() == mean.device(),
                   "running statistics must be contiguous ", acc, " tensors of shape (", num_tasks,
                   ", ", F, ") on ", mean.device(), ", got ", t.scalar_type(), " ", t.sizes());
  }
#ifdef SURGELLM_WITH_CUDA
  SURGELLM_CHECK(!mean.is_cuda() || num_tasks <= cuda::kMaxTasks, "the CUDA kernels hold at most ",
                 cuda::kMaxTasks, " tasks, got ", num_tasks);
#endif
  const auto opts = mean.options();
  Tensor group_std = at::empty({G, F}, opts), mu = at::empty({num_tasks, F}, opts),
         sigma = at::empty({num_tasks, F}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "iwn_combine", [&] {
    const IWNCombineArgs<scalar_t> a{count.const_data_ptr<scalar_t>(),
                                     mean.const_data_ptr<scalar_t>(),
                                     m2.const_data_ptr<scalar_t>(),
                                     mean_residual.const_data_ptr<scalar_t>(),
                                     F,
                                     num_tasks,
                                     G / num_tasks,
                                     pooled,
                                     static_cast<scalar_t>(momentum),
                                     group_std.mutable_data_ptr<scalar_t>(),
                                     mu.mutable_data_ptr<scalar_t>(),
                                     sigma.mutable_data_ptr<scalar_t>(),
                                     mutable_ptr_or_null<scalar_t>(running_mean),
                                     mutable_ptr_or_null<scalar_t>(running_std)};
    run_phase("combine", mean, a, [&] { SURGELLM_CPU_KERNEL(iwn_combine, scalar_t, a); });
  });
  return {group_std, mu, sigma};
}

Tensor iwn_apply(const Tensor& x, const optional<Tensor>& keys, const optional<Tensor>& gate,
                 const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& mu,
                 const Tensor& sigma, int64_t key_div, double eps) {
  const int64_t T = num_tasks_of(mu, x, "mu");
  SURGELLM_CHECK(key_div >= 1, "key_div must be positive, got ", key_div);
  const auto acc = check_rows(x, keys, gate, T * key_div);
  const int64_t F = x.size(1);
  check_tensor(mu, "mu", x, {T, F}, acc);
  check_tensor(sigma, "sigma", x, {T, F}, acc);
  check_optional(weight, "weight", x, {F}, acc);
  check_optional(bias, "bias", x, {F}, acc);
  Tensor y = empty_output_like(x);
  if (x.size(0) == 0) return y;
  SURGELLM_DISPATCH_FLOATS(x, "iwn_apply", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const IWNApplyArgs<acc_t> a{rows_args<acc_t>(x, keys, gate),
                                T,
                                key_div,
                                ptr_or_null<acc_t>(weight),
                                ptr_or_null<acc_t>(bias),
                                mu.const_data_ptr<acc_t>(),
                                sigma.const_data_ptr<acc_t>(),
                                static_cast<acc_t>(eps),
                                y.mutable_data_ptr()};
    run_phase("apply", x, a, [&] { SURGELLM_CPU_KERNEL(iwn_apply, scalar_t, a); });
  });
  return y;
}

// -- backward phases -------------------------------------------------------------

Tensor iwn_task_sums(const Tensor& dy, const Tensor& x, const optional<Tensor>& keys,
                     const optional<Tensor>& gate, const Tensor& mu, int64_t key_div) {
  const int64_t T = num_tasks_of(mu, x, "mu");
  SURGELLM_CHECK(key_div >= 1, "key_div must be positive, got ", key_div);
  const auto acc = check_rows(x, keys, gate, T * key_div);
  const int64_t F = x.size(1);
  check_tensor(dy, "grad_y", x, x.sizes(), x.scalar_type());
  check_tensor(mu, "mu", x, {T, F}, acc);
  Tensor sums = at::empty({2, T, F}, x.options().dtype(acc));
  if (x.size(0) == 0) return sums.zero_();
  SURGELLM_DISPATCH_FLOATS(x, "iwn_task_sums", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const IWNTaskSumsArgs<acc_t> a{
        rows_args<acc_t>(x, keys, gate), dy.const_data_ptr(),           T, key_div,
        mu.const_data_ptr<acc_t>(),      sums.mutable_data_ptr<acc_t>()};
    run_phase("task_sums", x, a, [&] { SURGELLM_CPU_KERNEL(iwn_task_sums, scalar_t, a); });
  });
  return sums;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> iwn_coefficients(
    const Tensor& sums, const optional<Tensor>& param_sums, const optional<Tensor>& weight,
    const optional<Tensor>& count, const optional<Tensor>& group_mean,
    const optional<Tensor>& group_std, const optional<Tensor>& mean_residual, const Tensor& mu,
    const Tensor& sigma, bool pooled, double eps) {
  SURGELLM_CHECK(mu.dim() == 2 && mu.size(0) >= 1 && mu.size(1) > 0,
                 "mu must be 2-D (num_tasks >= 1, F > 0), got ", mu.sizes());
  const int64_t T = mu.size(0), F = mu.size(1);
  const auto acc = mu.scalar_type();
  SURGELLM_CHECK(acc == at::kFloat || acc == at::kDouble, "mu must be float32 or float64");
  SURGELLM_CHECK(mu.is_contiguous(), "mu must be contiguous");
  check_tensor(sums, "sums", mu, {2, T, F}, acc);
  check_optional(param_sums, "param_sums", mu, {2, T, F}, acc);
  check_tensor(sigma, "sigma", mu, {T, F}, acc);
  check_optional(weight, "weight", mu, {F}, acc);
  const bool training = count.has_value();
  SURGELLM_CHECK(training == group_mean.has_value() && training == group_std.has_value() &&
                     training == mean_residual.has_value(),
                 "count, group_mean, group_std and mean_residual must be given together (training) "
                 "or not at all");
  const int64_t K = training ? count->numel() : 0;
  SURGELLM_CHECK(K % T == 0, "num_tasks (", T, ") must divide the number of groups (", K, ")");
  check_optional(count, "count", mu, {K}, acc);
  check_optional(group_mean, "group_mean", mu, {K, F}, acc);
  check_optional(group_std, "group_std", mu, {K, F}, acc);
  check_optional(mean_residual, "mean_residual", mu, {K, F}, acc);
  const auto opts = mu.options();
  Tensor scale = at::empty({T, F}, opts), dy_shift = at::empty({K, F}, opts),
         dev_coef = at::empty({K, F}, opts), center = at::empty({K, F}, opts),
         dweight = at::empty({F}, opts), dbias = at::empty({F}, opts),
         du_dot_u = at::empty({F}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "iwn_coefficients", [&] {
    const IWNCoefficientsArgs<scalar_t> a{sums.const_data_ptr<scalar_t>(),
                                          param_sums.has_value()
                                              ? param_sums->const_data_ptr<scalar_t>()
                                              : sums.const_data_ptr<scalar_t>(),
                                          F,
                                          T,
                                          training ? K / T : 1,
                                          training,
                                          pooled,
                                          static_cast<scalar_t>(eps),
                                          ptr_or_null<scalar_t>(weight),
                                          ptr_or_null<scalar_t>(count),
                                          ptr_or_null<scalar_t>(group_mean),
                                          ptr_or_null<scalar_t>(group_std),
                                          ptr_or_null<scalar_t>(mean_residual),
                                          mu.const_data_ptr<scalar_t>(),
                                          sigma.const_data_ptr<scalar_t>(),
                                          scale.mutable_data_ptr<scalar_t>(),
                                          dy_shift.mutable_data_ptr<scalar_t>(),
                                          dev_coef.mutable_data_ptr<scalar_t>(),
                                          center.mutable_data_ptr<scalar_t>(),
                                          dweight.mutable_data_ptr<scalar_t>(),
                                          dbias.mutable_data_ptr<scalar_t>(),
                                          du_dot_u.mutable_data_ptr<scalar_t>()};
    run_phase("coefficients", mu, a, [&] { SURGELLM_CPU_KERNEL(iwn_coefficients, scalar_t, a); });
  });
  return {scale, dy_shift, dev_coef, center, dweight, dbias, du_dot_u};
}

std::tuple<Tensor, Tensor> iwn_input_grad(const Tensor& dy, const Tensor& x,
                                          const optional<Tensor>& keys,
                                          const optional<Tensor>& gate, const Tensor& scale,
                                          const Tensor& dy_shift, const Tensor& dev_coef,
                                          const Tensor& center, const Tensor& du_dot_u,
                                          int64_t key_div, bool training) {
  const int64_t T = num_tasks_of(scale, x, "scale");
  SURGELLM_CHECK(key_div >= 1, "key_div must be positive, got ", key_div);
  const auto acc = check_rows(x, keys, gate, T * key_div);
  const int64_t F = x.size(1), K = training ? T * key_div : 0;
  check_tensor(dy, "grad_y", x, x.sizes(), x.scalar_type());
  check_tensor(scale, "scale", x, {T, F}, acc);
  check_tensor(dy_shift, "dy_shift", x, {K, F}, acc);
  check_tensor(dev_coef, "dev_coef", x, {K, F}, acc);
  check_tensor(center, "center", x, {K, F}, acc);
  check_tensor(du_dot_u, "du_dot_u", x, {F}, acc);
  Tensor dx = empty_output_like(x);
  Tensor dgate =
      gate.has_value() ? empty_output_like(*gate) : at::empty({0}, x.options().dtype(acc));
  if (x.size(0) == 0) {
    dgate.zero_();
    return {dx, dgate};
  }
  const bool vec_gate = gate.has_value() && gate->dim() == 1;
  SURGELLM_DISPATCH_FLOATS(x, "iwn_input_grad", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const IWNInputGradArgs<acc_t> a{
        rows_args<acc_t>(x, keys, gate),
        dy.const_data_ptr(),
        T,
        key_div,
        training,
        scale.const_data_ptr<acc_t>(),
        dy_shift.const_data_ptr<acc_t>(),
        dev_coef.const_data_ptr<acc_t>(),
        center.const_data_ptr<acc_t>(),
        du_dot_u.const_data_ptr<acc_t>(),
        dx.mutable_data_ptr(),
        gate.has_value() && !vec_gate ? dgate.mutable_data_ptr() : nullptr,
        vec_gate ? dgate.mutable_data_ptr<acc_t>() : nullptr};
    run_phase("input_grad", x, a, [&] { SURGELLM_CPU_KERNEL(iwn_input_grad, scalar_t, a); });
  });
  return {dx, dgate};
}

// -- row keys ----------------------------------------------------------------------

void check_index(const optional<Tensor>& t, const char* name, int64_t N) {
  if (!t.has_value()) return;
  SURGELLM_CHECK(t->scalar_type() == at::kLong, name, " must be an int64 tensor, got ",
                 t->scalar_type());
  SURGELLM_CHECK(t->dim() == 1 && t->size(0) == N, name, " must have shape (", N, "), got ",
                 t->sizes());
}

// Row keys from int64 labels / task ids: task * C + label in training (labels
// given), task in eval. On the CPU one pass that also range-checks, raising
// ValueError naming the argument.
Tensor iwn_group_keys_cpu(const optional<Tensor>& labels, const optional<Tensor>& task_ids,
                          int64_t num_tasks, int64_t num_classes) {
  SURGELLM_CHECK(labels.has_value() || task_ids.has_value(), "labels or task_ids are required");
  const Tensor& first = labels.has_value() ? *labels : *task_ids;
  const int64_t N = first.numel();
  check_index(labels, "labels", N);
  check_index(task_ids, "task_ids", N);
  const Tensor lab_c = labels.has_value() ? labels->contiguous() : Tensor();
  const Tensor task_c = task_ids.has_value() ? task_ids->contiguous() : Tensor();
  const int64_t* lab = lab_c.defined() ? lab_c.const_data_ptr<int64_t>() : nullptr;
  const int64_t* task = task_c.defined() ? task_c.const_data_ptr<int64_t>() : nullptr;
  Tensor keys = at::empty({N}, first.options().dtype(at::kInt));
  int32_t* out = keys.mutable_data_ptr<int32_t>();
  int64_t lab_lo = 0, lab_hi = 0, task_lo = 0, task_hi = 0;
  if (N > 0) {
    if (lab) lab_lo = lab_hi = lab[0];
    if (task) task_lo = task_hi = task[0];
  }
  // Keys are formed before the ranges are known: in unsigned arithmetic, so
  // that an out-of-range value (refused below) wraps rather than overflows.
  const uint64_t task_stride = static_cast<uint64_t>(lab ? num_classes : 1);
  for (int64_t i = 0; i < N; ++i) {
    uint64_t key = 0;
    if (lab) {
      lab_lo = std::min(lab_lo, lab[i]);
      lab_hi = std::max(lab_hi, lab[i]);
      key = static_cast<uint64_t>(lab[i]);
    }
    if (task) {
      task_lo = std::min(task_lo, task[i]);
      task_hi = std::max(task_hi, task[i]);
      key += static_cast<uint64_t>(task[i]) * task_stride;
    }
    out[i] = static_cast<int32_t>(static_cast<uint32_t>(key));
  }
  if (N > 0) {
    SURGELLM_CHECK_VALUE(!lab || (lab_lo >= 0 && lab_hi < num_classes), "labels must lie in [0, ",
                         num_classes, "), got values in [", lab_lo, ", ", lab_hi, "]");
    SURGELLM_CHECK_VALUE(!task || (task_lo >= 0 && task_hi < num_tasks),
                         "task_ids must lie in [0, ", num_tasks, "), got values in [", task_lo,
                         ", ", task_hi, "]");
  }
  return keys;
}

// The same keys on any other device. The ranges are checked before any
// kernel runs, as on the CPU: the labels' and task ids' (min, max) come back
// in one device-to-host copy (a host sync). Under CUDA graph capture a sync is
// not allowed: there the check is skipped and an out-of-range label or task
// id gives key -1, a row the kernels leave out of the statistics (NaN outputs).
void check_ranges_on_device(const optional<Tensor>& labels, const optional<Tensor>& task_ids,
                            int64_t num_tasks, int64_t num_classes) {
  const Tensor& first = labels.has_value() ? *labels : *task_ids;
  if (first.numel() == 0 || capturing_cuda_graph(first)) return;
  std::vector<Tensor> given;
  std::vector<std::pair<const char*, int64_t>> names;  // name, upper bound
  if (labels.has_value()) {
    given.push_back(*labels);
    names.emplace_back("labels", num_classes);
  }
  if (task_ids.has_value()) {
    given.push_back(*task_ids);
    names.emplace_back("task_ids", num_tasks);
  }
  const std::vector<int64_t> bounds = min_max_on_host(given);
  for (size_t i = 0; i < names.size(); ++i) {
    const auto [name, upper] = names[i];
    const int64_t lo = bounds[2 * i], hi = bounds[2 * i + 1];
    SURGELLM_CHECK_VALUE(lo >= 0 && hi < upper, name, " must lie in [0, ", upper,
                         "), got values in [", lo, ", ", hi, "]");
  }
}

Tensor iwn_group_keys_device(const optional<Tensor>& labels, const optional<Tensor>& task_ids,
                             int64_t num_tasks, int64_t num_classes) {
  SURGELLM_CHECK(labels.has_value() || task_ids.has_value(), "labels or task_ids are required");
  const int64_t N = (labels.has_value() ? *labels : *task_ids).numel();
  check_index(labels, "labels", N);
  check_index(task_ids, "task_ids", N);
  check_ranges_on_device(labels, task_ids, num_tasks, num_classes);
  Tensor key, valid;
  if (labels.has_value()) {
    key = *labels;
    valid = labels->ge(0).logical_and_(labels->lt(num_classes));
  }
  if (task_ids.has_value()) {
    const Tensor task_valid = task_ids->ge(0).logical_and_(task_ids->lt(num_tasks));
    key = key.defined() ? *task_ids * num_classes + key : *task_ids;
    valid = valid.defined() ? valid.logical_and_(task_valid) : task_valid;
  }
  return at::where(valid, key, -1).to(at::kInt);
}

// The phase entry points serve both device types (run_phase picks the kernel).
void impl_phase_kernels(torch::Library& m) {
  m.impl("_iwn_group_moments", &iwn_group_moments);
  m.impl("_iwn_merge_moments", &iwn_merge_moments);
  m.impl("_iwn_combine", &iwn_combine);
  m.impl("_iwn_apply", &iwn_apply);
  m.impl("_iwn_task_sums", &iwn_task_sums);
  m.impl("_iwn_coefficients", &iwn_coefficients);
  m.impl("_iwn_input_grad", &iwn_input_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(surgellm, CPU, m) {
  m.impl("_iwn_group_keys", &iwn_group_keys_cpu);
  impl_phase_kernels(m);
}

// The keys need no kernel of ours on CUDA (ATen ops): registered even
// without the CUDA kernels.
TORCH_LIBRARY_IMPL(surgellm, CUDA, m) {
  m.impl("_iwn_group_keys", &iwn_group_keys_device);
#ifdef SURGELLM_WITH_CUDA
  impl_phase_kernels(m);
#endif
}

}  // namespace surgellm
