// The Python module surgellm_kernels._C. Importing it loads the library: the
// surgellm op namespace declared here, each op's schemas in csrc/<op>/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT) and their CPU and CUDA kernels in
// csrc/<op>/<op>_kernels.cpp. Python calls the ops as torch.ops.surgellm.*,
// or, for a plain eager call, through the typed entries below: pybind11
// converts the arguments to the schema's C++ types and the op's typed
// dispatcher handle calls it, which skips the boxing of a torch.ops call (a
// third of a small call's cost). They check nothing: the ops do. Like
// torch's own bindings, each runs the op without the GIL and turns a C++
// error into its Python exception (ValueError, TypeError, ...) with the GIL
// held again (HANDLE_TH_ERRORS), so that no exception crosses pybind11's
// call with the GIL released and C++ warnings reach Python's warnings.
#include <ATen/Context.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/kernel_call.h"

TORCH_LIBRARY(surgellm, m) {
  // Every op of the library: see csrc/iwn/iwn.cpp and
  // csrc/surgical_gate/surgical_gate.cpp.
}

namespace surgellm {
namespace {

optional<c10::string_view> view(const optional<std::string>& s) {
  return s.has_value() ? optional<c10::string_view>(*s) : std::nullopt;
}

Tensor iwn(const Tensor& x, const optional<Tensor>& labels, const optional<Tensor>& gate,
           const optional<Tensor>& weight, const optional<Tensor>& bias,
           const optional<Tensor>& running_mean, const optional<Tensor>& running_std,
           const optional<Tensor>& task_ids, bool training, double momentum, double eps,
           const std::string& std_mode, optional<int64_t> num_classes, optional<int64_t> num_tasks,
           const optional<std::string>& group_name, int64_t group_size, int64_t feature_dim) {
  static const auto op = op_handle<Tensor(
      const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
      const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
      const optional<Tensor>&, bool, double, double, c10::string_view, optional<int64_t>,
      optional<int64_t>, optional<c10::string_view>, int64_t, int64_t)>("surgellm::iwn");
  HANDLE_TH_ERRORS
  pybind11::gil_scoped_release no_gil;
  return op.call(x, labels, gate, weight, bias, running_mean, running_std, task_ids, training,
                 momentum, eps, std_mode, num_classes, num_tasks, view(group_name), group_size,
                 feature_dim);
  END_HANDLE_TH_ERRORS_PYBIND
}

Tensor surgical_gate(const Tensor& h, const Tensor& s, const Tensor& gate_logits,
                     const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  static const auto op =
      op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                       const optional<Tensor>&, double)>("surgellm::surgical_gate");
  HANDLE_TH_ERRORS
  pybind11::gil_scoped_release no_gil;
  return op.call(h, s, gate_logits, weight, bias, eps);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace
}  // namespace surgellm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "surgellm_kernels compiled kernels: registers the torch.ops.surgellm ops";
  m.def(
      "cpu_capability", [] { return at::get_cpu_capability(); },
      "the CPU kernel build in use (DEFAULT, AVX2 or AVX512)");
  m.def(
      "cpu_avx512_bf16_rounding", [] { return surgellm::cpu::kAvx512Bf16Rounding; },
      "whether the AVX512 build rounds to bfloat16 with avx512_bf16's instruction");
  m.def("empty_output_cache", &surgellm::empty_output_cache,
        "gives the CPU output cache's unused blocks back to the system; returns the bytes");
  m.def(
      "output_cache_stats",
      [] {
        const surgellm::OutputCacheStats s = surgellm::output_cache_stats();
        return std::make_pair(s.cached_bytes, s.allocated_bytes);
      },
      "(cached, allocated) bytes of the CPU output cache");
  m.def("iwn", &surgellm::iwn,
        "torch.ops.surgellm.iwn's typed eager entry (same arguments, in schema order)");
  m.def("surgical_gate", &surgellm::surgical_gate,
        "torch.ops.surgellm.surgical_gate's typed eager entry");
#ifdef SURGELLM_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
