// fused_iwn as dispatcher ops: the schemas, the argument checks
// (check_iwn_args, the only copy), the op users call (surgellm::iwn) and its
// one autograd implementation.
//
// surgellm::iwn runs in phases, each an op of its own (leading `_`) with a
// CPU and a CUDA kernel (iwn_kernels.cpp), Triton kernels for the row passes
// registered for CUDA from Python when Triton is the chosen backend, and a
// fake kernel for torch.compile (surgellm_kernels/ops/iwn.py):
//   forward:  group_keys -> group_moments -> combine (mu, sigma, running update) -> apply
//   backward: task_sums -> coefficients -> input_grad
// With a process group (group_name, group_size > 1) a training call makes
// the statistics those of every rank's rows together: one all-gather of the
// per-(task, class) moments, merged by _iwn_merge_moments, before combine;
// in backward one all-reduce of the per-task sums before coefficients. The
// autograd kernel serves eager mode and torch.compile alike (AOTAutograd
// traces through it).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <exception>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/arg_checks.h"
#include "common/kernel_call.h"

namespace surgellm {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// -- the argument checks ----------------------------------------------------------------

// A synchronized call's process group, as torch's group registry names it.
struct RankGroup {
  std::string name;
  int64_t size;
};

// Each row's (task, class) group is an int32 key in [0, num_tasks * num_classes).
constexpr int64_t kMaxKeys = int64_t(1) << 31;
// At most this many values in each per-group statistic (groups x F): 256 MiB
// of float32, about 87,000 classes of 768 features.
constexpr int64_t kMaxGroupValues = int64_t(1) << 26;

// The statistics' dtype: float64 for float64 x, else float32.
at::ScalarType accumulation_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// What a valid call computes with.
struct IWNCall {
  int64_t num_tasks, num_classes;  // num_classes: 1 when not training
  bool pooled;
  optional<RankGroup> ranks;  // training over several ranks
  int64_t feature_dim;        // of x, in [0, x.dim())
};

// `what` (a count) read from the data: one more than the largest value of
// the index tensor t (argument `name`, of `kind` indices), which must be a
// valid key part. Eager only: a trace has no data, and the call must then
// say what it would have read.
int64_t count_from_data(const Tensor& t, const char* name, const char* kind, const char* what) {
  SURGELLM_CHECK_VALUE(
      !at::isTensorSubclassLike(t), what,
      " cannot be read from the data of a traced or meta tensor (torch.compile, a torch.func "
      "transform, the meta device): pass it");
  const int64_t hi = min_max_on_host({t})[1];
  SURGELLM_CHECK_VALUE(hi >= 0 && hi < kMaxKeys, name, " must be ", kind, " indices in [0, ",
                       kMaxKeys, "), got values up to ", hi);
  return hi + 1;
}

IWNCall check_iwn_args(const Tensor& x, const optional<Tensor>& labels,
                       const optional<Tensor>& gate, const optional<Tensor>& weight,
                       const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                       const optional<Tensor>& running_std, const optional<Tensor>& task_ids,
                       bool training, double momentum, double eps, c10::string_view std_mode,
                       optional<int64_t> num_classes, optional<int64_t> num_tasks,
                       const optional<c10::string_view>& group_name, int64_t group_size,
                       int64_t feature_dim) {
  SURGELLM_CHECK_VALUE(group_size >= 1, "group_size must be positive, got ", group_size);
  IWNCall call{1, 1, std_mode == "pooled", std::nullopt, -1};
  if (training && group_name.has_value() && group_size > 1)
    call.ranks = RankGroup{std::string(*group_name), group_size};
  const bool synced = call.ranks.has_value();
  const char* task_count_source = "";  // where num_tasks came from, for the key bound's message

  check_float(x, "x");
  SURGELLM_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension (..., F), got a scalar");
  SURGELLM_CHECK_VALUE(feature_dim >= -x.dim() && feature_dim < x.dim(),
                       "feature_dim must lie in [", -x.dim(), ", ", x.dim(), ") for x of shape ",
                       shape_text(x.sym_sizes()), ", got ", feature_dim);
  const int64_t fd = feature_dim < 0 ? feature_dim + x.dim() : feature_dim;
  call.feature_dim = fd;
  const bool last = fd == x.dim() - 1;
  const c10::SymInt F = x.sym_size(fd);
  SURGELLM_CHECK_VALUE(F != 0, "x must have at least one feature (",
                       last ? std::string("last dimension") : text("x.shape[", fd, "]"),
                       " > 0), got shape ", shape_text(x.sym_sizes()));
  // the instances: every index before the features (each position after
  // them belongs to its instance)
  const c10::SymIntArrayRef rows = x.sym_sizes().slice(0, fd);
  const std::string rows_text = last ? "x.shape[:-1]" : text("x.shape[:", fd, "]");

  SURGELLM_CHECK_VALUE(std_mode == "class_mean" || std_mode == "pooled",
                       "std_mode must be one of ('class_mean', 'pooled'), got '", std_mode, "'");
  SURGELLM_CHECK_VALUE(!(eps < 0) && eps == eps, "eps must be a non-negative number, got ",
                       number_text(eps));
  check_eps_fits_float32(eps, /*zero_taken=*/true);
  SURGELLM_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0,
                       "momentum must be a number in [0, 1], got ", number_text(momentum));

  if (gate.has_value()) {
    SURGELLM_CHECK_VALUE(last,
                         "a gate needs the features in the last dimension of x "
                         "(feature_dim=-1), got feature_dim=",
                         feature_dim);
    check_float(*gate, "gate");
    check_device(*gate, "gate", x, "x");
    SURGELLM_CHECK_VALUE(
        (gate->dim() == 1 && gate->sym_size(0) == F) || gate->sym_sizes() == x.sym_sizes(),
        "gate must have shape (", F, ",) or the shape of x ", shape_text(x.sym_sizes()), ", got ",
        shape_text(gate->sym_sizes()));
    SURGELLM_CHECK_TYPE(!(gate->sym_sizes() == x.sym_sizes() && gate->dim() > 1 &&
                          gate->scalar_type() != x.scalar_type()),
                        "a per-instance gate must have the dtype of x (", dtype_text(x), "), got ",
                        dtype_text(*gate));
  }
  check_feature_param(weight, "weight", x, "x", F);
  check_feature_param(bias, "bias", x, "x", F);

  SURGELLM_CHECK_VALUE(running_mean.has_value() == running_std.has_value(),
                       "running_mean and running_std must be given together, got ",
                       running_std.has_value() ? "running_std" : "running_mean", " only");
  if (running_mean.has_value()) {
    for (const auto& [r, name] :
         {std::pair{&running_mean, "running_mean"}, std::pair{&running_std, "running_std"}}) {
      check_float(**r, name);
      check_device(**r, name, x, "x");
      // Buffers, as F.batch_norm's: the kernels give them no gradient,
      // which would otherwise be a silent None.
      SURGELLM_CHECK_VALUE(!(at::GradMode::is_enabled() && (*r)->requires_grad()), name,
                           " requires grad, but the running statistics are not differentiated "
                           "through (as in F.batch_norm): pass ",
                           name, ".detach()");
      SURGELLM_CHECK_VALUE(((*r)->dim() == 1 || (*r)->dim() == 2) && (*r)->sym_size(-1) == F, name,
                           " must have shape (", F, ",) or (num_tasks, ", F, "), got ",
                           shape_text((*r)->sym_sizes()));
    }
    SURGELLM_CHECK_VALUE(running_mean->sym_sizes() == running_std->sym_sizes(), "running_mean ",
                         shape_text(running_mean->sym_sizes()), " and running_std ",
                         shape_text(running_std->sym_sizes()), " must have the same shape");
    // Training updates both in place: each element needs memory of its own.
    // With symbolic shapes (torch.compile's dynamic traces) only the same
    // tensor given twice is caught: the overlap tests read concrete strides.
    const char* shared =
        "running_mean and running_std share memory, and training updates both in place: pass "
        "two separate tensors";
    SURGELLM_CHECK_VALUE(!(training && running_mean->is_same(*running_std)), shared);
    if (training && !running_mean->unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
        !running_std->unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
      for (const auto& [r, name] :
           {std::pair{&running_mean, "running_mean"}, std::pair{&running_std, "running_std"}})
        SURGELLM_CHECK_VALUE(at::has_internal_overlap(**r) != at::MemOverlap::Yes, name,
                             " has elements that share memory (an expanded or stride-0 tensor), "
                             "and training updates it in place: pass a tensor of its own (e.g. ",
                             name, ".clone())");
      const at::MemOverlapStatus both = at::get_overlap_status(*running_mean, *running_std);
      SURGELLM_CHECK_VALUE(
          both != at::MemOverlapStatus::Full && both != at::MemOverlapStatus::Partial, shared);
      // Nor may they share memory with an input: the update would change
      // what the rest of the call reads (x[0] as running_mean: row 0's output).
      const std::pair<optional<Tensor>, const char*> inputs[] = {
          {x, "x"}, {gate, "gate"}, {weight, "weight"}, {bias, "bias"}};
      for (const auto& [r, name] :
           {std::pair{&running_mean, "running_mean"}, std::pair{&running_std, "running_std"}})
        for (const auto& [input, input_name] : inputs) {
          // (another storage: no overlap, and no cost beyond this test)
          if (!input || !input->is_alias_of(**r) ||
              input->unsafeGetTensorImpl()->has_symbolic_sizes_strides())
            continue;
          // Views of one storage whose overlap is too hard to tell (strided)
          // are refused too.
          SURGELLM_CHECK_VALUE(at::get_overlap_status(**r, *input) == at::MemOverlapStatus::No,
                               name, " overlaps ", input_name,
                               " (or may: views of one storage), and training updates it in "
                               "place: pass a tensor of its own (e.g. ",
                               name, ".clone())");
        }
    }
    if (running_mean->dim() == 2) {
      call.num_tasks = running_mean->sym_size(0).guard_int(__FILE__, __LINE__);
      SURGELLM_CHECK_VALUE(call.num_tasks >= 1,
                           "running_mean / running_std must hold at least one task (shape "
                           "(num_tasks >= 1, ",
                           F, ")), got shape ", shape_text(running_mean->sym_sizes()));
      task_count_source = ", the rows of running_mean";
    }
    SURGELLM_CHECK_VALUE(!(running_mean->dim() == 1 && task_ids.has_value()),
                         "task_ids were given but running_mean has shape (F,) (as a module "
                         "built with num_tasks=1 has): per-task statistics need (num_tasks, F) "
                         "running_mean / running_std");
    SURGELLM_CHECK_VALUE(!(running_mean->dim() == 2 && call.num_tasks > 1 && !task_ids.has_value()),
                         "running statistics hold ", call.num_tasks, " tasks: task_ids (shape ",
                         shape_text(rows), ") are required to pick each row's task");
    SURGELLM_CHECK_VALUE(!num_tasks.has_value() || *num_tasks == call.num_tasks, "num_tasks (",
                         num_tasks.value_or(0),
                         ") must equal the tasks of running_mean / "
                         "running_std (",
                         call.num_tasks, ", of shape ", shape_text(running_mean->sym_sizes()), ")");
  } else if (num_tasks.has_value()) {
    SURGELLM_CHECK_VALUE(*num_tasks >= 1, "num_tasks must be a positive int, got ", *num_tasks);
    SURGELLM_CHECK_VALUE(*num_tasks == 1 || task_ids.has_value(), "num_tasks is ", *num_tasks,
                         ": task_ids (shape ", shape_text(rows),
                         ") are required to pick each row's task");
    call.num_tasks = *num_tasks;
    task_count_source = ", num_tasks";
  }
  if (task_ids.has_value()) {
    check_index_tensor(*task_ids, "task_ids", rows, x, rows_text);
    // without a count given, the task count comes from the data
    if (!running_mean.has_value() && !num_tasks.has_value() && training) {
      SURGELLM_CHECK_VALUE(!synced,
                           "task_ids with a process_group need num_tasks, or running_mean / "
                           "running_std of shape (num_tasks, F): every rank must use the same "
                           "task count, not the one its own rows show");
      if (task_ids->sym_numel() != 0) {
        call.num_tasks = count_from_data(*task_ids, "task_ids", "task", "num_tasks");
        task_count_source = ", one more than the largest task id";
      }
    }
  }

  if (!training) {
    SURGELLM_CHECK_VALUE(running_mean.has_value(),
                         labels.has_value()
                             ? "labels were given but training=False: pass training=True for "
                               "class-balanced batch statistics, or running_mean and running_std "
                               "to normalize with (inference)"
                             : "running_mean and running_std are required when training=False "
                               "(there are no batch statistics to normalize with): pass them, or "
                               "training=True with labels");
    return call;
  }
  SURGELLM_CHECK_VALUE(labels.has_value(),
                       "labels are required in training: class-balanced statistics need each "
                       "row's class (pass labels; or normalize with the running statistics: "
                       "training=False, or .eval() on a module)");
  check_index_tensor(*labels, "labels", rows, x, rows_text);
  const bool given_classes = num_classes.has_value();
  if (!given_classes) {
    SURGELLM_CHECK_VALUE(!synced,
                         "num_classes is required with a process_group: every rank must group its "
                         "rows by the same classes, not those its own labels show");
    // (no rows, as F.batch_norm takes: any class count fits them)
    num_classes =
        labels->sym_numel() != 0 ? count_from_data(*labels, "labels", "class", "num_classes") : 1;
  }
  SURGELLM_CHECK_VALUE(*num_classes >= 1, "num_classes must be a positive int, got ", *num_classes);
  SURGELLM_CHECK_VALUE(
      *num_classes <= kMaxKeys / call.num_tasks, "num_classes (", *num_classes,
      given_classes ? "" : ", one more than the largest label", ") times the task count (",
      call.num_tasks, task_count_source, ") must be at most ", kMaxKeys,
      ": each row's (task, class) group is a 32-bit key; use fewer classes or tasks");
  // Every (task, class) group's moments are held, its rows present or not:
  // six arrays of groups x F values (forward and backward). Bounded, so that
  // a mistaken num_classes is an error here, not an allocation that takes
  // the machine's memory.
  if (const auto f = F.maybe_as_int()) {
    const int64_t groups = *num_classes * call.num_tasks;
    SURGELLM_CHECK_VALUE(groups <= kMaxGroupValues / *f, "num_classes (", *num_classes,
                         given_classes ? "" : ", one more than the largest label",
                         ") times the task count (", call.num_tasks, task_count_source,
                         ") times the features (", *f, ") must be at most ", kMaxGroupValues,
                         ": the statistics keep values for every feature of every class of "
                         "every task, present in the batch or not; use fewer classes, tasks or "
                         "features");
  }
  call.num_classes = *num_classes;
  return call;
}

// -- the phases, through the dispatcher --------------------------------------------------

Tensor group_keys(const optional<Tensor>& labels, const optional<Tensor>& task_ids,
                  int64_t num_tasks, int64_t num_classes) {
  static const auto h =
      op_handle<Tensor(const optional<Tensor>&, const optional<Tensor>&, int64_t, int64_t)>(
          "surgellm::_iwn_group_keys");
  return h.call(labels, task_ids, num_tasks, num_classes);
}

using Moments = std::tuple<Tensor, Tensor, Tensor, Tensor>;  // count, mean, m2, mean_residual
Moments group_moments(const Tensor& x, const optional<Tensor>& keys, const optional<Tensor>& gate,
                      int64_t num_groups) {
  static const auto h =
      op_handle<Moments(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, int64_t)>(
          "surgellm::_iwn_group_moments");
  return h.call(x, keys, gate, num_groups);
}

Moments merge_moments(const Tensor& count, const Tensor& mean, const Tensor& m2,
                      const Tensor& residual_sum) {
  static const auto h =
      op_handle<Moments(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
          "surgellm::_iwn_merge_moments");
  return h.call(count, mean, m2, residual_sum);
}

std::tuple<Tensor, Tensor, Tensor> combine(const Moments& moments, int64_t num_tasks, bool pooled,
                                           double momentum, const optional<Tensor>& running_mean,
                                           const optional<Tensor>& running_std) {
  static const auto h = op_handle<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool, double,
      const optional<Tensor>&, const optional<Tensor>&)>("surgellm::_iwn_combine");
  const auto& [count, mean, m2, mean_residual] = moments;
  return h.call(count, mean, m2, mean_residual, num_tasks, pooled, momentum, running_mean,
                running_std);
}

Tensor apply(const Tensor& x, const optional<Tensor>& keys, const optional<Tensor>& gate,
             const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& mu,
             const Tensor& sigma, int64_t key_div, double eps) {
  static const auto h =
      op_handle<Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                       const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                       const Tensor&, int64_t, double)>("surgellm::_iwn_apply");
  return h.call(x, keys, gate, weight, bias, mu, sigma, key_div, eps);
}

Tensor task_sums(const Tensor& dy, const Tensor& x, const optional<Tensor>& keys,
                 const optional<Tensor>& gate, const Tensor& mu, int64_t key_div) {
  static const auto h = op_handle<Tensor(const Tensor&, const Tensor&, const optional<Tensor>&,
                                         const optional<Tensor>&, const Tensor&, int64_t)>(
      "surgellm::_iwn_task_sums");
  return h.call(dy, x, keys, gate, mu, key_div);
}

using Coefficients = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
Coefficients coefficients(const Tensor& sums, const optional<Tensor>& param_sums,
                          const optional<Tensor>& weight, const optional<Tensor>& count,
                          const optional<Tensor>& group_mean, const optional<Tensor>& group_std,
                          const optional<Tensor>& mean_residual, const Tensor& mu,
                          const Tensor& sigma, bool pooled, double eps) {
  static const auto h = op_handle<Coefficients(
      const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
      const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
      const Tensor&, bool, double)>("surgellm::_iwn_coefficients");
  return h.call(sums, param_sums, weight, count, group_mean, group_std, mean_residual, mu, sigma,
                pooled, eps);
}

std::tuple<Tensor, Tensor> input_grad(const Tensor& dy, const Tensor& x,
                                      const optional<Tensor>& keys, const optional<Tensor>& gate,
                                      const Tensor& scale, const Tensor& dy_shift,
                                      const Tensor& dev_coef, const Tensor& center,
                                      const Tensor& du_dot_u, int64_t key_div, bool training) {
  static const auto h = op_handle<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool)>(
      "surgellm::_iwn_input_grad");
  return h.call(dy, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u, key_div, training);
}

// -- data parallel: torch's functional collectives, through the dispatcher ---------------
// They run on the process group's own backend (gloo, NCCL) and are traced by
// torch.compile like any op. No weight, bias or gate gradient is reduced
// here: DistributedDataParallel does that.

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

// The moments of every rank's rows together: one all-gather of each rank's
// (count, mean, M2, residual sum) per group and a flag saying whether its own
// call failed its checks, then every rank merges the same gathered values in
// rank order (_iwn_merge_moments), so every rank ends with the same
// statistics. A rank without rows of a group sends n = 0, which adds
// nothing. When a rank flagged a failure, every rank raises (none is left
// waiting in a later collective). The flags are read back (one host sync on
// CUDA), except while tracing and under CUDA graph capture, where no check
// fails before the gather.
Moments moments_of_all_ranks(const Moments& local, bool failed, const RankGroup& g) {
  const auto& [count, mean, m2, mean_residual] = local;
  const c10::SymInt G = mean.sym_size(0), F = mean.sym_size(1);
  const Tensor flag = at::full({1}, failed ? 1 : 0, count.options());
  const Tensor residual_sum = mean_residual * count.unsqueeze(-1);
  const Tensor packed =
      at::cat({flag, count, mean.reshape(-1), m2.reshape(-1), residual_sum.reshape(-1)});
  const Tensor per_rank = all_gather(packed, g).view_symint({g.size, -1});
  const Tensor flags = per_rank.select(1, 0);
  if (!at::isTensorSubclassLike(flags) && !capturing_cuda_graph(flags)) {
    const Tensor host = flags.to(at::kCPU, at::kDouble).contiguous();
    const double* flag_of = host.const_data_ptr<double>();
    std::vector<int64_t> failed_ranks;
    for (int64_t r = 0; r < g.size; ++r)
      if (flag_of[r] != 0) failed_ranks.push_back(r);
    SURGELLM_CHECK_VALUE(failed_ranks.empty(), "the call failed its checks on rank(s) ",
                         c10::IntArrayRef(failed_ranks),
                         " of process_group (their own errors say why); nothing was updated");
  }
  auto part = [&](int64_t which) {  // (R, G, F) of mean, m2 or residual_sum
    return per_rank.narrow_symint(1, G + 1 + which * G * F, G * F)
        .reshape_symint({g.size, G, F})
        .contiguous();
  };
  return merge_moments(per_rank.narrow_symint(1, 1, G).contiguous(), part(0), part(1), part(2));
}

// A synchronized training call whose own checks raise still takes part in
// the forward's all-gather, flagged, so that no rank is left waiting in it:
// checks() runs, and on failure this rank sends the flag with zeros of the
// payload its group expects -- num_classes times the tasks of a (T, F)
// running_mean (else num_tasks, else 1) groups of F features, F read from the running
// statistics, weight or bias where given (x's own width may be what failed),
// else from x; in x's accumulation dtype (x not floating: that of the
// running_mean, weight or bias given) -- then every rank raises, this one
// its own error. Where the arguments do not give that payload (no floating
// tensor, num_classes missing, sizes past the checks' bounds) the rank
// raises alone, as nn.SyncBatchNorm's checks do. A trace (fake
// tensors) communicates nothing.
template <typename Checks>
auto joining_the_gather(const Tensor& x, const optional<Tensor>& running_mean,
                        const optional<Tensor>& weight, const optional<Tensor>& bias,
                        optional<int64_t> num_classes, optional<int64_t> num_tasks,
                        const optional<c10::string_view>& group_name, int64_t group_size,
                        bool training, int64_t feature_dim, const Checks& checks)
    -> decltype(checks()) {
  try {
    return checks();
  } catch (const c10::Error&) {
    auto given = [](const optional<Tensor>& t) {
      return t.has_value() && t->defined() && !at::isTensorSubclassLike(*t) && t->dim() >= 1;
    };
    auto floating = [](const Tensor& t) { return at::isFloatingType(t.scalar_type()); };
    // The payload's dtype: x's, or where x is not floating (what failed), the
    // module's as its running_mean, weight or bias give it.
    const Tensor* like = &x;
    if (x.defined() && !floating(x))
      for (const optional<Tensor>* t : {&running_mean, &weight, &bias})
        if (given(*t) && floating(**t)) {
          like = &**t;
          break;
        }
    const bool payload_known = training && group_name.has_value() && group_size > 1 &&
                               num_classes.has_value() && *num_classes >= 1 && x.defined() &&
                               !at::isTensorSubclassLike(x) && floating(*like) && x.dim() >= 1 &&
                               feature_dim >= -x.dim() && feature_dim < x.dim();
    if (!payload_known) throw;
    const int64_t F = given(running_mean) ? running_mean->size(-1)
                      : given(weight)     ? weight->size(0)
                      : given(bias) ? bias->size(0)
                                    : x.size(feature_dim < 0 ? feature_dim + x.dim() : feature_dim);
    const int64_t T = given(running_mean) && running_mean->dim() == 2 ? running_mean->size(0)
                      : num_tasks.has_value()                         ? *num_tasks
                                                                      : 1;
    if (F < 1 || T < 1 || *num_classes > kMaxKeys / T || T * *num_classes > kMaxGroupValues / F)
      throw;
    const int64_t G = T * *num_classes;
    const auto opts = x.options().dtype(accumulation_type(*like));
    const Tensor zeros = at::zeros({G, F}, opts);
    // Raises on every rank (this one flagged its failure), or cannot reach
    // the group (an unknown name): this rank's own error is the one to raise.
    try {
      moments_of_all_ranks({at::zeros({G}, opts), zeros, zeros, zeros}, /*failed=*/true,
                           RankGroup{std::string(*group_name), group_size});
    } catch (const std::exception&) {
    }
    throw;
  }
}

// The op _iwn_all_ranks_moments (what InstanceWeightedNorm.fit merges its
// shards with): moments_of_all_ranks for a process group's name and size.
Moments all_ranks_moments_op(const Tensor& count, const Tensor& mean, const Tensor& m2,
                             const Tensor& mean_residual, bool failed, c10::string_view group_name,
                             int64_t group_size) {
  SURGELLM_CHECK_VALUE(group_size >= 1, "group_size must be positive, got ", group_size);
  return moments_of_all_ranks({count, mean, m2, mean_residual}, failed,
                              RankGroup{std::string(group_name), group_size});
}

// -- the forward, phase by phase -------------------------------------------------------

optional<Tensor> flat(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(t->reshape(-1)) : std::nullopt;
}

// How the phases read x. Features last: rows (N, F). Features followed by
// positions (BatchNorm's (N, C, H, W) with feature_dim = 1): on the CPU,
// planes (P, F, L) read in place from contiguous memory; on other devices,
// or when the features are innermost in memory (channels_last), rows of
// positions (P * L, F), each instance's key repeated over its L positions.
enum class Layout : int64_t { rows = 0, planes = 1, position_rows = 2 };

struct XLayout {
  Layout kind;
  int64_t fd;                   // feature_dim, in [0, x.dim())
  c10::SymInt L = 1;            // positions per instance
  bool contiguous_out = false;  // rows of positions from a copy: outputs contiguous again
};

XLayout layout_of(const Tensor& x, int64_t fd) {
  if (fd == x.dim() - 1) return {Layout::rows, fd};
  c10::SymInt L = 1;
  for (int64_t d = fd + 1; d < x.dim(); ++d) L *= x.sym_size(d);
  const bool features_innermost = x.movedim(fd, -1).is_contiguous();
  if (x.is_cpu() && L != 1 && (x.is_contiguous() || !features_innermost))
    return {Layout::planes, fd, L};  // in place, or from a contiguous copy
  if (!features_innermost && L != 1) {
    TORCH_WARN_ONCE(text(
        "fused_iwn: x with its features in dimension ", fd, " of ", x.dim(), " on ", x.device(),
        " is copied to features-innermost order (only the CPU kernels read channels-first "
        "memory in place); to avoid the copy, pass x with its features innermost in memory: "
        "x.movedim(",
        fd, ", -1).contiguous().movedim(-1, ", fd,
        ") (for 4-D x, x.to(memory_format=torch.channels_last))"));
  }
  return {Layout::position_rows, fd, L, !features_innermost};
}

// instances (P), features (F) and positions per instance (L) of x
std::tuple<c10::SymInt, c10::SymInt, c10::SymInt> instances_features_positions(const Tensor& x,
                                                                               int64_t fd) {
  c10::SymInt P = 1, L = 1;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d < fd) P *= x.sym_size(d);
    if (d > fd) L *= x.sym_size(d);
  }
  return {P, x.sym_size(fd), L};
}

// x as the phases read it (a view where the memory allows).
Tensor phase_x(const Tensor& x, const XLayout& layout) {
  const auto [P, F, L] = instances_features_positions(x, layout.fd);
  switch (layout.kind) {
    case Layout::planes:
      return x.contiguous().view_symint({P, F, L});
    case Layout::position_rows:
      return x.movedim(layout.fd, -1).reshape_symint({P * L, F}).contiguous();
    default:
      return x.dim() == 2 && x.is_contiguous() ? x : x.reshape_symint({-1, F}).contiguous();
  }
}

// A phase output (y, dx) in x's shape and memory order.
Tensor in_layout_of_x(const Tensor& out, const XLayout& layout, c10::SymIntArrayRef x_sizes) {
  if (layout.kind != Layout::position_rows) return out.view_symint(x_sizes);
  std::vector<c10::SymInt> moved(x_sizes.begin(), x_sizes.end());
  std::rotate(moved.begin() + layout.fd, moved.begin() + layout.fd + 1, moved.end());
  const Tensor y = out.view_symint(moved).movedim(-1, layout.fd);
  return layout.contiguous_out ? y.contiguous() : y;
}

// Instance keys as the phases' rows need them: one per position in rows of positions.
Tensor row_keys(const Tensor& keys, const XLayout& layout) {
  if (layout.kind != Layout::position_rows) return keys;
  // (contiguous: for one sample the reshape is a view of stride 0)
  return keys.unsqueeze(-1).expand_symint({keys.sym_size(0), layout.L}).reshape(-1).contiguous();
}

// What the phases take: x (phase_x), a (F) gate, weight and bias in the
// accumulation type (any stride accepted here), a per-instance gate as
// (N, F) rows of x's type.
struct PhaseInputs {
  Tensor x;
  optional<Tensor> gate, weight, bias;
  XLayout layout;
};

PhaseInputs phase_inputs(const Tensor& x, const optional<Tensor>& gate,
                         const optional<Tensor>& weight, const optional<Tensor>& bias,
                         const XLayout& layout) {
  const auto acc = accumulation_type(x);
  // Tensors already in the layout asked for are passed as they are: no
  // dispatcher round trip per argument on every call.
  auto vec = [&](const optional<Tensor>& t) -> optional<Tensor> {
    if (!t.has_value()) return std::nullopt;
    if (t->scalar_type() == acc && t->is_contiguous()) return t;
    return t->to(acc).contiguous();
  };
  optional<Tensor> gate2;
  // a per-instance gate comes with features last only (check_iwn_args)
  if (gate.has_value())
    gate2 = gate->dim() == 1 ? vec(gate) : phase_x(*gate, {Layout::rows, gate->dim() - 1});
  return {phase_x(x, layout), gate2, vec(weight), vec(bias), layout};
}

struct ForwardResult {
  Tensor y;  // (N, F)
  optional<Tensor> keys;
  optional<Tensor> count, group_mean, group_std, mean_residual;  // training only
  Tensor mu, sigma;                                              // (T, F) statistics used
  int64_t key_div;
};

// Running statistics are updated in place by the combine kernels, which take
// contiguous (T, F) buffers of the accumulation type; other layouts and
// dtypes go through a temporary copied back afterwards.
optional<Tensor> kernel_buffer(const optional<Tensor>& r, at::ScalarType acc) {
  if (!r.has_value() || (r->is_contiguous() && r->scalar_type() == acc)) return r;
  return r->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

// The rows' keys and the training statistics' moments: of this rank's rows,
// or of every rank's.
std::pair<Tensor, Moments> training_moments(const PhaseInputs& in, const optional<Tensor>& labels,
                                            const optional<Tensor>& task_ids, const IWNCall& call) {
  const int64_t T = call.num_tasks, G = T * call.num_classes;
  auto of_rows = [&] {
    const Tensor keys =
        row_keys(group_keys(flat(labels), flat(task_ids), T, call.num_classes), in.layout);
    return std::pair{keys, group_moments(in.x, keys, in.gate, G)};
  };
  if (!call.ranks.has_value()) return of_rows();
  // A rank whose rows fail a check (a label or task id out of range) still
  // takes part in the all-gather, flagged; then every rank raises (none is
  // left waiting in a collective), this one its own error.
  std::exception_ptr failure;
  std::pair<Tensor, Moments> result;
  try {
    result = of_rows();
  } catch (const c10::Error&) {
    failure = std::current_exception();
    const auto opts = in.x.options().dtype(accumulation_type(in.x));
    const Tensor zeros = at::zeros_symint({G, in.x.sym_size(1)}, opts);
    result.second = {at::zeros({G}, opts), zeros, zeros, zeros};
  }
  try {
    result.second = moments_of_all_ranks(result.second, failure != nullptr, *call.ranks);
  } catch (const c10::Error&) {
    if (failure) std::rethrow_exception(failure);
    throw;
  }
  if (failure) std::rethrow_exception(failure);
  return result;
}

// for_backward: autograd records the call, so eval keeps its own copy of
// the running statistics (backward must see those of this call, not a later
// update); otherwise they are read where they are.
ForwardResult forward_phases(const PhaseInputs& in, const optional<Tensor>& labels,
                             const optional<Tensor>& task_ids, const optional<Tensor>& running_mean,
                             const optional<Tensor>& running_std, bool training, double momentum,
                             double eps, const IWNCall& call, bool for_backward) {
  const auto acc = accumulation_type(in.x);
  const int64_t T = call.num_tasks;
  ForwardResult r;
  if (training) {
    Moments moments;
    std::tie(r.keys, moments) = training_moments(in, labels, task_ids, call);
    const auto rm = kernel_buffer(running_mean, acc), rs = kernel_buffer(running_std, acc);
    auto [group_std, mu, sigma] = combine(moments, T, call.pooled, momentum, rm, rs);
    for (const auto& [buffer, running] : {std::pair{rm, running_mean}, std::pair{rs, running_std}})
      if (buffer.has_value() && !buffer->is_same(*running))
        running->copy_(buffer->view_symint(running->sym_sizes()));
    std::tie(r.count, r.group_mean, std::ignore, r.mean_residual) = moments;
    r.group_std = group_std;
    r.mu = mu;
    r.sigma = sigma;
    r.key_div = call.num_classes;
  } else {
    if (task_ids.has_value())
      r.keys = row_keys(group_keys(std::nullopt, flat(task_ids), T, 1), in.layout);
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

Tensor forward_without_autograd(const Tensor& x, const optional<Tensor>& labels,
                                const optional<Tensor>& gate, const optional<Tensor>& weight,
                                const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                const optional<Tensor>& running_std,
                                const optional<Tensor>& task_ids, bool training, double momentum,
                                double eps, const IWNCall& call) {
  const XLayout layout = layout_of(x, call.feature_dim);
  const auto r = forward_phases(phase_inputs(x, gate, weight, bias, layout), labels, task_ids,
                                running_mean, running_std, training, momentum, eps, call,
                                /*for_backward=*/false);
  return in_layout_of_x(r.y, layout, x.sym_sizes());
}

// check_iwn_args of the op's call, which may be one rank's part of a
// synchronized training step (joining_the_gather).
IWNCall checked_call(const Tensor& x, const optional<Tensor>& labels, const optional<Tensor>& gate,
                     const optional<Tensor>& weight, const optional<Tensor>& bias,
                     const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                     const optional<Tensor>& task_ids, bool training, double momentum, double eps,
                     c10::string_view std_mode, optional<int64_t> num_classes,
                     optional<int64_t> num_tasks, optional<c10::string_view> group_name,
                     int64_t group_size, int64_t feature_dim) {
  return joining_the_gather(x, running_mean, weight, bias, num_classes, num_tasks, group_name,
                            group_size, training, feature_dim, [&] {
                              return check_iwn_args(x, labels, gate, weight, bias, running_mean,
                                                    running_std, task_ids, training, momentum, eps,
                                                    std_mode, num_classes, num_tasks, group_name,
                                                    group_size, feature_dim);
                            });
}

// The op without autograd: inference mode, and the Meta / fake path.
Tensor iwn_composite(const Tensor& x, const optional<Tensor>& labels, const optional<Tensor>& gate,
                     const optional<Tensor>& weight, const optional<Tensor>& bias,
                     const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                     const optional<Tensor>& task_ids, bool training, double momentum, double eps,
                     c10::string_view std_mode, optional<int64_t> num_classes,
                     optional<int64_t> num_tasks, optional<c10::string_view> group_name,
                     int64_t group_size, int64_t feature_dim) {
  const IWNCall call = checked_call(x, labels, gate, weight, bias, running_mean, running_std,
                                    task_ids, training, momentum, eps, std_mode, num_classes,
                                    num_tasks, group_name, group_size, feature_dim);
  return forward_without_autograd(x, labels, gate, weight, bias, running_mean, running_std,
                                  task_ids, training, momentum, eps, call);
}

// _iwn_check_args: check_iwn_args and the label / task-id ranges, computing
// nothing. The reference (surgellm_kernels/ops/reference.py) and the modules'
// fit run it so that their bad input gets the op's own errors.
void check_args_op(const Tensor& x, const optional<Tensor>& labels, const optional<Tensor>& gate,
                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                   const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                   const optional<Tensor>& task_ids, bool training, double momentum, double eps,
                   c10::string_view std_mode, optional<int64_t> num_classes,
                   optional<int64_t> num_tasks, optional<c10::string_view> group_name,
                   int64_t group_size, int64_t feature_dim) {
  // (in a compiled graph, the synchronized call's checks: see joining_the_gather)
  joining_the_gather(x, running_mean, weight, bias, num_classes, num_tasks, group_name, group_size,
                     training, feature_dim, [&] {
                       const IWNCall call =
                           check_iwn_args(x, labels, gate, weight, bias, running_mean, running_std,
                                          task_ids, training, momentum, eps, std_mode, num_classes,
                                          num_tasks, group_name, group_size, feature_dim);
                       if (training)
                         group_keys(flat(labels), flat(task_ids), call.num_tasks, call.num_classes);
                       else if (task_ids.has_value())
                         group_keys(std::nullopt, flat(task_ids), call.num_tasks, 1);
                     });
}

// Its Autograd kernel: in a trace (fake or functional tensors, which carry
// the Python key) the argument checks run here, above the fake-tensor mode,
// so that they raise as the fused op's do (a kernel that raises under that
// mode is logged as a failed meta kernel first); then the op below autograd,
// an op of its own in the graph (its range checks). Elsewhere the op's kernel
// alone checks, once: eager calls, and torch.func's transforms, whose
// wrappers hide the data the checks read.
void check_args_autograd(const Tensor& x, const optional<Tensor>& labels,
                         const optional<Tensor>& gate, const optional<Tensor>& weight,
                         const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                         const optional<Tensor>& running_std, const optional<Tensor>& task_ids,
                         bool training, double momentum, double eps, c10::string_view std_mode,
                         optional<int64_t> num_classes, optional<int64_t> num_tasks,
                         optional<c10::string_view> group_name, int64_t group_size,
                         int64_t feature_dim) {
  if (x.key_set().has(c10::DispatchKey::Python))
    check_iwn_args(x, labels, gate, weight, bias, running_mean, running_std, task_ids, training,
                   momentum, eps, std_mode, num_classes, num_tasks, group_name, group_size,
                   feature_dim);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("surgellm::_iwn_check_args", "")
                             .typed<decltype(check_args_op)>();
  op.call(x, labels, gate, weight, bias, running_mean, running_std, task_ids, training, momentum,
          eps, std_mode, num_classes, num_tasks, group_name, group_size, feature_dim);
}

// -- autograd ---------------------------------------------------------------------------

class IWNFunction : public torch::autograd::Function<IWNFunction> {
 public:
  // Checked by iwn_autograd; num_tasks, num_classes, pooled and the rank
  // group are what check_iwn_args made of the call.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& labels,
                        const optional<Tensor>& gate, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                        const optional<Tensor>& running_std, const optional<Tensor>& task_ids,
                        bool training, double momentum, double eps, int64_t num_tasks,
                        int64_t num_classes, bool pooled, optional<std::string> group_name,
                        int64_t group_size, int64_t feature_dim) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    IWNCall call{num_tasks, num_classes, pooled, std::nullopt, feature_dim};
    if (group_name.has_value()) call.ranks = RankGroup{*group_name, group_size};
    const XLayout layout = layout_of(x, feature_dim);
    const PhaseInputs in = phase_inputs(x, gate, weight, bias, layout);
    // The inputs themselves are saved where the phases read them in place
    // (backward re-derives the same views), so that autograd's version check
    // sees an in-place change of x, the gate or the weight before backward;
    // copies made for the phases are saved as they are.
    auto input = [](const optional<Tensor>& phase, const optional<Tensor>& given) {
      if (!phase.has_value()) return Tensor();
      return phase->is_alias_of(*given) ? *given : *phase;
    };
    const Tensor saved_x = input(in.x, x), saved_gate = input(in.gate, gate),
                 saved_weight = input(in.weight, weight);
    refuse_inference_saved("fused_iwn",
                           {{"x", saved_x}, {"gate", saved_gate}, {"weight", saved_weight}});
    const auto r = forward_phases(in, labels, task_ids, running_mean, running_std, training,
                                  momentum, eps, call, /*for_backward=*/true);
    auto or_undefined = [](const optional<Tensor>& t) { return t.value_or(Tensor()); };
    ctx->save_for_backward({saved_x, or_undefined(r.keys), saved_gate, saved_weight,
                            or_undefined(r.count), or_undefined(r.group_mean),
                            or_undefined(r.group_std), or_undefined(r.mean_residual), r.mu,
                            r.sigma});
    ctx->saved_data["x_sizes"] = x.sym_sizes();
    // backward re-derives the phases' x from x itself, or has that copy
    ctx->saved_data["x_is_input"] = in.x.is_alias_of(x);
    ctx->saved_data["layout"] = static_cast<int64_t>(layout.kind);
    // needs_input_grad counts the tensors given (x, labels where given, gate)
    ctx->saved_data["gate_edge"] = int64_t(labels.has_value() && labels->defined() ? 2 : 1);
    ctx->saved_data["feature_dim"] = feature_dim;
    ctx->saved_data["contiguous_out"] = layout.contiguous_out;
    ctx->saved_data["training"] = training;
    ctx->saved_data["pooled"] = pooled;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["key_div"] = r.key_div;
    ctx->saved_data["has_bias"] = bias.has_value();
    if (call.ranks.has_value()) {
      ctx->saved_data["group_name"] = call.ranks->name;
      ctx->saved_data["group_size"] = call.ranks->size;
    }
    return in_layout_of_x(r.y, layout, x.sym_sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The backward phases are not differentiable: with create_graph, a
    // second derivative through them would silently be missing, so refuse.
    SURGELLM_CHECK(!at::GradMode::is_enabled(),
                   "fused_iwn has no double backward (backward with create_graph=True)");
    // Unpacked before leaving autograd: under torch.utils.checkpoint
    // (non-reentrant) unpacking runs the forward again, which must record
    // its autograd node to save what this backward reads.
    const auto saved = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    const XLayout layout{static_cast<Layout>(ctx->saved_data["layout"].toInt()),
                         ctx->saved_data["feature_dim"].toInt(), 1,
                         ctx->saved_data["contiguous_out"].toBool()};
    // a saved copy is in the phases' layout already: planes, or rows
    const XLayout saved_layout =
        ctx->saved_data["x_is_input"].toBool()
            ? layout
            : XLayout{layout.kind == Layout::planes ? Layout::planes : Layout::rows,
                      layout.kind == Layout::planes ? 1 : saved[0].dim() - 1};
    const PhaseInputs in =
        phase_inputs(saved[0], opt(saved[2]), opt(saved[3]), std::nullopt, saved_layout);
    const Tensor& x = in.x;
    const optional<Tensor> keys = opt(saved[1]), gate = in.gate, weight = in.weight;
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t key_div = ctx->saved_data["key_div"].toInt();
    const auto x_sizes = ctx->saved_data["x_sizes"].toSymIntVector();
    const Tensor dy = layout.kind == Layout::position_rows
                          ? phase_x(grad_outputs[0], layout)
                          : grad_outputs[0].reshape_symint(x.sym_sizes()).contiguous();
    const Tensor& mu = saved[8];
    const Tensor& sigma = saved[9];
    const Tensor sums = task_sums(dy, x, keys, gate, mu, key_div);
    // Synchronized: the rows' gradients need every rank's sums (the
    // statistics are shared); weight, bias and a (F) gate keep this rank's
    // share, from its own sums, which DistributedDataParallel adds up.
    Tensor all_sums = sums;
    if (ctx->saved_data.count("group_name"))
      all_sums = all_reduce_sum(sums, RankGroup{ctx->saved_data["group_name"].toStringRef(),
                                                ctx->saved_data["group_size"].toInt()});
    const auto [scale, dy_shift, dev_coef, center, dweight, dbias, du_dot_u] = coefficients(
        all_sums, sums, weight, opt(saved[4]), opt(saved[5]), opt(saved[6]), opt(saved[7]), mu,
        sigma, ctx->saved_data["pooled"].toBool(), ctx->saved_data["eps"].toDouble());
    variable_list grads(17);  // one per forward argument; undefined: no gradient
    // The pass over x for dx and dgate only where one of them is asked for
    // (a frozen x and gate: weight and bias come from the sums alone).
    if (ctx->needs_input_grad(0) ||
        (gate.has_value() && ctx->needs_input_grad(ctx->saved_data["gate_edge"].toInt()))) {
      auto [dx, dgate] = input_grad(dy, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u,
                                    key_div, training);
      grads[0] = in_layout_of_x(dx, layout, x_sizes);
      if (gate.has_value()) grads[2] = gate->dim() == 1 ? dgate : dgate.view_symint(x_sizes);
    }
    if (weight.has_value()) grads[3] = dweight;
    if (ctx->saved_data["has_bias"].toBool()) grads[4] = dbias;
    return grads;
  }
};

Tensor iwn_autograd(const Tensor& x, const optional<Tensor>& labels, const optional<Tensor>& gate,
                    const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
                    const optional<Tensor>& task_ids, bool training, double momentum, double eps,
                    c10::string_view std_mode, optional<int64_t> num_classes,
                    optional<int64_t> num_tasks, optional<c10::string_view> group_name,
                    int64_t group_size, int64_t feature_dim) {
  const IWNCall call = checked_call(x, labels, gate, weight, bias, running_mean, running_std,
                                    task_ids, training, momentum, eps, std_mode, num_classes,
                                    num_tasks, group_name, group_size, feature_dim);
  refuse_forward_ad("fused_iwn", x, gate, weight, bias, running_mean, running_std);
  if (!autograd_records(x, gate, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_without_autograd(x, labels, gate, weight, bias, running_mean, running_std,
                                    task_ids, training, momentum, eps, call);
  }
  refuse_functorch_autograd("fused_iwn");
  optional<std::string> ranks_name;
  if (call.ranks.has_value()) ranks_name = call.ranks->name;
  return IWNFunction::apply(x, labels, gate, weight, bias, running_mean, running_std, task_ids,
                            training, momentum, eps, call.num_tasks, call.num_classes, call.pooled,
                            ranks_name, call.ranks ? call.ranks->size : 1, call.feature_dim);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surgellm, m) {
  // The fake kernels of the phases live in this Python module.
  m.set_python_module("surgellm_kernels.ops.iwn");
  // fused_iwn's arguments in its order: x (..., F); labels, task_ids int64 of
  // x.shape[:-1]; gate (F) or x's shape; running statistics (F) or
  // (num_tasks, F), updated in place in training. group_name / group_size: a
  // process group (torch.distributed's registered name) whose ranks' rows
  // share the training statistics; none, or size 1, communicates nothing.
  // feature_dim: x's feature dimension; labels and task ids then have shape
  // x.shape[:feature_dim], and every position after it (BatchNorm's H, W)
  // belongs to its instance (no gate then).
  m.def(
      "iwn(Tensor x, Tensor? labels=None, Tensor? gate=None, Tensor? weight=None, "
      "Tensor? bias=None, Tensor(a!)? running_mean=None, Tensor(b!)? running_std=None, "
      "Tensor? task_ids=None, bool training=False, float momentum=0.1, float eps=1e-05, "
      "str std_mode=\"class_mean\", int? num_classes=None, int? num_tasks=None, "
      "str? group_name=None, "
      "int group_size=1, int feature_dim=-1) -> Tensor");
  // The phases: x (N, F) contiguous, keys (N) int32, every statistic in the
  // accumulation dtype (see iwn_args.h).
  m.def(
      "_iwn_group_keys(Tensor? labels, Tensor? task_ids, int num_tasks, int num_classes) -> "
      "Tensor");
  m.def(
      "_iwn_check_args(Tensor x, Tensor? labels=None, Tensor? gate=None, Tensor? weight=None, "
      "Tensor? bias=None, Tensor? running_mean=None, Tensor? running_std=None, "
      "Tensor? task_ids=None, bool training=False, float momentum=0.1, float eps=1e-05, "
      "str std_mode=\"class_mean\", int? num_classes=None, int? num_tasks=None, "
      "str? group_name=None, "
      "int group_size=1, int feature_dim=-1) -> ()");
  m.def(
      "_iwn_group_moments(Tensor x, Tensor? keys, Tensor? gate, int num_groups) -> "
      "(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual)");
  m.def(
      "_iwn_merge_moments(Tensor count, Tensor mean, Tensor m2, Tensor residual_sum) -> "
      "(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual)");
  m.def(
      "_iwn_all_ranks_moments(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual, "
      "bool failed, str group_name, int group_size) -> "
      "(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual)");
  m.def(
      "_iwn_combine(Tensor count, Tensor mean, Tensor m2, Tensor mean_residual, int num_tasks, "
      "bool pooled, float momentum, Tensor(a!)? running_mean, Tensor(b!)? running_std) -> "
      "(Tensor group_std, Tensor mu, Tensor sigma)");
  m.def(
      "_iwn_apply(Tensor x, Tensor? keys, Tensor? gate, Tensor? weight, Tensor? bias, Tensor mu, "
      "Tensor sigma, int key_div, float eps) -> Tensor");
  m.def(
      "_iwn_task_sums(Tensor grad_y, Tensor x, Tensor? keys, Tensor? gate, Tensor mu, "
      "int key_div) -> Tensor");
  m.def(
      "_iwn_coefficients(Tensor sums, Tensor? param_sums, Tensor? weight, Tensor? count, "
      "Tensor? group_mean, Tensor? group_std, Tensor? mean_residual, Tensor mu, Tensor sigma, "
      "bool pooled, float eps) -> (Tensor scale, Tensor dy_shift, Tensor dev_coef, "
      "Tensor center, Tensor dweight, Tensor dbias, Tensor du_dot_u)");
  m.def(
      "_iwn_input_grad(Tensor grad_y, Tensor x, Tensor? keys, Tensor? gate, Tensor scale, "
      "Tensor dy_shift, Tensor dev_coef, Tensor center, Tensor du_dot_u, int key_div, "
      "bool training) -> (Tensor dx, Tensor dgate)");
}

// _iwn_check_args is an op of its own in a traced graph (not decomposed into
// the group keys, whose unused result torch.compile would drop with their
// range checks; its Autograd kernel above); ops/iwn.py marks it as having
// side effects.
TORCH_LIBRARY_IMPL(surgellm, CompositeExplicitAutograd, m) {
  m.impl("_iwn_check_args", &check_args_op);
  m.impl("iwn", &iwn_composite);
  m.impl("_iwn_all_ranks_moments", &all_ranks_moments_op);
}

TORCH_LIBRARY_IMPL(surgellm, Autograd, m) {
  m.impl("iwn", &iwn_autograd);
  m.impl("_iwn_check_args", &check_args_autograd);
}

}  // namespace surgellm
