// fused_surgical_gate as dispatcher ops: surgellm::surgical_gate (what users
// call) with its one autograd implementation, and the two kernels it runs,
// surgical_gate_forward / surgical_gate_backward, with their CPU and CUDA
// entry points here (the Triton kernels are registered for the device from
// Python when Triton is the chosen backend; fake kernels in
// surgellm_kernels/ops/surgical_gate.py).
//
// z = LayerNorm_lastdim(g * h + (1 - g) * s) * weight + bias, g = sigmoid(gate_logits).
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/surgical_gate.h"
#include "ops/kernel_call.h"

namespace surgellm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// -- kernels: checks, outputs, dispatch -----------------------------------------------

// h, s, logits: (N, d) contiguous, one floating dtype; weight, bias: (d) acc.
at::ScalarType check_rows(const Tensor& h, const Tensor& s, const Tensor& logits,
                          const optional<Tensor>& weight) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) > 0, "h must be 2-D (N, d) with d > 0, got ",
              h.sizes());
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous");
  const auto st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
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
                                                         const optional<Tensor>& bias,
                                                         double eps) {
  const auto acc = check_rows(h, s, logits, weight);
  const int64_t N = h.size(0), d = h.size(1);
  check_optional(bias, "bias", h, {d}, acc);
  Tensor z = at::empty_like(h), mean = at::empty({N}, h.options().dtype(acc)),
         rstd = at::empty({N}, h.options().dtype(acc));
  if (N == 0) return {z, mean, rstd};
  SURGELLM_DISPATCH_FLOATS(h, "surgical_gate_forward", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const SurgicalGateForwardArgs<acc_t> a{
        h.const_data_ptr(), s.const_data_ptr(), logits.const_data_ptr(), N, d,
        ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias), static_cast<acc_t>(eps),
        z.mutable_data_ptr(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>()};
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
  Tensor dh = at::empty_like(h), ds = at::empty_like(h), dlogits = at::empty_like(h),
         dweight = at::empty({d}, h.options().dtype(acc)),
         dbias = at::empty({d}, h.options().dtype(acc));
  if (N == 0) return {dh, ds, dlogits, dweight.zero_(), dbias.zero_()};
  SURGELLM_DISPATCH_FLOATS(h, "surgical_gate_backward", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const SurgicalGateBackwardArgs<acc_t> a{
        dz.const_data_ptr(), h.const_data_ptr(), s.const_data_ptr(), logits.const_data_ptr(),
        N, d, ptr_or_null<acc_t>(weight), mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), dh.mutable_data_ptr(), ds.mutable_data_ptr(),
        dlogits.mutable_data_ptr(), dweight.mutable_data_ptr<acc_t>(),
        dbias.mutable_data_ptr<acc_t>()};
    run_phase("surgical_gate_backward", h, a,
              [&] { SURGELLM_CPU_KERNEL(surgical_gate_backward, scalar_t, a); });
  });
  return {dh, ds, dlogits, dweight, dbias};
}

// -- the op: flatten to rows, the kernels through the dispatcher, autograd -------------

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor>;
ForwardOutputs call_forward(const Tensor& h, const Tensor& s, const Tensor& logits,
                            const optional<Tensor>& weight, const optional<Tensor>& bias,
                            double eps) {
  static const auto handle =
      op<ForwardOutputs(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                        const optional<Tensor>&, double)>("surgellm::surgical_gate_forward");
  return handle.call(h, s, logits, weight, bias, eps);
}

using BackwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
BackwardOutputs call_backward(const Tensor& dz, const Tensor& h, const Tensor& s,
                              const Tensor& logits, const optional<Tensor>& weight,
                              const Tensor& mean, const Tensor& rstd) {
  static const auto handle =
      op<BackwardOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const optional<Tensor>&, const Tensor&, const Tensor&)>(
          "surgellm::surgical_gate_backward");
  return handle.call(dz, h, s, logits, weight, mean, rstd);
}

// (N, d) contiguous rows of h, s, logits (any layout accepted), weight and
// bias in the accumulation type.
struct Rows {
  Tensor h, s, logits;
  optional<Tensor> weight, bias;
};

Rows rows_of(const Tensor& h, const Tensor& s, const Tensor& logits,
             const optional<Tensor>& weight, const optional<Tensor>& bias) {
  TORCH_CHECK(h.dim() >= 1 && h.sym_size(-1) > 0, "h must have shape (..., d) with d > 0");
  TORCH_CHECK(s.sym_sizes() == h.sym_sizes() && logits.sym_sizes() == h.sym_sizes(),
              "h, s and gate_logits must have one shape");
  const c10::SymInt d = h.sym_size(-1);
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row = [&](const Tensor& t) { return t.reshape_symint({-1, d}).contiguous(); };
  auto vec = [&](const optional<Tensor>& t) -> optional<Tensor> {
    if (!t.has_value()) return std::nullopt;
    TORCH_CHECK(t->dim() == 1 && t->sym_size(0) == d, "weight and bias must have shape (d,)");
    return t->to(acc).contiguous();
  };
  return {row(h), row(s), row(logits), vec(weight), vec(bias)};
}

Tensor surgical_gate_composite(const Tensor& h, const Tensor& s, const Tensor& logits,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               double eps) {
  const Rows r = rows_of(h, s, logits, weight, bias);
  return std::get<0>(call_forward(r.h, r.s, r.logits, r.weight, r.bias, eps))
      .view_symint(h.sym_sizes());
}

class SurgicalGateFunction : public torch::autograd::Function<SurgicalGateFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& s,
                        const Tensor& logits, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Rows r = rows_of(h, s, logits, weight, bias);
    auto [z, mean, rstd] = call_forward(r.h, r.s, r.logits, r.weight, r.bias, eps);
    // The inputs themselves where the kernels read them in place (backward
    // re-derives the rows), so autograd's version check sees in-place changes;
    // a non-contiguous input's (N, d) copy otherwise.
    auto input = [](const Tensor& rows, const Tensor& given) {
      return rows.is_alias_of(given) ? given : rows;
    };
    ctx->save_for_backward({input(r.h, h), input(r.s, s), input(r.logits, logits),
                            r.weight.has_value() ? input(*r.weight, *weight) : Tensor(), mean,
                            rstd});
    ctx->saved_data["sizes"] = h.sym_sizes();
    ctx->saved_data["has_bias"] = bias.has_value();
    return z.view_symint(h.sym_sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The backward kernel is not differentiable: refuse a double backward
    // rather than silently drop its second-order terms.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused_surgical_gate has no double backward (backward with create_graph=True)");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto saved = ctx->get_saved_variables();
    const optional<Tensor> weight =
        saved[3].defined() ? optional<Tensor>(saved[3]) : std::nullopt;
    // Each input was saved as given or as its (N, d) copy: re-derive the rows
    // of each on its own.
    const auto sizes = ctx->saved_data["sizes"].toSymIntVector();
    const c10::SymInt d = saved[0].sym_size(-1);
    auto rows = [&](const Tensor& t) { return t.reshape_symint({-1, d}); };
    const Rows r = rows_of(rows(saved[0]), rows(saved[1]), rows(saved[2]), weight, std::nullopt);
    const Tensor dz = grad_outputs[0].reshape_symint(r.h.sym_sizes()).contiguous();
    auto [dh, ds, dlogits, dweight, dbias] =
        call_backward(dz, r.h, r.s, r.logits, r.weight, saved[4], saved[5]);
    return {dh.view_symint(sizes),
            ds.view_symint(sizes),
            dlogits.view_symint(sizes),
            weight.has_value() ? dweight : Tensor(),
            ctx->saved_data["has_bias"].toBool() ? dbias : Tensor(),
            Tensor()};
  }
};

Tensor surgical_gate_autograd(const Tensor& h, const Tensor& s, const Tensor& logits,
                              const optional<Tensor>& weight, const optional<Tensor>& bias,
                              double eps) {
  if (!autograd_records(h, s, logits, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return surgical_gate_composite(h, s, logits, weight, bias, eps);
  }
  return SurgicalGateFunction::apply(h, s, logits, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surgellm, m) {
  // h, s, gate_logits (..., d) of one shape; weight, bias (d).
  m.def(
      "surgical_gate(Tensor h, Tensor s, Tensor gate_logits, Tensor? weight, Tensor? bias, "
      "float eps) -> Tensor");
  // The kernels: rows (N, d) contiguous; weight, bias, mean, rstd, dweight and
  // dbias in the accumulation dtype.
  m.def(
      "surgical_gate_forward(Tensor h, Tensor s, Tensor gate_logits, Tensor? weight, "
      "Tensor? bias, float eps) -> (Tensor z, Tensor mean, Tensor rstd)");
  m.def(
      "surgical_gate_backward(Tensor grad_z, Tensor h, Tensor s, Tensor gate_logits, "
      "Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor dh, Tensor ds, "
      "Tensor dgate_logits, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(surgellm, CPU, m) {
  m.impl("surgical_gate_forward", &surgical_gate_forward);
  m.impl("surgical_gate_backward", &surgical_gate_backward);
}

#ifdef SURGELLM_WITH_CUDA
TORCH_LIBRARY_IMPL(surgellm, CUDA, m) {
  m.impl("surgical_gate_forward", &surgical_gate_forward);
  m.impl("surgical_gate_backward", &surgical_gate_backward);
}
#endif

TORCH_LIBRARY_IMPL(surgellm, CompositeExplicitAutograd, m) {
  m.impl("surgical_gate", &surgical_gate_composite);
}

TORCH_LIBRARY_IMPL(surgellm, Autograd, m) {
  m.impl("surgical_gate", &surgical_gate_autograd);
}

}  // namespace surgellm
