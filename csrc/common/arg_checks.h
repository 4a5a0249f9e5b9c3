// The argument checks the ops share (each op's check_<op>_args, in
// csrc/<op>/<op>.cpp, is built of these), with messages that show values as
// Python does: they reach users as the ValueError / TypeError of their call.
#pragma once

#include <ATen/ATen.h>

#include <charconv>
#include <optional>
#include <sstream>
#include <string>

namespace surgellm {

using at::Tensor;
using std::optional;

// tuple(t.shape): (4,), (6, 4), ().
inline std::string shape_text(c10::SymIntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

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

// repr(float): the shortest text that reads back as v (1e-05, 1.5, -1.0).
inline std::string number_text(double v) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof(buf), v).ptr;
  std::string text(buf, end);
  if (text.find_first_of(".en") == std::string::npos) text += ".0";  // "inf", "nan" have n
  return text;
}

inline bool is_float(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

inline void check_float(const Tensor& t, const char* name) {
  // A required Tensor argument given None arrives undefined.
  TORCH_CHECK_TYPE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(is_float(t), name,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got "
                   "dtype ",
                   dtype_text(t));
}

// `first`: the argument whose device the others must share.
inline void check_device(const Tensor& t, const char* name, const Tensor& first_tensor,
                         const char* first) {
  TORCH_CHECK_VALUE(t.device() == first_tensor.device(), name, " is on ", t.device(), " but ",
                    first, " is on ", first_tensor.device(), ": all tensors must be on one device");
}

inline void check_index_tensor(const Tensor& t, const char* name, c10::SymIntArrayRef rows,
                               const Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got dtype ",
                   dtype_text(t));
  TORCH_CHECK_VALUE(t.sym_sizes() == rows, name, " must have shape ", shape_text(rows),
                    " (x.shape[:-1]), got ", shape_text(t.sym_sizes()));
  check_device(t, name, x, "x");
}

// An optional (F,) floating parameter (weight, bias) on first_tensor's device.
inline void check_feature_param(const optional<Tensor>& p, const char* name,
                                const Tensor& first_tensor, const char* first,
                                const c10::SymInt& F) {
  if (!p.has_value()) return;
  check_float(*p, name);
  check_device(*p, name, first_tensor, first);
  TORCH_CHECK_VALUE(p->dim() == 1 && p->sym_size(0) == F, name, " must have shape (", F, ",), got ",
                    shape_text(p->sym_sizes()));
}

}  // namespace surgellm
