// fused_surgical_gate as dispatcher ops: the schemas, the argument checks
// (check_surgical_gate_args, the only copy), surgellm::surgical_gate (what
// users call) and its one autograd implementation, which runs two kernel
// ops, _surgical_gate_forward / _surgical_gate_backward (CPU and CUDA kernels
// in surgical_gate_kernels.cpp; Triton kernels registered for the device from
// Python when Triton is the chosen backend; fake kernels in
// surgellm_kernels/ops/surgical_gate.py).
//
// z = LayerNorm_lastdim(g * h + (1 - g) * s) * weight + bias, g = sigmoid(gate_logits).
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/arg_checks.h"
#include "common/kernel_call.h"

namespace surgellm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_surgical_gate_args(const Tensor& h, const Tensor& s, const Tensor& logits,
                              const optional<Tensor>& weight, const optional<Tensor>& bias,
                              double eps) {
  check_float(h, "h");
  SURGELLM_CHECK_VALUE(h.dim() >= 1 && h.sym_size(-1) != 0,
                       "h must have shape (..., d) with d > 0, got ", shape_text(h.sym_sizes()));
  for (const auto& [t, name] : {std::pair{&s, "s"}, std::pair{&logits, "gate_logits"}}) {
    check_float(*t, name);
    check_device(*t, name, h, "h");
    SURGELLM_CHECK_VALUE(t->sym_sizes() == h.sym_sizes(), name, " must have the shape of h ",
                         shape_text(h.sym_sizes()), ", got ", shape_text(t->sym_sizes()));
    SURGELLM_CHECK_TYPE(t->scalar_type() == h.scalar_type(), name, " must have the dtype of h (",
                        dtype_text(h), "), got ", dtype_text(*t));
  }
  check_feature_param(weight, "weight", h, "h", h.sym_size(-1));
  check_feature_param(bias, "bias", h, "h", h.sym_size(-1));
  SURGELLM_CHECK_VALUE(eps > 0, "eps must be a positive number, got ", number_text(eps));
  check_eps_fits_float32(eps, /*zero_taken=*/false);
}

// -- the op: flatten to rows, the kernels through the dispatcher, autograd -------------

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor>;
ForwardOutputs call_forward(const Tensor& h, const Tensor& s, const Tensor& logits,
                            const optional<Tensor>& weight, const optional<Tensor>& bias,
                            double eps) {
  static const auto handle =
      op_handle<ForwardOutputs(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                               const optional<Tensor>&, double)>(
          "surgellm::_surgical_gate_forward");
  return handle.call(h, s, logits, weight, bias, eps);
}

using BackwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
BackwardOutputs call_backward(const Tensor& dz, const Tensor& h, const Tensor& s,
                              const Tensor& logits, const optional<Tensor>& weight,
                              const Tensor& mean, const Tensor& rstd) {
  static const auto handle =
      op_handle<BackwardOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const optional<Tensor>&, const Tensor&, const Tensor&)>(
          "surgellm::_surgical_gate_backward");
  return handle.call(dz, h, s, logits, weight, mean, rstd);
}

// (N, d) contiguous rows of h, s, logits (any layout accepted), weight and
// bias in the accumulation type.
struct Rows {
  Tensor h, s, logits;
  optional<Tensor> weight, bias;
};

// (Checked first: check_surgical_gate_args.)
Rows rows_of(const Tensor& h, const Tensor& s, const Tensor& logits, const optional<Tensor>& weight,
             const optional<Tensor>& bias) {
  const c10::SymInt d = h.sym_size(-1);
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto row = [&](const Tensor& t) { return t.reshape_symint({-1, d}).contiguous(); };
  auto vec = [&](const optional<Tensor>& t) -> optional<Tensor> {
    if (!t.has_value()) return std::nullopt;
    // (as it is where it fits: aten::to would return it, an input returned
    // by an op below autograd, which torch.library.opcheck refuses)
    if (t->scalar_type() == acc && t->is_contiguous()) return t;
    return t->to(acc).contiguous();
  };
  return {row(h), row(s), row(logits), vec(weight), vec(bias)};
}

Tensor forward_without_autograd(const Tensor& h, const Tensor& s, const Tensor& logits,
                                const optional<Tensor>& weight, const optional<Tensor>& bias,
                                double eps) {
  const Rows r = rows_of(h, s, logits, weight, bias);
  return std::get<0>(call_forward(r.h, r.s, r.logits, r.weight, r.bias, eps))
      .view_symint(h.sym_sizes());
}

Tensor surgical_gate_composite(const Tensor& h, const Tensor& s, const Tensor& logits,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               double eps) {
  check_surgical_gate_args(h, s, logits, weight, bias, eps);
  return forward_without_autograd(h, s, logits, weight, bias, eps);
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
    const Tensor saved_h = input(r.h, h), saved_s = input(r.s, s),
                 saved_logits = input(r.logits, logits),
                 saved_weight = r.weight.has_value() ? input(*r.weight, *weight) : Tensor();
    refuse_inference_saved(
        "fused_surgical_gate",
        {{"h", saved_h}, {"s", saved_s}, {"gate_logits", saved_logits}, {"weight", saved_weight}});
    ctx->save_for_backward({saved_h, saved_s, saved_logits, saved_weight, mean, rstd});
    ctx->saved_data["sizes"] = h.sym_sizes();
    ctx->saved_data["has_bias"] = bias.has_value();
    return z.view_symint(h.sym_sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The backward kernel is not differentiable: refuse a double backward
    // rather than silently drop its second-order terms.
    SURGELLM_CHECK(!at::GradMode::is_enabled(),
                   "fused_surgical_gate has no double backward (backward with create_graph=True)");
    // Unpacked before leaving autograd: under torch.utils.checkpoint
    // (non-reentrant) unpacking runs the forward again, which must record
    // its autograd node to save what this backward reads.
    const auto saved = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const optional<Tensor> weight = saved[3].defined() ? optional<Tensor>(saved[3]) : std::nullopt;
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
  check_surgical_gate_args(h, s, logits, weight, bias, eps);
  refuse_forward_ad("fused_surgical_gate", h, s, logits, weight, bias);
  if (!autograd_records(h, s, logits, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_without_autograd(h, s, logits, weight, bias, eps);
  }
  refuse_functorch_autograd("fused_surgical_gate");
  return SurgicalGateFunction::apply(h, s, logits, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(surgellm, m) {
  // The fake kernels of the kernel ops live in this Python module.
  m.set_python_module("surgellm_kernels.ops.surgical_gate");
  // h, s, gate_logits (..., d) of one shape; weight, bias (d).
  m.def(
      "surgical_gate(Tensor h, Tensor s, Tensor gate_logits, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05) -> Tensor");
  // The kernels: rows (N, d) contiguous; weight, bias, mean, rstd, dweight and
  // dbias in the accumulation dtype.
  // The checks alone, for the reference (surgellm_kernels/ops/reference.py).
  m.def(
      "_surgical_gate_check_args(Tensor h, Tensor s, Tensor gate_logits, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05) -> ()");
  m.def(
      "_surgical_gate_forward(Tensor h, Tensor s, Tensor gate_logits, Tensor? weight, "
      "Tensor? bias, float eps) -> (Tensor z, Tensor mean, Tensor rstd)");
  m.def(
      "_surgical_gate_backward(Tensor grad_z, Tensor h, Tensor s, Tensor gate_logits, "
      "Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor dh, Tensor ds, "
      "Tensor dgate_logits, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(surgellm, CompositeImplicitAutograd, m) {
  m.impl("_surgical_gate_check_args", &check_surgical_gate_args);
}

TORCH_LIBRARY_IMPL(surgellm, CompositeExplicitAutograd, m) {
  m.impl("surgical_gate", &surgical_gate_composite);
}

TORCH_LIBRARY_IMPL(surgellm, Autograd, m) { m.impl("surgical_gate", &surgical_gate_autograd); }

}  // namespace surgellm
