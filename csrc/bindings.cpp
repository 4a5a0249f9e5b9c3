// The Python module surgellm_kernels._C. Importing it loads the library, whose
// static registrations declare the ops (torch.ops.surgellm.*, csrc/ops/) and
// their CPU and CUDA kernels; the module itself says how it was built and
// holds the ops' eager entries (checks and op call in one crossing).
#include <ATen/Context.h>
#include <torch/extension.h>

#include "ops/eager_calls.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "surgellm_kernels compiled kernels: registers the torch.ops.surgellm ops";
  m.def("cpu_capability", [] { return at::get_cpu_capability(); },
        "the CPU kernel build in use (DEFAULT, AVX2 or AVX512)");
  m.def("fused_iwn", &surgellm::fused_iwn_call,
        "fused_iwn's eager call: its argument checks, then torch.ops.surgellm.iwn");
  m.def("fused_surgical_gate", &surgellm::fused_surgical_gate_call,
        "fused_surgical_gate's eager call: its argument checks, then "
        "torch.ops.surgellm.surgical_gate");
#ifdef SURGELLM_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
