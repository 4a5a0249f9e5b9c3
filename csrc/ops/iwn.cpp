// fused_iwn as dispatcher ops: the schemas, the op users call
// (surgellm::iwn), and its one autograd implementation.
//
// surgellm::iwn runs in phases, each an op of its own with a CPU and a CUDA
// kernel (iwn_kernels.cpp), a Triton kernel registered for CUDA from Python
// when Triton is the chosen backend, and a fake kernel for torch.compile
// (surgellm_kernels/ops/iwn.py):
//   forward:  group_keys -> group_moments -> combine (mu, sigma, running update) -> apply
//   backward: task_sums -> coefficients -> input_grad
// With a process group (group_name, group_size > 1) a training call makes
// the statistics those of every rank's rows together: one all-gather of the
// per-(task, class) moments before combine, and in backward one all-reduce
// of the per-task sums before coefficients. The autograd kernel below serves
// eager mode and torch.compile alike (AOTAutograd traces through it).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/TensorSubclassLikeUtils.h>

#include <exception>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops/kernel_call.h"

namespace surgellm {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// -- calls through the dispatcher (which picks the CPU, CUDA, Triton or fake kernel)

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor group_keys(const optional<Tensor>& labels, const optional<Tensor>& task_ids,
                  int64_t num_tasks, int64_t num_classes) {
  static const auto h = op<Tensor(const optional<Tensor>&, const optional<Tensor>&, int64_t,
                                  int64_t)>("surgellm::iwn_group_keys");
  return h.call(labels, task_ids, num_tasks, num_classes);
}

using Moments = std::tuple<Tensor, Tensor, Tensor, Tensor>;
Moments group_moments(const Tensor& x, const optional<Tensor>& keys,
                      const optional<Tensor>& gate, int64_t num_groups) {
  static const auto h =
      op<Moments(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, int64_t)>(
          "surgellm::iwn_group_moments");
  return h.call(x, keys, gate, num_groups);
}

std::tuple<Tensor, Tensor, Tensor> combine(const Moments& moments, int64_t num_tasks, bool pooled,
                                           double momentum, const optional<Tensor>& running_mean,
                                           const optional<Tensor>& running_std) {
  static const auto h = op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool, double,
      const optional<Tensor>&, const optional<Tensor>&)>("surgellm::iwn_combine");
  const auto& [count, mean, m2, mean_residual] = moments;
  return h.call(count, mean, m2, mean_residual, num_tasks, pooled, momentum, running_mean,
                running_std);
}

Tensor apply(const Tensor& x, const optional<Tensor>& keys, const optional<Tensor>& gate,
             const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& mu,
             const Tensor& sigma, int64_t key_div, double eps) {
  static const auto h =
      op<Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&,
                int64_t, double)>("surgellm::iwn_apply");
  return h.call(x, keys, gate, weight, bias, mu, sigma, key_div, eps);
}

Tensor task_sums(const Tensor& dy, const Tensor& x, const optional<Tensor>& keys,
                 const optional<Tensor>& gate, const Tensor& mu, int64_t key_div) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const optional<Tensor>&,
                                  const optional<Tensor>&, const Tensor&, int64_t)>(
      "surgellm::iwn_task_sums");
  return h.call(dy, x, keys, gate, mu, key_div);
}

using Coefficients = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
Coefficients coefficients(const Tensor& sums, const optional<Tensor>& weight,
                          const optional<Tensor>& count, const optional<Tensor>& group_mean,
                          const optional<Tensor>& group_std,
                          const optional<Tensor>& mean_residual, const Tensor& mu,
                          const Tensor& sigma, bool pooled, double eps) {
  static const auto h =
      op<Coefficients(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                      const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                      const Tensor&, const Tensor&, bool, double)>("surgellm::iwn_coefficients");
  return h.call(sums, weight, count, group_mean, group_std, mean_residual, mu, sigma, pooled,
                eps);
}

std::tuple<Tensor, Tensor> input_grad(const Tensor& dy, const Tensor& x,
                                      const optional<Tensor>& keys, const optional<Tensor>& gate,
                                      const Tensor& scale, const Tensor& dy_shift,
                                      const Tensor& dev_coef, const Tensor& center,
                                      const Tensor& du_dot_u, int64_t key_div, bool training) {
  static const auto h = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool)>(
      "surgellm::iwn_input_grad");
  return h.call(dy, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u, key_div,
                training);
}

// -- data parallel: torch's functional collectives, through the dispatcher ---------------
// They run on the process group's own backend (gloo, NCCL) and are traced by
// torch.compile like any op. No weight, bias or gate gradient is reduced
// here: DistributedDataParallel does that.

// The process group of a synchronized call, as torch's group registry names it.
struct RankGroup {
  std::string name;
  int64_t size;
};

optional<RankGroup> rank_group(const optional<c10::string_view>& name, int64_t size) {
  if (!name.has_value() || size <= 1) return std::nullopt;
  return RankGroup{std::string(*name), size};
}

// Boxed calls: the schemas' group argument is `str` in some torch releases
// and `Any` in others; a boxed call passes the name either way.
Tensor call_and_wait(const c10::OperatorHandle& collective, torch::jit::Stack stack) {
  static const auto wait =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  collective.callBoxed(stack);
  wait.callBoxed(stack);  // stack: the collective's result, waited on
  return stack.at(0).toTensor();
}

// (size * numel) values: every rank's t, in rank order.
Tensor all_gather(const Tensor& t, const RankGroup& g) {
  static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(
      "_c10d_functional::all_gather_into_tensor", "");
  return call_and_wait(h, {t, g.size, g.name});
}

Tensor all_reduce_sum(const Tensor& t, const RankGroup& g) {
  static const auto h =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce", "");
  return call_and_wait(h, {t, "sum", g.name});
}

// The moments of every rank's rows together, from one all-gather of each
// rank's (count, mean, M2, mean residual) per group and a flag saying
// whether its own phases failed. Every rank merges the same gathered values
// in the same order, so every rank gets the same statistics (and running
// statistics). With n = sum_r n_r:
//   mean = sum_r (n_r / n) m_r,
//   M2 = sum_r M2_r + n_r (m_r - mean) (m_r - mean + 2 residual_r)
//        (about mean exactly, cross term included: merge_about of iwn_math.h),
//   residual = sum_r (n_r / n) (m_r - mean + residual_r)
// (the residual keeps the exact mean, mean + residual, for backward). A rank
// without rows of a group sends n_r = 0 and zeros, which add nothing.
// Returns the merged moments and the ranks that flagged a failure (read
// back: one more host sync on CUDA, after the range checks' own).
std::pair<Moments, std::vector<int64_t>> moments_of_all_ranks(const Moments& local, bool failed,
                                                              const RankGroup& g) {
  const auto& [count, mean, m2, residual] = local;
  const c10::SymInt G = mean.sym_size(0), F = mean.sym_size(1);
  const Tensor flag = at::full({1}, failed ? 1 : 0, count.options());
  const Tensor packed =
      at::cat({flag, count, mean.reshape(-1), m2.reshape(-1), residual.reshape(-1)});
  const Tensor per_rank = all_gather(packed, g).view_symint({g.size, -1});
  std::vector<int64_t> failed_ranks;
  const Tensor flags = per_rank.select(1, 0);
  // Not while tracing, nor under CUDA graph capture (no range check fails
  // there); read back in one copy.
  if (!at::isTensorSubclassLike(flags) && !capturing_cuda_graph(flags)) {
    const Tensor host = flags.to(at::kCPU, at::kDouble).contiguous();
    const double* flag = host.const_data_ptr<double>();
    for (int64_t r = 0; r < g.size; ++r)
      if (flag[r] != 0) failed_ranks.push_back(r);
  }
  const Tensor n = per_rank.narrow_symint(1, 1, G).unsqueeze(-1);  // (R, G, 1)
  const Tensor rest = per_rank.narrow_symint(1, G + 1, 3 * G * F).view_symint({g.size, 3, G, F});
  const Tensor total = n.sum(0);                                      // (G, 1)
  const Tensor frac = n / total.clamp_min(1);
  const Tensor mean_all = (frac * rest.select(1, 0)).sum(0);
  const Tensor dev = rest.select(1, 0) - mean_all;
  const Tensor m2_all = (rest.select(1, 1) + n * dev * (dev + 2 * rest.select(1, 2))).sum(0);
  const Tensor residual_all = (frac * (dev + rest.select(1, 2))).sum(0);
  return {{total.view_symint({G}), mean_all, m2_all, residual_all}, failed_ranks};
}

// -- the forward, phase by phase -------------------------------------------------------

at::ScalarType accumulation_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

optional<Tensor> flat(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(t->reshape(-1)) : std::nullopt;
}

// What the phases take: contiguous (N, F) rows, a (F) gate, weight and bias
// in the accumulation type (any stride accepted here), a per-instance gate as
// (N, F) rows of x's type.
struct PhaseInputs {
  Tensor x;
  optional<Tensor> gate, weight, bias;
};

PhaseInputs phase_inputs(const Tensor& x, const optional<Tensor>& gate,
                         const optional<Tensor>& weight, const optional<Tensor>& bias) {
  const auto acc = accumulation_type(x);
  const c10::SymInt F = x.sym_size(-1);
  // Tensors already in the layout asked for are passed as they are: no
  // dispatcher round trip per argument on every call.
  auto vec = [&](const optional<Tensor>& t) -> optional<Tensor> {
    if (!t.has_value()) return std::nullopt;
    if (t->scalar_type() == acc && t->is_contiguous()) return t;
    return t->to(acc).contiguous();
  };
  auto rows = [&](const Tensor& t) {
    if (t.dim() == 2 && t.is_contiguous()) return t;
    return t.reshape_symint({-1, F}).contiguous();
  };
  optional<Tensor> gate2;
  if (gate.has_value()) gate2 = gate->dim() == 1 ? vec(gate) : rows(*gate);
  return {rows(x), gate2, vec(weight), vec(bias)};
}

struct ForwardResult {
  Tensor y;  // (N, F)
  optional<Tensor> keys;
  optional<Tensor> count, group_mean, group_std, mean_residual;  // training only
  Tensor mu, sigma;                               // (T, F) statistics used
  int64_t key_div;
};

// Running statistics are updated in place by the combine kernels, which take
// contiguous (T, F) buffers of the accumulation type; other layouts and
// dtypes go through a temporary copied back afterwards.
optional<Tensor> kernel_buffer(const optional<Tensor>& r, at::ScalarType acc) {
  if (!r.has_value() || (r->is_contiguous() && r->scalar_type() == acc)) return r;
  return r->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

// The op's own argument checks, before any phase runs (whichever backend's
// kernels the phases dispatch to): the Python wrapper checks the same with
// friendlier messages, these keep a direct torch.ops.surgellm.iwn call from
// handing a kernel a buffer of the wrong size.
void check_iwn_inputs(const Tensor& x, const optional<Tensor>& labels,
                      const optional<Tensor>& task_ids, const optional<Tensor>& gate,
                      const optional<Tensor>& weight, const optional<Tensor>& bias,
                      const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                      bool training, int64_t T, int64_t C) {
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) > 0, "x must have shape (..., F) with F > 0");
  TORCH_CHECK(T >= 1 && C >= 1, "num_tasks and num_classes must be positive");
  const c10::SymInt F = x.sym_size(-1);
  const auto rows = x.sym_sizes().slice(0, x.dim() - 1);
  for (const auto& [t, name] : {std::pair{labels, "labels"}, std::pair{task_ids, "task_ids"}})
    if (t.has_value())
      TORCH_CHECK(t->scalar_type() == at::kLong && t->sym_sizes() == rows, name,
                  " must be an int64 tensor of shape x.shape[:-1]");
  if (gate.has_value())
    TORCH_CHECK((gate->dim() == 1 && gate->sym_size(0) == F) || gate->sym_sizes() == x.sym_sizes(),
                "gate must have shape (F,) or the shape of x");
  for (const auto& [t, name] : {std::pair{weight, "weight"}, std::pair{bias, "bias"}})
    if (t.has_value()) TORCH_CHECK(t->dim() == 1 && t->sym_size(0) == F, name, " must have shape (F,)");
  TORCH_CHECK(running_mean.has_value() == running_std.has_value(),
              "running_mean and running_std must be given together");
  for (const auto* r : {&running_mean, &running_std})
    if (r->has_value())
      TORCH_CHECK((*r)->sym_size(-1) == F && (*r)->sym_numel() == F * T,
                  "running statistics must have shape (num_tasks, F) or, with one task, (F,)");
  TORCH_CHECK(!training || labels.has_value(), "labels are required in training");
  TORCH_CHECK(training || running_mean.has_value(),
              "running_mean and running_std are required when training=False");
}

// for_backward: autograd records the call, so eval keeps its own copy of
// the running statistics (backward must see those of this call, not a later
// update); otherwise they are read where they are.
ForwardResult forward_phases(const PhaseInputs& in, const optional<Tensor>& labels,
                             const optional<Tensor>& task_ids,
                             const optional<Tensor>& running_mean,
                             const optional<Tensor>& running_std, bool training, double momentum,
                             double eps, bool pooled, int64_t T, int64_t C,
                             const optional<RankGroup>& ranks, bool for_backward) {
  const auto acc = accumulation_type(in.x);
  ForwardResult r;
  if (training) {
    auto moments_of_rows = [&] {
      r.keys = group_keys(flat(labels), flat(task_ids), T, C);
      return group_moments(in.x, r.keys, in.gate, T * C);
    };
    Moments moments;
    if (!ranks.has_value()) {
      moments = moments_of_rows();
    } else {
      // A rank whose rows fail a check (a label or task id out of range)
      // still takes part in the all-gather, flagged, and then
      // every rank raises: none is left waiting in a collective.
      std::exception_ptr failure;
      try {
        moments = moments_of_rows();
      } catch (const c10::Error&) {
        failure = std::current_exception();
        const auto opts = in.x.options().dtype(acc);
        const Tensor zeros = at::zeros_symint({T * C, in.x.sym_size(1)}, opts);
        moments = {at::zeros({T * C}, opts), zeros, zeros, zeros};
      }
      std::vector<int64_t> failed_ranks;
      std::tie(moments, failed_ranks) = moments_of_all_ranks(moments, failure != nullptr, *ranks);
      if (failure) std::rethrow_exception(failure);
      TORCH_CHECK_VALUE(failed_ranks.empty(), "fused_iwn: the call failed its checks on rank(s) ",
                        c10::IntArrayRef(failed_ranks),
                        " of process_group (their own errors say why); nothing "
                        "was updated here either");
    }
    auto [count, mean, m2, mean_residual] = moments;
    const auto rm = kernel_buffer(running_mean, acc), rs = kernel_buffer(running_std, acc);
    auto [group_std, mu, sigma] = combine(moments, T, pooled, momentum, rm, rs);
    for (const auto& [buffer, running] : {std::pair{rm, running_mean}, std::pair{rs, running_std}})
      if (buffer.has_value() && !buffer->is_same(*running))
        running->copy_(buffer->view_symint(running->sym_sizes()));
    r.count = count;
    r.group_mean = mean;
    r.group_std = group_std;
    r.mean_residual = mean_residual;
    r.mu = mu;
    r.sigma = sigma;
    r.key_div = C;
  } else {
    if (task_ids.has_value()) r.keys = group_keys(std::nullopt, flat(task_ids), T, 1);
    const c10::SymInt F = in.x.sym_size(1);
    auto stats = [&](const Tensor& s) {
      if (!for_backward && s.scalar_type() == acc && s.is_contiguous())
        return s.dim() == 2 ? s : s.view_symint({T, F});
      return s.reshape_symint({T, F}).to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    };
    r.mu = stats(*running_mean);
    r.sigma = stats(*running_std);
    r.key_div = 1;
  }
  r.y = apply(in.x, r.keys, in.gate, in.weight, in.bias, r.mu, r.sigma, r.key_div, eps);
  return r;
}

// The op without autograd: inference mode, and the Meta / fake path.
Tensor iwn_composite(const Tensor& x, const optional<Tensor>& labels,
                     const optional<Tensor>& task_ids, const optional<Tensor>& gate,
                     const optional<Tensor>& weight, const optional<Tensor>& bias,
                     const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                     bool training, double momentum, double eps, bool pooled, int64_t num_tasks,
                     int64_t num_classes, optional<c10::string_view> group_name,
                     int64_t group_size) {
  check_iwn_inputs(x, labels, task_ids, gate, weight, bias, running_mean, running_std, training,
                   num_tasks, num_classes);
  const auto r = forward_phases(phase_inputs(x, gate, weight, bias), labels, task_ids,
                                running_mean, running_std, training, momentum, eps, pooled,
                                num_tasks, num_classes, rank_group(group_name, group_size),
                                /*for_backward=*/false);
  return x.dim() == 2 ? r.y : r.y.view_symint(x.sym_sizes());
}

// -- autograd ---------------------------------------------------------------------------

class IWNFunction : public torch::autograd::Function<IWNFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& labels,
                        const optional<Tensor>& task_ids, const optional<Tensor>& gate,
                        const optional<Tensor>& weight, const optional<Tensor>& bias,
                        const optional<Tensor>& running_mean,
                        const optional<Tensor>& running_std, bool training, double momentum,
                        double eps, bool pooled, int64_t num_tasks, int64_t num_classes,
                        optional<c10::string_view> group_name, int64_t group_size) {
    check_iwn_inputs(x, labels, task_ids, gate, weight, bias, running_mean, running_std, training,
                     num_tasks, num_classes);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const PhaseInputs in = phase_inputs(x, gate, weight, bias);
    const auto ranks = training ? rank_group(group_name, group_size) : std::nullopt;
    const auto r = forward_phases(in, labels, task_ids, running_mean, running_std, training,
                                  momentum, eps, pooled, num_tasks, num_classes, ranks,
                                  /*for_backward=*/true);
    auto or_undefined = [](const optional<Tensor>& t) { return t.value_or(Tensor()); };
    // The inputs themselves are saved where the phases read them in place
    // (backward re-derives the same views), so that autograd's version check
    // sees an in-place change of x, the gate or the weight before backward;
    // copies made for the phases are saved as they are.
    auto input = [](const optional<Tensor>& phase, const optional<Tensor>& given) {
      if (!phase.has_value()) return Tensor();
      return phase->is_alias_of(*given) ? *given : *phase;
    };
    ctx->save_for_backward({input(in.x, x), or_undefined(r.keys), input(in.gate, gate),
                            input(in.weight, weight), or_undefined(r.count),
                            or_undefined(r.group_mean), or_undefined(r.group_std),
                            or_undefined(r.mean_residual), r.mu, r.sigma});
    ctx->saved_data["x_sizes"] = x.sym_sizes();
    ctx->saved_data["training"] = training;
    ctx->saved_data["pooled"] = pooled;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["key_div"] = r.key_div;
    ctx->saved_data["has_bias"] = bias.has_value();
    if (ranks.has_value()) {
      ctx->saved_data["group_name"] = ranks->name;
      ctx->saved_data["group_size"] = ranks->size;
    }
    return x.dim() == 2 ? r.y : r.y.view_symint(x.sym_sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The backward phases are not differentiable: with create_graph, a
    // second derivative through them would silently be missing, so refuse.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused_iwn has no double backward (backward with create_graph=True)");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto saved = ctx->get_saved_variables();
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    const PhaseInputs in = phase_inputs(saved[0], opt(saved[2]), opt(saved[3]), std::nullopt);
    const Tensor& x = in.x;
    const optional<Tensor> keys = opt(saved[1]), gate = in.gate, weight = in.weight;
    const bool training = ctx->saved_data["training"].toBool();
    const bool pooled = ctx->saved_data["pooled"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t key_div = ctx->saved_data["key_div"].toInt();
    const auto x_sizes = ctx->saved_data["x_sizes"].toSymIntVector();
    const Tensor dy = grad_outputs[0].reshape_symint(x.sym_sizes()).contiguous();
    const Tensor& mu = saved[8];
    const Tensor& sigma = saved[9];
    const Tensor sums = task_sums(dy, x, keys, gate, mu, key_div);
    auto coefficients_of = [&](const Tensor& s) {
      return coefficients(s, weight, opt(saved[4]), opt(saved[5]), opt(saved[6]), opt(saved[7]),
                          mu, sigma, pooled, eps);
    };
    auto [scale, dy_shift, dev_coef, center, dweight, dbias, du_dot_u] = coefficients_of(sums);
    if (ctx->saved_data.count("group_name")) {
      // The rows' gradients need every rank's sums (the statistics are
      // shared); weight, bias and a (F) gate keep this rank's share, linear
      // in its own sums, which DistributedDataParallel adds up.
      const RankGroup ranks{ctx->saved_data["group_name"].toStringRef(),
                            ctx->saved_data["group_size"].toInt()};
      std::tie(scale, dy_shift, dev_coef, center, std::ignore, std::ignore, std::ignore) =
          coefficients_of(all_reduce_sum(sums, ranks));
    }
    auto [dx, dgate] = input_grad(dy, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u,
                                  key_div, training);
    Tensor dgate_out;
    if (gate.has_value()) dgate_out = gate->dim() == 1 ? dgate : dgate.view_symint(x_sizes);
    return {dx.view_symint(x_sizes),
            Tensor(),
            Tensor(),
            dgate_out,
            weight.has_value() ? dweight : Tensor(),
            ctx->saved_data["has_bias"].toBool() ? dbias : Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

Tensor iwn_autograd(const Tensor& x, const optional<Tensor>& labels,
                    const optional<Tensor>& task_ids, const optional<Tensor>& gate,
                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                    bool training, double momentum, double eps, bool pooled, int64_t num_tasks,
                    int64_t num_classes, optional<c10::string_view> group_name,
                    int64_t group_size) {
  if (!autograd_records(x, gate, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return iwn_composite(x, labels, task_ids, gate, weight, bias, running_mean, running_std,
                         training, momentum, eps, pooled, num_tasks, num_classes, group_name,
                         group_size);
  }
  return IWNFunction::apply(x, labels, task_ids, gate, weight, bias, running_mean, running_std,
                            training, momentum, eps, pooled, num_tasks, num_classes, group_name,
                            group_size);
}

}  // namespace

TORCH_LIBRARY(surgellm, m) {
  // x (..., F); labels, task_ids int64 of x.shape[:-1]; gate (F) or x's shape;
  // running statistics (F) or (num_tasks, F), updated in place in training.
  // group_name / group_size: a process group (torch.distributed's registered
  // name) whose ranks' rows share the training statistics; none, or size 1,
  // communicates nothing.
  m.def(
      "iwn(Tensor x, Tensor? labels, Tensor? task_ids, Tensor? gate, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_std, bool training, "
      "float momentum, float eps, bool pooled, int num_tasks, int num_classes, "
      "str? group_name=None, int group_size=1) -> Tensor");
  // The phases: x (N, F) contiguous, keys (N) int32, every statistic in the
  // accumulation dtype (see csrc/include/iwn_args.h).
  m.def("iwn_group_keys(Tensor? labels, Tensor? task_ids, int num_tasks, int num_classes) -> Tensor");
  m.def(
      "iwn_group_moments(Tensor x, Tensor? keys, Tensor? gate, int num_groups) -> "
      "(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual)");
  m.def(
      "iwn_combine(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual, int num_tasks, "
      "bool pooled, "
      "float momentum, Tensor(a!)? running_mean, Tensor(b!)? running_std) -> "
      "(Tensor group_std, Tensor mu, Tensor sigma)");
  m.def(
      "iwn_apply(Tensor x, Tensor? keys, Tensor? gate, Tensor? weight, Tensor? bias, Tensor mu, "
      "Tensor sigma, int key_div, float eps) -> Tensor");
  m.def(
      "iwn_task_sums(Tensor grad_y, Tensor x, Tensor? keys, Tensor? gate, Tensor mu, "
      "int key_div) -> Tensor");
  m.def(
      "iwn_coefficients(Tensor sums, Tensor? weight, Tensor? count, Tensor? group_mean, "
      "Tensor? group_std, Tensor? mean_residual, Tensor mu, Tensor sigma, bool pooled, "
      "float eps) -> (Tensor scale, "
      "Tensor dy_shift, Tensor dev_coef, Tensor center, Tensor dweight, Tensor dbias, "
      "Tensor du_dot_u)");
  m.def(
      "iwn_input_grad(Tensor grad_y, Tensor x, Tensor? keys, Tensor? gate, Tensor scale, "
      "Tensor dy_shift, Tensor dev_coef, Tensor center, Tensor du_dot_u, int key_div, "
      "bool training) -> (Tensor dx, Tensor dgate)");
}

TORCH_LIBRARY_IMPL(surgellm, CompositeExplicitAutograd, m) {
  m.impl("iwn", &iwn_composite);
}

TORCH_LIBRARY_IMPL(surgellm, Autograd, m) {
  m.impl("iwn", &iwn_autograd);
}

}  // namespace surgellm
