// The ops' eager calls in one crossing from Python: the argument checks of
// surgellm_kernels/_checks.py (check_iwn_args, check_surgical_gate_args: the
// same errors, in the same order, with the same messages) and the call of
// the dispatcher op (surgellm::iwn, surgellm::surgical_gate). The Python
// functions keep their signatures and docstrings and hand their arguments
// over untouched; torch.compile traces the Python checks and torch.ops
// instead (a pybind11 function is opaque to it), as do tensor subclasses and
// TorchFunctionModes. tests/test_validation.py runs every bad input through
// both.
//
// Only the error paths format Python values (repr of a number, str of a
// dtype): a valid call touches no Python object beyond unpacking the tensors.
#include "eager_calls.h"

#include "ops/kernel_call.h"

#include <torch/csrc/autograd/python_variable.h>

#include <sstream>

namespace surgellm {
namespace {

namespace py = pybind11;
using at::Tensor;
using std::optional;

std::string repr_text(py::handle h) { return py::repr(h).cast<std::string>(); }

// type(h).__name__
std::string type_name(py::handle h) {
  return py::type::handle_of(h).attr("__name__").cast<std::string>();
}

// Python's tuple(t.shape) as text: (4,), (6, 4), ().
std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

// str(torch.float32) == "torch.float32"
std::string dtype_text(const Tensor& t) {
  return py::str(py::reinterpret_steal<py::object>(THPVariable_Wrap(t)).attr("dtype"));
}

// A torch.Tensor argument (a TypeError naming the argument otherwise).
Tensor required_tensor(py::handle h, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(h.ptr()), name, " must be a torch.Tensor, got ",
                   type_name(h));
  return THPVariable_Unpack(h.ptr());
}

// An optional tensor argument: None, or a torch.Tensor.
optional<Tensor> tensor_arg(py::handle h, const char* name) {
  if (h.is_none()) return std::nullopt;
  return required_tensor(h, name);
}

bool is_float_dtype(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t), name,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got "
                   "dtype ", dtype_text(t));
}

// `first`: the argument whose device the others must share.
void check_device(const Tensor& t, const char* name, const Tensor& x, const char* first = "x") {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but ", first,
                    " is on ", x.device(), ": all tensors must be on one device");
}

void check_index_tensor(const Tensor& t, const char* name, at::IntArrayRef rows,
                        const Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got dtype ",
                   dtype_text(t));
  TORCH_CHECK_VALUE(t.sizes() == rows, name, " must have shape ", shape_text(rows),
                    " (x.shape[:-1]), got ", shape_text(t.sizes()));
  check_device(t, name, x);
}

// An optional (F,) parameter (weight, bias) of a floating dtype on the
// device of `like` (named `first` in the message).
optional<Tensor> feature_param(py::handle h, const char* name, const Tensor& like,
                               const char* first, int64_t F) {
  optional<Tensor> p = tensor_arg(h, name);
  if (!p.has_value()) return p;
  check_float(*p, name);
  check_device(*p, name, like, first);
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == F, name, " must have shape (", F, ",), got ",
                    shape_text(p->sizes()));
  return p;
}

// A Python int or float (bool included, as isinstance(v, (int, float)) has it).
optional<double> number(py::handle h) {
  if (PyFloat_Check(h.ptr()) || PyLong_Check(h.ptr())) return PyFloat_AsDouble(h.ptr());
  return std::nullopt;
}

}  // namespace

Tensor fused_iwn_call(py::handle x_h, py::handle labels_h, py::handle gate_h,
                      py::handle weight_h, py::handle bias_h, py::handle running_mean_h,
                      py::handle running_std_h, py::handle task_ids_h, bool training,
                      py::handle momentum_h, py::handle eps_h, py::handle std_mode_h,
                      py::handle num_classes_h, const optional<std::string>& group_name,
                      int64_t group_size) {
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be positive, got ", group_size);
  const bool synced = group_name.has_value() && group_size > 1;
  const Tensor x = required_tensor(x_h, "x");
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension (..., F), got a scalar");
  const int64_t F = x.size(-1);
  TORCH_CHECK_VALUE(F != 0, "x must have at least one feature (last dimension > 0), got shape ",
                    shape_text(x.sizes()));
  const at::IntArrayRef rows = x.sizes().slice(0, x.dim() - 1);

  bool pooled = false;
  {
    const bool is_str = PyUnicode_Check(std_mode_h.ptr());
    const std::string mode = is_str ? std_mode_h.cast<std::string>() : std::string();
    TORCH_CHECK_VALUE(is_str && (mode == "class_mean" || mode == "pooled"),
                      "std_mode must be one of ('class_mean', 'pooled'), got ", repr_text(std_mode_h));
    pooled = mode == "pooled";
  }
  const optional<double> eps = number(eps_h);
  TORCH_CHECK_VALUE(eps.has_value() && !(*eps < 0), "eps must be a non-negative number, got ",
                    repr_text(eps_h));
  const optional<double> momentum = number(momentum_h);
  TORCH_CHECK_VALUE(momentum.has_value() && *momentum >= 0.0 && *momentum <= 1.0,
                    "momentum must be a number in [0, 1], got ", repr_text(momentum_h));

  const optional<Tensor> gate = tensor_arg(gate_h, "gate");
  if (gate.has_value()) {
    check_float(*gate, "gate");
    check_device(*gate, "gate", x);
    TORCH_CHECK_VALUE((gate->dim() == 1 && gate->size(0) == F) || gate->sizes() == x.sizes(),
                      "gate must have shape (", F, ",) or the shape of x ", shape_text(x.sizes()),
                      ", got ", shape_text(gate->sizes()));
    TORCH_CHECK_TYPE(!(gate->sizes() == x.sizes() && gate->dim() > 1 &&
                       gate->scalar_type() != x.scalar_type()),
                     "a per-instance gate must have the dtype of x (", dtype_text(x), "), got ",
                     dtype_text(*gate));
  }
  const optional<Tensor> weight = feature_param(weight_h, "weight", x, "x", F);
  const optional<Tensor> bias = feature_param(bias_h, "bias", x, "x", F);

  TORCH_CHECK_VALUE(running_mean_h.is_none() == running_std_h.is_none(),
                    "running_mean and running_std must be given together, got ",
                    running_std_h.is_none() ? "running_mean" : "running_std", " only");
  optional<Tensor> running_mean, running_std;
  int64_t num_tasks = 1;
  if (!running_mean_h.is_none()) {
    for (const auto& [h, r, name] : {std::tuple{running_mean_h, &running_mean, "running_mean"},
                                     std::tuple{running_std_h, &running_std, "running_std"}}) {
      *r = tensor_arg(h, name);
      check_float(**r, name);
      check_device(**r, name, x);
      TORCH_CHECK_VALUE(((*r)->dim() == 1 || (*r)->dim() == 2) && (*r)->size(-1) == F, name,
                        " must have shape (", F, ",) or (num_tasks, ", F, "), got ",
                        shape_text((*r)->sizes()));
    }
    TORCH_CHECK_VALUE(running_mean->sizes() == running_std->sizes(), "running_mean ",
                      shape_text(running_mean->sizes()), " and running_std ",
                      shape_text(running_std->sizes()), " must have the same shape");
    num_tasks = running_mean->dim() == 2 ? running_mean->size(0) : 1;
    TORCH_CHECK_VALUE(!(running_mean->dim() == 1 && !task_ids_h.is_none()),
                      "task_ids were given but running_mean has shape (F,): per-task "
                      "statistics need (num_tasks, F) running_mean / running_std");
    TORCH_CHECK_VALUE(!(running_mean->dim() == 2 && num_tasks > 1 && task_ids_h.is_none()),
                      "running statistics hold ", num_tasks, " tasks: task_ids (shape ",
                      shape_text(rows), ") are required to pick each row's task");
  }
  const optional<Tensor> task_ids = tensor_arg(task_ids_h, "task_ids");
  if (task_ids.has_value()) {
    check_index_tensor(*task_ids, "task_ids", rows, x);
    // Without running statistics the task count comes from the data.
    if (!running_mean.has_value()) {
      TORCH_CHECK_VALUE(!synced,
                        "task_ids with a process_group need running_mean / running_std of "
                        "shape (num_tasks, F): every rank must use the same task count, not "
                        "the one its own rows show");
      num_tasks = task_ids->numel() ? task_ids->max().item<int64_t>() + 1 : 1;
    }
  }

  optional<Tensor> labels;
  int64_t num_classes = 1;
  if (training) {
    TORCH_CHECK_VALUE(!labels_h.is_none(),
                      "labels are required in training: class-balanced statistics need each "
                      "row's class (pass labels, or training=False with running stats)");
    labels = tensor_arg(labels_h, "labels");
    check_index_tensor(*labels, "labels", rows, x);
    TORCH_CHECK_VALUE(x.numel() != 0 || synced,
                      "x has no rows: training statistics need at least one row");
    py::object given = py::reinterpret_borrow<py::object>(num_classes_h);
    TORCH_CHECK_VALUE(!(synced && given.is_none()),
                      "num_classes is required with a process_group: every rank must group its "
                      "rows by the same classes, not those its own labels show");
    if (given.is_none()) {
      const std::vector<int64_t> bounds = min_max_on_host({*labels});  // (lo, hi)
      TORCH_CHECK_VALUE(bounds[1] >= 0, "labels must be class indices (>= 0), got values in [",
                        bounds[0], ", ", bounds[1], "]");
      given = py::int_(bounds[1] + 1);
    }
    TORCH_CHECK_VALUE(PyLong_Check(given.ptr()) && PyObject_RichCompareBool(
                                                        given.ptr(), py::int_(1).ptr(), Py_GE) == 1,
                      "num_classes must be a positive int, got ", repr_text(given));
    num_classes = given.cast<int64_t>();
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value(),
                      "running_mean and running_std are required when training=False (there "
                      "are no batch statistics to normalize with)");
  }

  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("surgellm::iwn", "")
          .typed<Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                        const optional<Tensor>&, const optional<Tensor>&,
                        const optional<Tensor>&, const optional<Tensor>&,
                        const optional<Tensor>&, bool, double, double, bool, int64_t,
                        int64_t, optional<c10::string_view>, int64_t)>();
  py::gil_scoped_release no_gil;
  return op.call(x, labels, task_ids, gate, weight, bias, running_mean, running_std, training,
                 *momentum, *eps, pooled, num_tasks, num_classes,
                 synced ? optional<c10::string_view>(*group_name) : std::nullopt, group_size);
}

Tensor fused_surgical_gate_call(py::handle h_h, py::handle s_h, py::handle gate_logits_h,
                                py::handle weight_h, py::handle bias_h, py::handle eps_h) {
  const Tensor h = required_tensor(h_h, "h");
  check_float(h, "h");
  TORCH_CHECK_VALUE(h.dim() >= 1 && h.size(-1) != 0, "h must have shape (..., d) with d > 0, got ",
                    shape_text(h.sizes()));
  Tensor s, gate_logits;
  for (const auto& [handle, t, name] :
       {std::tuple{s_h, &s, "s"}, std::tuple{gate_logits_h, &gate_logits, "gate_logits"}}) {
    *t = required_tensor(handle, name);
    check_float(*t, name);
    check_device(*t, name, h, "h");
    TORCH_CHECK_VALUE(t->sizes() == h.sizes(), name, " must have the shape of h ",
                      shape_text(h.sizes()), ", got ", shape_text(t->sizes()));
    TORCH_CHECK_TYPE(t->scalar_type() == h.scalar_type(), name, " must have the dtype of h (",
                     dtype_text(h), "), got ", dtype_text(*t));
  }
  const int64_t d = h.size(-1);
  const optional<Tensor> weight = feature_param(weight_h, "weight", h, "h", d);
  const optional<Tensor> bias = feature_param(bias_h, "bias", h, "h", d);
  const optional<double> eps = number(eps_h);
  TORCH_CHECK_VALUE(eps.has_value() && *eps > 0, "eps must be a positive number, got ",
                    repr_text(eps_h));

  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("surgellm::surgical_gate", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                        const optional<Tensor>&, double)>();
  py::gil_scoped_release no_gil;
  return op.call(h, s, gate_logits, weight, bias, *eps);
}

}  // namespace surgellm
