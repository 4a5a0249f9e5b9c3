"""``fused_surgical_gate``: sigmoid gate + blend + LayerNorm (Eq.6-7), one pass.

``z = LayerNorm_lastdim(g * h + (1 - g) * s) * weight + bias`` with
``g = sigmoid(gate_logits)``. The op is ``torch.ops.surgellm.surgical_gate``
(csrc/surgical_gate/surgical_gate.cpp: its schema, its argument checks and
its one autograd implementation); the dispatcher runs its forward and
backward kernels on the CPU or CUDA C++ kernels, or on the Triton kernels
registered for the device when Triton is the chosen backend. This file gives
the kernels their fake implementations (for ``torch.compile``) and makes the
call: one crossing into C++.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend
from .reference import accumulation_dtype, surgical_gate_reference

__all__ = ["fused_surgical_gate"]


def _register_fake_kernels() -> None:
    @torch.library.register_fake("surgellm::_surgical_gate_forward")
    def _(h, s, gate_logits, weight, bias, eps):
        stats = h.new_empty((h.shape[0],), dtype=accumulation_dtype(h.dtype))
        return torch.empty_like(h), stats, torch.empty_like(stats)

    @torch.library.register_fake("surgellm::_surgical_gate_backward")
    def _(grad_z, h, s, gate_logits, weight, mean, rstd):
        per_feature = h.new_empty((h.shape[1],), dtype=accumulation_dtype(h.dtype))
        return (
            torch.empty_like(h),
            torch.empty_like(h),
            torch.empty_like(h),
            per_feature,
            torch.empty_like(per_feature),
        )


if _backend.extension() is not None:
    _register_fake_kernels()
    for _name in ("_surgical_gate_check_args", "surgical_gate"):
        _backend.register_vmap_by_samples(_name, "_surgical_gate_check_args")


def fused_surgical_gate(
    h: Tensor,
    s: Tensor,
    gate_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Gated blend of ``h`` and ``s`` followed by LayerNorm over the last dim.

    ``h``, ``s``, ``gate_logits``: one shape (..., d) and one floating dtype;
    ``weight``, ``bias``: (d,). Returns z with the shape and dtype of ``h``.
    Statistics accumulate in float32 (float64 for float64 inputs). Bad
    arguments raise ``ValueError`` or ``TypeError`` naming the argument.
    """
    device = h.device if isinstance(h, Tensor) else torch.device("cpu")
    if _backend.select_backend("surgical_gate", device) == "eager":
        return surgical_gate_reference(h, s, gate_logits, weight, bias, eps)
    return _backend.call_op("surgical_gate", (h, s, gate_logits, weight, bias, eps))
