// The argument checks the ops share (each op's check_<op>_args, in
// csrc/<op>/<op>.cpp, is built of these), with messages that show values as
// Python does: they reach users as the ValueError / TypeError of their call.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "common/message.h"

namespace surgellm {

using at::Tensor;
using std::optional;

// str(t.dtype): torch.float32.
inline std::string dtype_text(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return std::string("torch.") + c10::toString(t.scalar_type());
  }
}

// eps 0 or in float32's normal range: the Triton kernels take it as three
// float32 parts that sum to it (exactly from 2^-97 up, to float32's precision
// below), which rounded a smaller eps (to 0 below 1.4e-45: 0 / 0 in a
// constant feature); any larger eps normalizes everything to the bias.
inline void check_eps_fits_float32(double eps, bool zero_taken) {
  constexpr double kFloat32Max = 3.4028234663852886e38, kFloat32MinNormal = 1.1754943508222875e-38;
  SURGELLM_CHECK_VALUE(eps <= kFloat32Max, "eps must be at most ", number_text(kFloat32Max),
                       " (float32's largest), got ", number_text(eps));
  SURGELLM_CHECK_VALUE((zero_taken && eps == 0) || eps >= kFloat32MinNormal, "eps must be ",
                       zero_taken ? "0 or " : "", "at least ", number_text(kFloat32MinNormal),
                       " (float32's smallest normal), got ", number_text(eps));
}

inline bool is_float(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

inline void check_float(const Tensor& t, const char* name) {
  // A required Tensor argument given None arrives undefined.
  SURGELLM_CHECK_TYPE(t.defined(), name, " must be a tensor, got None");
  SURGELLM_CHECK_TYPE(is_float(t), name,
                      " must be a floating tensor (float16, bfloat16, float32 or float64), got "
                      "dtype ",
                      dtype_text(t));
}

// `first`: the argument whose device the others must share.
inline void check_device(const Tensor& t, const char* name, const Tensor& first_tensor,
                         const char* first) {
  SURGELLM_CHECK_VALUE(t.device() == first_tensor.device(), name, " is on ", t.device(), " but ",
                       first, " is on ", first_tensor.device(),
                       ": all tensors must be on one device");
}

// `rows`: the instances' shape, x.shape[:feature_dim], named by `rows_text`.
inline void check_index_tensor(const Tensor& t, const char* name, c10::SymIntArrayRef rows,
                               const Tensor& x, const std::string& rows_text) {
  SURGELLM_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got dtype ",
                      dtype_text(t));
  SURGELLM_CHECK_VALUE(t.sym_sizes() == rows, name, " must have shape ", shape_text(rows), " (",
                       rows_text, "), got ", shape_text(t.sym_sizes()));
  check_device(t, name, x, "x");
}

// An optional (F,) floating parameter (weight, bias) on first_tensor's device.
inline void check_feature_param(const optional<Tensor>& p, const char* name,
                                const Tensor& first_tensor, const char* first,
                                const c10::SymInt& F) {
  if (!p.has_value()) return;
  check_float(*p, name);
  check_device(*p, name, first_tensor, first);
  SURGELLM_CHECK_VALUE(p->dim() == 1 && p->sym_size(0) == F, name, " must have shape (", F,
                       ",), got ", shape_text(p->sym_sizes()));
}

}  // namespace surgellm
