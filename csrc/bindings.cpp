// pybind11 module surgellm_kernels._C: tensor checks, dtype dispatch, output
// and workspace allocation, and the choice of kernel (CPU capability, or a
// CUDA launch on the current stream). Kernels take raw pointers only.
#include <torch/extension.h>

#include <ATen/Version.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/iwn.h"

#ifdef SURGELLM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include "cuda/iwn.cuh"
#endif

namespace {

using at::Tensor;
using c10::optional;
using surgellm::IWNBackwardArgs;
using surgellm::IWNForwardArgs;

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

const void* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

template <typename T>
const T* typed_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void check_aux(const optional<Tensor>& t, const char* name, const Tensor& x,
               at::IntArrayRef shape, at::ScalarType dtype) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == x.device(), name, " must be on ", x.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
}

// The shared checks of forward and backward; returns the accumulation dtype.
at::ScalarType check_common(const Tensor& x, const optional<Tensor>& keys,
                            const optional<Tensor>& gate, const optional<Tensor>& weight,
                            int64_t T, int64_t C) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (N, F), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "x must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(T >= 1 && C >= 1, "num_tasks and num_classes must be positive");
  const int64_t N = x.size(0), F = x.size(1);
  const auto acc = acc_scalar_type(st);
  check_aux(keys, "keys", x, {N}, at::kInt);
  if (gate.has_value()) {
    if (gate->dim() == 1)
      check_aux(gate, "gate", x, {F}, acc);
    else
      check_aux(gate, "gate", x, {N, F}, st);
  }
  check_aux(weight, "weight", x, {F}, acc);
  return acc;
}

// The fields IWNForwardArgs and IWNBackwardArgs share.
template <template <typename> class Args, typename acc_t>
void set_common_args(Args<acc_t>& a, const Tensor& x, const optional<Tensor>& keys,
                     const optional<Tensor>& gate, const optional<Tensor>& weight, bool training,
                     int64_t T, int64_t C, double eps, bool pooled) {
  const bool full_gate = gate.has_value() && gate->dim() == 2;
  a.x = x.data_ptr();
  a.gate_full = full_gate ? gate->data_ptr() : nullptr;
  a.gate_vec = full_gate ? nullptr : typed_or_null<acc_t>(gate);
  a.keys = typed_or_null<int32_t>(keys);
  a.N = x.size(0);
  a.F = x.size(1);
  a.num_tasks = T;
  a.num_classes = C;
  a.training = training;
  a.pooled = pooled;
  a.eps = static_cast<acc_t>(eps);
  a.weight = typed_or_null<acc_t>(weight);
}

template <typename acc_t>
IWNForwardArgs<acc_t> forward_args(const Tensor& x, const optional<Tensor>& keys,
                                   const optional<Tensor>& gate, const optional<Tensor>& weight,
                                   const optional<Tensor>& bias, const optional<Tensor>& mean_in,
                                   const optional<Tensor>& std_in, bool training, int64_t T,
                                   int64_t C, double eps, bool pooled, std::vector<Tensor>& out) {
  IWNForwardArgs<acc_t> a{};
  set_common_args(a, x, keys, gate, weight, training, T, C, eps, pooled);
  a.bias = typed_or_null<acc_t>(bias);
  a.mean_in = typed_or_null<acc_t>(mean_in);
  a.std_in = typed_or_null<acc_t>(std_in);
  a.y = out[0].data_ptr();
  if (training) {
    a.group_count = out[1].data_ptr<acc_t>();
    a.group_mean = out[2].data_ptr<acc_t>();
    a.group_std = out[3].data_ptr<acc_t>();
    a.mu = out[4].data_ptr<acc_t>();
    a.sigma = out[5].data_ptr<acc_t>();
  }
  return a;
}

template <typename acc_t>
IWNBackwardArgs<acc_t> backward_args(const Tensor& dy, const Tensor& x, const optional<Tensor>& keys,
                                     const optional<Tensor>& gate, const optional<Tensor>& weight,
                                     const optional<Tensor>& gcount, const optional<Tensor>& gmean,
                                     const optional<Tensor>& gstd, const Tensor& mu,
                                     const Tensor& sigma, bool training, int64_t T, int64_t C,
                                     double eps, bool pooled, std::vector<Tensor>& out) {
  const bool full_gate = gate.has_value() && gate->dim() == 2;
  IWNBackwardArgs<acc_t> a{};
  set_common_args(a, x, keys, gate, weight, training, T, C, eps, pooled);
  a.dy = dy.data_ptr();
  a.group_count = training ? typed_or_null<acc_t>(gcount) : nullptr;
  a.group_mean = training ? typed_or_null<acc_t>(gmean) : nullptr;
  a.group_std = training ? typed_or_null<acc_t>(gstd) : nullptr;
  a.mu = mu.data_ptr<acc_t>();
  a.sigma = sigma.data_ptr<acc_t>();
  a.dx = out[0].data_ptr();
  a.dgate_full = full_gate ? out[1].data_ptr() : nullptr;
  a.dgate_vec = (gate.has_value() && !full_gate) ? out[1].data_ptr<acc_t>() : nullptr;
  a.dweight = out[2].data_ptr<acc_t>();
  a.dbias = out[3].data_ptr<acc_t>();
  return a;
}

template <typename Args>
constexpr bool is_forward = std::is_same<Args, IWNForwardArgs<float>>::value ||
                            std::is_same<Args, IWNForwardArgs<double>>::value;

// The CPU kernel build matching this processor (ATen's own choice, which
// honours ATEN_CPU_CAPABILITY), falling back to the portable build.
template <typename scalar_t, typename Args>
void run_cpu(const Args& a) {
  namespace k = surgellm::cpu;
#if defined(__x86_64__) || defined(_M_X64)
  static const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") {
    if constexpr (is_forward<Args>) return k::AVX512::iwn_forward<scalar_t>(a);
    else return k::AVX512::iwn_backward<scalar_t>(a);
  }
  if (cap == "AVX2") {
    if constexpr (is_forward<Args>) return k::AVX2::iwn_forward<scalar_t>(a);
    else return k::AVX2::iwn_backward<scalar_t>(a);
  }
#endif
  if constexpr (is_forward<Args>) k::DEFAULT::iwn_forward<scalar_t>(a);
  else k::DEFAULT::iwn_backward<scalar_t>(a);
}

#ifdef SURGELLM_WITH_CUDA
surgellm::cuda::ScalarKind scalar_kind(at::ScalarType t) {
  using K = surgellm::cuda::ScalarKind;
  switch (t) {
    case at::kDouble: return K::Float64;
    case at::kHalf: return K::Float16;
    case at::kBFloat16: return K::BFloat16;
    default: return K::Float32;
  }
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "surgellm_kernels CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

// Runs the kernels on x's device: the CPU build for this processor, or the
// CUDA launches on the current stream with a workspace from torch's allocator.
template <typename scalar_t, typename Args>
void run_kernels(const Tensor& x, const Args& a) {
  if (!x.is_cuda()) {
    TORCH_CHECK(x.is_cpu(), "x must be a CPU or CUDA tensor, got ", x.device());
    run_cpu<scalar_t>(a);
    return;
  }
#ifdef SURGELLM_WITH_CUDA
  namespace kc = surgellm::cuda;
  const auto kind = scalar_kind(x.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto workspace = [&](size_t bytes) {
    return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  };
  if constexpr (is_forward<Args>) {
    auto ws = workspace(kc::iwn_forward_workspace_bytes(a));
    check_launch(kc::iwn_forward(kind, a, ws.data_ptr(), stream));
  } else {
    auto ws = workspace(kc::iwn_backward_workspace_bytes(a));
    check_launch(kc::iwn_backward(kind, a, ws.data_ptr(), stream));
  }
#else
  TORCH_CHECK(false, "surgellm_kernels._C was built without CUDA kernels");
#endif
}

std::vector<Tensor> iwn_forward(const Tensor& x, const optional<Tensor>& keys,
                                const optional<Tensor>& gate, const optional<Tensor>& weight,
                                const optional<Tensor>& bias, const optional<Tensor>& mean_in,
                                const optional<Tensor>& std_in, bool training, int64_t T,
                                int64_t C, double eps, bool pooled) {
  const auto acc = check_common(x, keys, gate, weight, T, C);
  const int64_t N = x.size(0), F = x.size(1);
  check_aux(bias, "bias", x, {F}, acc);
  if (!training) {
    TORCH_CHECK(mean_in.has_value() && std_in.has_value(),
                "eval needs mean_in and std_in statistics");
    check_aux(mean_in, "mean_in", x, {T, F}, acc);
    check_aux(std_in, "std_in", x, {T, F}, acc);
  } else {
    TORCH_CHECK(keys.has_value() || T * C == 1, "training needs keys (task * C + label)");
  }
  const auto opts = x.options().dtype(acc);
  const int64_t K = training ? T * C : 0;
  std::vector<Tensor> out{at::empty_like(x), at::empty({K}, opts), at::empty({K, F}, opts),
                          at::empty({K, F}, opts)};
  if (training) {
    out.push_back(at::empty({T, F}, opts));
    out.push_back(at::empty({T, F}, opts));
  } else {
    out.push_back(mean_in->clone());
    out.push_back(std_in->clone());
  }
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "iwn_forward", [&] {
    using acc_t = surgellm::cpu::acc_type<scalar_t>;
    run_kernels<scalar_t>(x, forward_args<acc_t>(x, keys, gate, weight, bias, mean_in, std_in,
                                                 training, T, C, eps, pooled, out));
  });
  return out;
}

std::vector<Tensor> iwn_backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& keys,
                                 const optional<Tensor>& gate, const optional<Tensor>& weight,
                                 const optional<Tensor>& gcount, const optional<Tensor>& gmean,
                                 const optional<Tensor>& gstd, const Tensor& mu,
                                 const Tensor& sigma, bool training, int64_t T, int64_t C,
                                 double eps, bool pooled) {
  const auto acc = check_common(x, keys, gate, weight, T, C);
  const int64_t N = x.size(0), F = x.size(1);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device() && dy.is_contiguous(),
              "grad_output must be a contiguous tensor like x");
  check_aux(mu, "mu", x, {T, F}, acc);
  check_aux(sigma, "sigma", x, {T, F}, acc);
  if (training) {
    TORCH_CHECK(gcount.has_value() && gmean.has_value() && gstd.has_value(),
                "training backward needs the group statistics of forward");
    check_aux(gcount, "group_count", x, {T * C}, acc);
    check_aux(gmean, "group_mean", x, {T * C, F}, acc);
    check_aux(gstd, "group_std", x, {T * C, F}, acc);
  }
  const auto opts = x.options().dtype(acc);
  std::vector<Tensor> out{at::empty_like(x),
                          gate.has_value() ? at::empty_like(*gate) : at::empty({0}, opts),
                          at::empty({F}, opts), at::empty({F}, opts)};
  if (N == 0) {
    out[1].zero_();
    out[2].zero_();
    out[3].zero_();
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "iwn_backward", [&] {
    using acc_t = surgellm::cpu::acc_type<scalar_t>;
    run_kernels<scalar_t>(x, backward_args<acc_t>(dy, x, keys, gate, weight, gcount, gmean, gstd,
                                                  mu, sigma, training, T, C, eps, pooled, out));
  });
  return out;
}

// Row keys of the kernels from int64 labels / task ids (CPU): key = task * C +
// label in training, task in eval; with check, a label or task outside its
// range raises ValueError naming it. One pass, instead of several torch ops.
Tensor group_keys(const optional<Tensor>& labels, const optional<Tensor>& task_ids,
                  int64_t num_tasks, int64_t num_classes, bool check) {
  const Tensor& first = labels.has_value() ? *labels : *task_ids;
  TORCH_CHECK(labels.has_value() || task_ids.has_value(), "labels or task_ids required");
  const int64_t N = first.numel();
  for (const auto* t : {&labels, &task_ids}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->is_cpu() && (*t)->scalar_type() == at::kLong && (*t)->is_contiguous() &&
                    (*t)->numel() == N,
                "group_keys takes contiguous int64 CPU tensors of one length");
  }
  Tensor keys = at::empty({N}, first.options().dtype(at::kInt));
  int32_t* out = keys.data_ptr<int32_t>();
  const int64_t* lab = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const int64_t* task = task_ids.has_value() ? task_ids->data_ptr<int64_t>() : nullptr;
  int64_t lab_lo = 0, lab_hi = 0, task_lo = 0, task_hi = 0;
  if (N > 0) {
    if (lab) lab_lo = lab_hi = lab[0];
    if (task) task_lo = task_hi = task[0];
  }
  for (int64_t i = 0; i < N; ++i) {
    int64_t key = 0;
    if (lab) {
      lab_lo = std::min(lab_lo, lab[i]);
      lab_hi = std::max(lab_hi, lab[i]);
      key = lab[i];
    }
    if (task) {
      task_lo = std::min(task_lo, task[i]);
      task_hi = std::max(task_hi, task[i]);
      key += task[i] * (lab ? num_classes : 1);
    }
    out[i] = static_cast<int32_t>(key);
  }
  auto range_error = [](const char* name, int64_t upper, int64_t lo, int64_t hi) {
    throw pybind11::value_error(std::string(name) + " must lie in [0, " + std::to_string(upper) +
                                "), got values in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]");
  };
  if (check && N > 0) {
    if (lab && (lab_lo < 0 || lab_hi >= num_classes))
      range_error("labels", num_classes, lab_lo, lab_hi);
    if (task && (task_lo < 0 || task_hi >= num_tasks))
      range_error("task_ids", num_tasks, task_lo, task_hi);
  }
  return keys;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "surgellm_kernels compiled kernels (CPU, and CUDA when built with it)";
  m.def("iwn_forward", &iwn_forward,
        "fused_iwn forward: returns y, group count/mean/std, mu, sigma");
  m.def("iwn_backward", &iwn_backward, "fused_iwn backward: returns dx, dgate, dweight, dbias");
  m.def("group_keys", &group_keys,
        "int32 row keys (task * C + label) from int64 CPU labels / task ids, range-checked");
  m.def("cpu_capability", [] { return at::get_cpu_capability(); },
        "the CPU kernel build in use (DEFAULT, AVX2 or AVX512)");
#ifdef SURGELLM_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
