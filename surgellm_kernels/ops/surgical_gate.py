"""``fused_surgical_gate``: sigmoid gate + blend + LayerNorm (Eq.6-7).

``z = LayerNorm_lastdim(g * h + (1 - g) * s) * weight + bias`` with
``g = sigmoid(gate_logits)``. The signature and checks are final; only the
eager backend implements it so far (no fused kernel yet), so forcing another
backend with SURGELLM_BACKEND raises instead of silently running eager.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _backend
from .._checks import check_surgical_gate_args
from ..reference import surgical_gate_reference

__all__ = ["fused_surgical_gate"]


def fused_surgical_gate(h: Tensor, s: Tensor, gate_logits: Tensor,
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        eps: float = 1e-5) -> Tensor:
    """Gated blend of ``h`` and ``s`` followed by LayerNorm over the last dim.

    ``h``, ``s``, ``gate_logits``: one shape (..., d); ``weight``, ``bias``: (d,).
    Returns z with the shape and dtype of ``h``.
    """
    check_surgical_gate_args(h, s, gate_logits, weight, bias, eps)
    # Raises when a forced backend has no kernel for this op; otherwise eager,
    # the only implementation so far.
    _backend.select_backend("surgical_gate", h.device)
    return surgical_gate_reference(h, s, gate_logits, weight, bias, eps)
