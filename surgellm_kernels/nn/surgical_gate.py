"""The surgical gate (Eq.3, 5, 6, 7) as a module, and its fused twin.

:class:`FusedSurgicalGate` has the same constructor and ``state_dict`` as
:class:`SurgicalGate`; its fusion tail runs :func:`fused_surgical_gate`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.reference import surgical_gate_reference
from ..ops.surgical_gate import fused_surgical_gate
from ._checks import check_counts, holds_data, is_vmapped

__all__ = ["SurgicalGate", "FusedSurgicalGate", "check_task_ids"]


def check_task_ids(task_ids: Tensor, shape: torch.Size, num_tasks: int) -> None:
    """``task_ids`` of ``shape``, integer ids in [0, num_tasks), ahead of a
    task embedding: an id past it is an IndexError naming nothing on the
    CPU and a device-side assert on CUDA. The range check costs one host sync
    (as fused_iwn's; skipped while compiling or capturing a graph, under
    vmap, and for meta and fake tensors, which hold no values)."""
    if not isinstance(task_ids, Tensor) or task_ids.shape != shape:
        got = tuple(task_ids.shape) if isinstance(task_ids, Tensor) else type(task_ids).__name__
        raise ValueError(f"task_ids must have shape {tuple(shape)}, got {got}")
    if task_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"task_ids must be an int64 (or int32) tensor, got {task_ids.dtype}")
    capturing = task_ids.is_cuda and torch.cuda.is_current_stream_capturing()
    if (
        task_ids.numel()
        and not torch.compiler.is_compiling()  # first: tracing does not enter holds_data
        and not capturing
        and not is_vmapped(task_ids)
        and holds_data(task_ids)
    ):
        lo, hi = torch.aminmax(task_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_tasks:
            raise ValueError(f"task_ids must lie in [0, {num_tasks}), got values in [{lo}, {hi}]")


class SurgicalGate(nn.Module):
    """Task conditioning and gated fusion, Eq.3, 5, 6, 7.

    ``h~ = h + alpha * E[t]``; ``s' = ReLU(W_s s^ + b_s)``;
    ``g = sigmoid(W_g [h~; s'] + b_g)``; ``z = LayerNorm(g h~ + (1 - g) s')``.

    ``W_g [h~; s']`` is computed as ``W_g[:, :d] h~ + W_g[:, d:] s'``, two
    products on the two halves of ``gate.weight`` (one ``split``, whose
    gradient is one concatenation), so no (N, 2d) input concatenation is
    materialized, nor its gradient. The result equals the concatenated
    product up to rounding.
    """

    # The fusion tail; the fused twin swaps in ``fused_surgical_gate``.
    _fuse = staticmethod(surgical_gate_reference)

    def __init__(
        self,
        d_model: int,
        num_features: int = 16,
        num_tasks: int = 1,
        alpha: float = 0.1,
        eps: float = 1e-5,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model, num_features, num_tasks = check_counts(
            d_model=d_model, num_features=num_features, num_tasks=num_tasks
        )
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_features, self.num_tasks = d_model, num_features, num_tasks
        self.alpha, self.eps = alpha, eps
        self.task_embedding = nn.Embedding(num_tasks, d_model, **factory)  # E, Eq.3
        self.feature_projection = nn.Linear(num_features, d_model, **factory)  # W_s, b_s, Eq.5
        self.gate = nn.Linear(2 * d_model, d_model, **factory)  # W_g, b_g, Eq.6
        self.norm = nn.LayerNorm(d_model, eps=eps, **factory)  # Eq.7

    def forward(self, h: Tensor, s: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        if not isinstance(h, Tensor) or h.dim() == 0 or h.shape[-1] != self.d_model:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h must have shape (..., {self.d_model}), got {got}")
        if (
            not isinstance(s, Tensor)
            or s.dim() == 0
            or s.shape[:-1] != h.shape[:-1]
            or s.shape[-1] != self.num_features
        ):
            expected = (*h.shape[:-1], self.num_features)
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"s must have shape {expected}, got {got}")
        if not s.is_floating_point():
            raise TypeError(f"s must be a floating tensor (the features), got {s.dtype}")
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(f"this module holds {self.num_tasks} tasks: task_ids are required")
            task_ids = torch.zeros(h.shape[:-1], dtype=torch.long, device=h.device)
        else:
            check_task_ids(task_ids, h.shape[:-1], self.num_tasks)
        h_task = h + self.alpha * self.task_embedding(task_ids)
        s_proj = F.relu(self.feature_projection(s))
        w_h, w_s = self.gate.weight.split(self.d_model, dim=1)
        logits = F.linear(h_task, w_h) + F.linear(s_proj, w_s, self.gate.bias)
        # Under autocast the linears return the low-precision dtype while h~
        # keeps the encoder's: the tail (a LayerNorm, which autocast runs in
        # float32) takes all three in their widest dtype.
        dtype = torch.promote_types(torch.promote_types(h_task.dtype, s_proj.dtype), logits.dtype)
        return self._fuse(
            h_task.to(dtype),
            s_proj.to(dtype),
            logits.to(dtype),
            self.norm.weight,
            self.norm.bias,
            self.eps,
        )


class FusedSurgicalGate(SurgicalGate):
    """:class:`SurgicalGate` whose fusion tail runs :func:`fused_surgical_gate`."""

    _fuse = staticmethod(fused_surgical_gate)
