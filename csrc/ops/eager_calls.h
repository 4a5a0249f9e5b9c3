// The ops' eager entries from Python (eager_calls.cpp), bound in bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace surgellm {

// fused_iwn(x, labels, gate, weight, bias, running_mean, running_std,
// task_ids, training, momentum, eps, std_mode, num_classes): the arguments as
// Python passed them; checked as _checks.check_iwn_args checks them, then
// surgellm::iwn is called. group_name / group_size: the process group a
// training call synchronizes over (checked in Python), or none.
at::Tensor fused_iwn_call(pybind11::handle x, pybind11::handle labels, pybind11::handle gate,
                          pybind11::handle weight, pybind11::handle bias,
                          pybind11::handle running_mean, pybind11::handle running_std,
                          pybind11::handle task_ids, bool training, pybind11::handle momentum,
                          pybind11::handle eps, pybind11::handle std_mode,
                          pybind11::handle num_classes,
                          const std::optional<std::string>& group_name, int64_t group_size);

// fused_surgical_gate(h, s, gate_logits, weight, bias, eps), checked as
// _checks.check_surgical_gate_args checks it, then surgellm::surgical_gate.
at::Tensor fused_surgical_gate_call(pybind11::handle h, pybind11::handle s,
                                    pybind11::handle gate_logits, pybind11::handle weight,
                                    pybind11::handle bias, pybind11::handle eps);

}  // namespace surgellm
