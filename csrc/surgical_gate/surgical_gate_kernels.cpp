// The CPU and CUDA implementations of fused_surgical_gate's kernel ops
// (schemas in surgical_gate.cpp): output and workspace allocation, dtype
// dispatch, and the kernel call -- the CPU build for this processor
// (surgical_gate_cpu.cpp), or a CUDA launch on h's device and its current
// stream (surgical_gate_cuda.cu). The layout each kernel reads is asserted
// (check_tensor), so a direct torch.ops call never hands it a bad pointer.
#include <torch/library.h>

#include "common/kernel_call.h"
#include "surgical_gate/surgical_gate_cpu.h"
#ifdef SURGELLM_WITH_CUDA
#include "surgical_gate/surgical_gate_cuda.cuh"
#endif

namespace surgellm {
namespace {

// h, s, logits: (N, d) contiguous, one floating dtype; weight, bias: (d) acc.
at::ScalarType check_rows(const Tensor& h, const Tensor& s, const Tensor& logits,
                          const optional<Tensor>& weight) {
  SURGELLM_CHECK(h.dim() == 2 && h.size(1) > 0, "h must be 2-D (N, d) with d > 0, got ", h.sizes());
  SURGELLM_CHECK(h.is_contiguous(), "h must be contiguous");
  const auto st = h.scalar_type();
  SURGELLM_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                 "h must be float32, float64, float16 or bfloat16, got ", st);
  check_tensor(s, "s", h, h.sizes(), st);
  check_tensor(logits, "gate_logits", h, h.sizes(), st);
  const auto acc = acc_scalar_type(st);
  check_optional(weight, "weight", h, {h.size(1)}, acc);
  return acc;
}

std::tuple<Tensor, Tensor, Tensor> surgical_gate_forward(const Tensor& h, const Tensor& s,
                                                         const Tensor& logits,
                                                         const optional<Tensor>& weight,
                                                         const optional<Tensor>& bias, double eps) {
  const auto acc = check_rows(h, s, logits, weight);
  const int64_t N = h.size(0), d = h.size(1);
  check_optional(bias, "bias", h, {d}, acc);
  Tensor z = empty_output_like(h), mean = at::empty({N}, h.options().dtype(acc)),
         rstd = at::empty({N}, h.options().dtype(acc));
  if (N == 0) return {z, mean, rstd};
  SURGELLM_DISPATCH_FLOATS(h, "surgical_gate_forward", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const SurgicalGateForwardArgs<acc_t> a{h.const_data_ptr(),
                                           s.const_data_ptr(),
                                           logits.const_data_ptr(),
                                           N,
                                           d,
                                           ptr_or_null<acc_t>(weight),
                                           ptr_or_null<acc_t>(bias),
                                           static_cast<acc_t>(eps),
                                           z.mutable_data_ptr(),
                                           mean.mutable_data_ptr<acc_t>(),
                                           rstd.mutable_data_ptr<acc_t>()};
    run_phase("surgical_gate_forward", h, a,
              [&] { SURGELLM_CPU_KERNEL(surgical_gate_forward, scalar_t, a); });
  });
  return {z, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> surgical_gate_backward(
    const Tensor& dz, const Tensor& h, const Tensor& s, const Tensor& logits,
    const optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd) {
  const auto acc = check_rows(h, s, logits, weight);
  const int64_t N = h.size(0), d = h.size(1);
  check_tensor(dz, "grad_z", h, h.sizes(), h.scalar_type());
  check_tensor(mean, "mean", h, {N}, acc);
  check_tensor(rstd, "rstd", h, {N}, acc);
  Tensor dh = empty_output_like(h), ds = empty_output_like(h), dlogits = empty_output_like(h),
         dweight = at::empty({d}, h.options().dtype(acc)),
         dbias = at::empty({d}, h.options().dtype(acc));
  if (N == 0) return {dh, ds, dlogits, dweight.zero_(), dbias.zero_()};
  SURGELLM_DISPATCH_FLOATS(h, "surgical_gate_backward", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const SurgicalGateBackwardArgs<acc_t> a{dz.const_data_ptr(),
                                            h.const_data_ptr(),
                                            s.const_data_ptr(),
                                            logits.const_data_ptr(),
                                            N,
                                            d,
                                            ptr_or_null<acc_t>(weight),
                                            mean.const_data_ptr<acc_t>(),
                                            rstd.const_data_ptr<acc_t>(),
                                            dh.mutable_data_ptr(),
                                            ds.mutable_data_ptr(),
                                            dlogits.mutable_data_ptr(),
                                            dweight.mutable_data_ptr<acc_t>(),
                                            dbias.mutable_data_ptr<acc_t>()};
    run_phase("surgical_gate_backward", h, a,
              [&] { SURGELLM_CPU_KERNEL(surgical_gate_backward, scalar_t, a); });
  });
  return {dh, ds, dlogits, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(surgellm, CPU, m) {
  m.impl("_surgical_gate_forward", &surgical_gate_forward);
  m.impl("_surgical_gate_backward", &surgical_gate_backward);
}

#ifdef SURGELLM_WITH_CUDA
TORCH_LIBRARY_IMPL(surgellm, CUDA, m) {
  m.impl("_surgical_gate_forward", &surgical_gate_forward);
  m.impl("_surgical_gate_backward", &surgical_gate_backward);
}
#endif

}  // namespace surgellm
