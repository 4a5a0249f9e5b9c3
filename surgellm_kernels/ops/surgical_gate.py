"""``fused_surgical_gate``: sigmoid gate + blend + LayerNorm (Eq.6-7), one pass.

``z = LayerNorm_lastdim(g * h + (1 - g) * s) * weight + bias`` with
``g = sigmoid(gate_logits)``. The op is ``torch.ops.surgellm.surgical_gate``,
declared with its forward and backward kernels and its one autograd
implementation in csrc/ops/surgical_gate.cpp; the dispatcher runs the CPU or
CUDA C++ kernels, or the Triton kernels registered for the device when Triton
is the chosen backend. This file gives the kernels their fake
implementations (for ``torch.compile``) and makes the call: an eager call
crosses into C++ once (``_C.fused_surgical_gate`` checks the arguments as
``_checks.check_surgical_gate_args`` does, then calls the op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from .. import _backend
from .._checks import accumulation_dtype, check_surgical_gate_args
from ..reference import surgical_gate_reference

__all__ = ["fused_surgical_gate"]


def _register_fake_kernels() -> None:
    @torch.library.register_fake("surgellm::surgical_gate_forward")
    def _(h, s, gate_logits, weight, bias, eps):
        stats = h.new_empty((h.shape[0],), dtype=accumulation_dtype(h.dtype))
        return torch.empty_like(h), stats, torch.empty_like(stats)

    @torch.library.register_fake("surgellm::surgical_gate_backward")
    def _(grad_z, h, s, gate_logits, weight, mean, rstd):
        per_feature = h.new_empty((h.shape[1],), dtype=accumulation_dtype(h.dtype))
        return (torch.empty_like(h), torch.empty_like(h), torch.empty_like(h), per_feature,
                torch.empty_like(per_feature))


if _backend.extension() is not None:
    _register_fake_kernels()


def fused_surgical_gate(h: Tensor, s: Tensor, gate_logits: Tensor,
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        eps: float = 1e-5) -> Tensor:
    """Gated blend of ``h`` and ``s`` followed by LayerNorm over the last dim.

    ``h``, ``s``, ``gate_logits``: one shape (..., d) and one floating dtype;
    ``weight``, ``bias``: (d,). Returns z with the shape and dtype of ``h``.
    Statistics accumulate in float32 (float64 for float64 inputs).
    """
    # One crossing into C++ (checks and op, csrc/ops/eager_calls.cpp), except
    # for traces, tensor subclasses and TorchFunctionModes (see ops/iwn.py).
    if (isinstance(h, Tensor) and not torch.compiler.is_compiling() and
            not has_torch_function_variadic(h, s, gate_logits, weight, bias) and
            _backend.select_backend("surgical_gate", h.device) != "eager"):
        return _backend.extension().fused_surgical_gate(h, s, gate_logits, weight, bias, eps)
    check_surgical_gate_args(h, s, gate_logits, weight, bias, eps)
    backend = _backend.select_backend("surgical_gate", h.device)
    if backend == "eager":
        return surgical_gate_reference(h, s, gate_logits, weight, bias, eps)
    return torch.ops.surgellm.surgical_gate(h, s, gate_logits, weight, bias, float(eps))
