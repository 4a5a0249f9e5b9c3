// What every op's C++ shares (csrc/<op>/<op>.cpp and <op>_kernels.cpp):
// dispatcher handles, the layout assertion of the phase ops' tensors, and the
// call of one kernel where a tensor lives -- the CPU build for this
// processor, or a CUDA launch on that tensor's device and current stream with
// a workspace from torch's allocator.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/FuncTorchTLS.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "common/message.h"
#include "common/output_cache.h"

#include <ATen/core/dispatch/Dispatcher.h>

#ifdef SURGELLM_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_launch.h"
#endif

namespace surgellm {

using at::Tensor;
using std::optional;

// A typed handle of dispatcher op `name` ("surgellm::_iwn_apply"): calls go
// through the dispatcher, which picks the CPU, CUDA, Triton or fake kernel.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether t's device stream is being captured into a CUDA graph, where a host
// sync (reading a value back) is not allowed.
inline bool capturing_cuda_graph(const Tensor& t) {
#ifdef SURGELLM_WITH_CUDA
  if (!t.is_cuda()) return false;
  const c10::cuda::CUDAGuard on_its_device(t.device());  // its device's current stream
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#else
  (void)t;
  return false;
#endif
}

// The (min, max) of each integer tensor (each non-empty), read back to the
// host in one copy: [min_0, max_0, min_1, max_1, ...]. On CUDA, one host sync.
inline std::vector<int64_t> min_max_on_host(const std::vector<Tensor>& tensors) {
  std::vector<Tensor> bounds;
  for (const Tensor& t : tensors) {
    const auto [lo, hi] = at::aminmax(t);
    bounds.push_back(lo.to(at::kLong));
    bounds.push_back(hi.to(at::kLong));
  }
  const Tensor host = at::stack(bounds).cpu();
  const int64_t* p = host.const_data_ptr<int64_t>();
  return {p, p + host.numel()};
}

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

// An output of x's shape, dtype and device, with x's strides when x is dense
// (as at::empty_like). On the CPU its storage comes from the output cache
// (output_cache.h): for a large output, a block a freed one left, its pages
// already mapped, instead of fresh pages that each fault on first write.
inline Tensor empty_output_like(const Tensor& x) {
  if (!x.is_cpu()) return at::empty_like(x);
  return empty_cpu_output(x.sizes(),
                          x.is_non_overlapping_and_dense()
                              ? x.strides().vec()
                              : at::infer_dense_strides(x.sizes(), x.strides()),
                          x.scalar_type());
}

// The phase ops' layout assertion (their callers, the ops' own C++, convert
// every tensor first; this guards direct torch.ops calls): on x's device, of
// this dtype and shape, contiguous.
inline void check_tensor(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape,
                         at::ScalarType dtype) {
  SURGELLM_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  SURGELLM_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                 t.scalar_type());
  SURGELLM_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  SURGELLM_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_optional(const optional<Tensor>& t, const char* name, const Tensor& x,
                           at::IntArrayRef shape, at::ScalarType dtype) {
  if (t.has_value()) check_tensor(*t, name, x, shape, dtype);
}

#ifdef SURGELLM_WITH_CUDA
inline cuda::ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return cuda::ScalarKind::Float64;
    case at::kHalf:
      return cuda::ScalarKind::Float16;
    case at::kBFloat16:
      return cuda::ScalarKind::BFloat16;
    default:
      return cuda::ScalarKind::Float32;
  }
}
#endif

// Runs one phase where `like` lives: cpu_kernel() on the CPU (the build for
// this processor), or the phase's CUDA launch (cuda_launch.h: found by
// argument-dependent lookup on Args), with its workspace from torch's
// allocator, on that tensor's device and its current stream.
template <typename Args, typename CpuKernel>
inline void run_phase(const char* phase, const Tensor& like, const Args& args,
                      const CpuKernel& cpu_kernel) {
  if (!like.is_cuda()) {
    cpu_kernel();
    return;
  }
#ifdef SURGELLM_WITH_CUDA
  const c10::cuda::CUDAGuard device_guard(like.device());
  const size_t bytes = cuda_workspace_bytes(args);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  const cudaError_t err = cuda_launch(scalar_kind(like.scalar_type()), args,
                                      bytes ? workspace.mutable_data_ptr() : nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream());
  SURGELLM_CHECK(err == cudaSuccess, "surgellm_kernels CUDA kernels of ", phase,
                 " failed to launch: ", cudaGetErrorString(err));
#else
  SURGELLM_CHECK(false, "surgellm_kernels._C was built without CUDA kernels");
#endif
}

// Whether autograd records a call with these inputs: grad mode is on and one
// of them requires grad. When not, the ops run without an autograd node (as
// ATen's own ops do).
inline bool requires_grad(const Tensor& t) { return t.requires_grad(); }
inline bool requires_grad(const optional<Tensor>& t) { return t.has_value() && t->requires_grad(); }
template <typename... Ts>
bool autograd_records(const Ts&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

// Forward-mode AD (torch.func.jvp, jacfwd, forward_ad dual tensors): the ops
// define no forward derivative, and a tangent would otherwise be dropped --
// the output read as constant, its tangent zero. Refused, naming the op.
inline bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(0).defined(); }
inline bool has_tangent(const optional<Tensor>& t) { return t.has_value() && has_tangent(*t); }
template <typename... Ts>
void refuse_forward_ad(const char* op, const Ts&... inputs) {
  SURGELLM_CHECK_NOT_IMPLEMENTED(!(has_tangent(inputs) || ...), op,
                                 ": forward-mode AD (torch.func.jvp, jacfwd, dual tensors) is not "
                                 "supported, an input carries a tangent; use reverse mode "
                                 "(backward, torch.autograd.grad) or the reference functions of "
                                 "surgellm_kernels.ops.reference");
}

// torch.func's transforms of a gradient (grad, vjp, jacrev, and vmap of
// them) cannot run a C++ autograd::Function (autograd's own check, which
// names no op and no way out): refused so, naming the op and what does run.
inline void refuse_functorch_autograd(const char* op) {
  const auto& functorch = at::functorch::functorchTLSAccessor();
  if (!functorch) return;
  try {
    functorch->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    SURGELLM_CHECK_NOT_IMPLEMENTED(false, op,
                                   ": torch.func transforms of its gradient (grad, vjp, jacrev, "
                                   "vmap of them) are not supported; use backward() or "
                                   "torch.autograd.grad, or the reference functions of "
                                   "surgellm_kernels.ops.reference");
  }
}

// What autograd saves for backward (`saved`: each input as saved, the input
// itself or the copy the kernels read) cannot be an inference tensor (made
// under torch.inference_mode()); autograd refuses it only once the forward
// has run, when a training call of fused_iwn has updated its running
// statistics. Refused first, naming the input.
inline void refuse_inference_saved(const char* op,
                                   std::initializer_list<std::pair<const char*, Tensor>> saved) {
  for (const auto& [name, t] : saved)
    SURGELLM_CHECK(!(t.defined() && t.is_inference()), op, ": ", name,
                   " is an inference tensor (made under torch.inference_mode()), which autograd "
                   "cannot save for backward: call under torch.inference_mode() or "
                   "torch.no_grad(), or pass a tensor made outside inference mode (",
                   name, ".clone() there)");
}

#define SURGELLM_DISPATCH_FLOATS(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

}  // namespace surgellm
