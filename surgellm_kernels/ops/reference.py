"""The ops in plain PyTorch: the oracle every kernel is tested against.

``iwn_reference`` and ``surgical_gate_reference`` compute what ``fused_iwn``
and ``fused_surgical_gate`` compute, in eager PyTorch, from the paper's
equations (SURGELLM, TrustNLP 2026: Eq.6-7, Eq.10-11); they are also the
eager backend, which runs when the extension is not built. They validate
their arguments with the ops' own checks (check_<op>_args, in C++) when the
extension is built; without it, bad arguments get PyTorch's own errors. The
class-statistics helpers here also serve the modules' ``fit``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend

__all__ = [
    "accumulation_dtype",
    "check_iwn_args",
    "check_surgical_gate_args",
    "safe_sqrt",
    "class_moments",
    "combine_class_statistics",
    "class_balanced_statistics",
    "update_running_statistics",
    "merge_moments",
    "iwn_reference",
    "surgical_gate_reference",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_iwn_args(*args, **kwargs) -> None:
    """fused_iwn's argument checks and label / task-id range checks (the
    op's own, in C++: _iwn_check_args), computing nothing; no-op without the
    extension."""
    if _backend.extension() is not None:
        torch.ops.surgellm._iwn_check_args(*args, **kwargs)


def check_surgical_gate_args(*args, **kwargs) -> None:
    """fused_surgical_gate's argument checks (the op's own, in C++), computing
    nothing; no-op without the extension."""
    if _backend.extension() is not None:
        torch.ops.surgellm._surgical_gate_check_args(*args, **kwargs)


def safe_sqrt(var: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) gradient where ``var == 0``.

    A class with one row, or a constant feature, has sigma_c = 0; its gradient
    through sigma_c is defined as 0 so that nothing becomes NaN. A NaN
    variance (a non-finite input) stays NaN, as in BatchNorm: never a
    silent 0.
    """
    positive = var > 0
    return torch.where(
        positive,
        torch.where(positive, var, torch.ones_like(var)).sqrt(),
        torch.where(var.isnan(), var, torch.zeros_like(var)),
    )


def class_moments(u: Tensor, keys: Tensor, num_groups: int):
    """Per-group count, mean and population variance of the rows of ``u``.

    ``u``: (N, F); ``keys``: (N,) group index in [0, num_groups), not
    checked here (a key out of range counts in no group).
    Returns count (G,), mean (G, F), var (G, F); empty groups have count 0,
    mean 0 and var 0. A non-finite value makes its feature's statistics
    non-finite in every group (0 * NaN in the product), where the kernels
    keep it in its own group.
    """
    # Group sums as a one-hot matrix product: dense, static shapes, so eager
    # runs it through BLAS and torch.compile traces it without graph breaks
    # (a fair baseline for the kernels).
    # (a comparison, not F.one_hot, whose range check reads the keys on the
    # host: torch.func.grad under vmap cannot)
    onehot = (keys.unsqueeze(1) == torch.arange(num_groups, device=keys.device)).to(u.dtype)
    count = onehot.sum(0)
    # in u's dtype under torch.autocast too, which would run the products in
    # bfloat16 / float16 (statistics accumulate in float32, SPEC)
    no_autocast = torch.amp.is_autocast_available(u.device.type)
    with torch.autocast(u.device.type, enabled=False) if no_autocast else contextlib.nullcontext():
        mean = (onehot.T @ u) / count.clamp_min(1).unsqueeze(1)
        dev = u - mean[keys]
        var = (onehot.T @ (dev * dev)) / count.clamp_min(1).unsqueeze(1)
    return count, mean, var


def combine_class_statistics(count: Tensor, mean: Tensor, var: Tensor, std_mode: str):
    """Eq.10-11: every class present counts equally.

    ``count`` (T, C), ``mean`` and ``var`` (T, C, F) per (task, class).
    Over the C' classes present in each task:
    ``mu = mean_c mu_c``; ``class_mean``: ``sigma = mean_c sigma_c`` (the
    paper); ``pooled``: ``sigma = sqrt(mean_c(sigma_c^2 + (mu_c - mu)^2))``.
    Returns mu, sigma (T, F) and the (T,) mask of tasks that have any row.
    """
    present = (count > 0).to(mean.dtype).unsqueeze(-1)  # (T, C, 1)
    num_present = present.sum(1).clamp_min(1)  # (T, 1); absent tasks give 0 / 1
    mu = (mean * present).sum(1) / num_present
    if std_mode == "class_mean":
        sigma = (safe_sqrt(var) * present).sum(1) / num_present
    elif std_mode == "pooled":
        spread = var + (mean - mu.unsqueeze(1)) ** 2
        sigma = safe_sqrt((spread * present).sum(1) / num_present)
    else:
        raise ValueError(f"std_mode must be 'class_mean' or 'pooled', got {std_mode!r}")
    return mu, sigma, count.sum(1) > 0


def class_balanced_statistics(
    u: Tensor,
    labels: Tensor,
    num_classes: int,
    task_ids: Optional[Tensor] = None,
    num_tasks: int = 1,
    std_mode: str = "class_mean",
):
    """Batch statistics of ``u`` (N, F) keyed by (task, class); see
    :func:`combine_class_statistics` for what is returned."""
    keys = labels if task_ids is None else task_ids * num_classes + labels
    count, mean, var = class_moments(u, keys, num_tasks * num_classes)
    F_ = u.shape[1]
    return combine_class_statistics(
        count.view(num_tasks, num_classes),
        mean.view(num_tasks, num_classes, F_),
        var.view(num_tasks, num_classes, F_),
        std_mode,
    )


def merge_moments(a, b):
    """Chan et al.'s merge of two (count (G,), mean (G, F), M2 (G, F)) summaries:
    those of the union of their rows. Groups with no rows have count 0."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    frac = (n_b / n.clamp_min(1)).unsqueeze(1)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a.unsqueeze(1) * frac)


@torch.no_grad()
def update_running_statistics(
    running_mean: Tensor,
    running_std: Tensor,
    mu: Tensor,
    sigma: Tensor,
    task_present: Optional[Tensor],
    momentum: float,
) -> None:
    """``r = (1 - momentum) r + momentum * batch_stat`` for the tasks present
    in the batch; absent tasks keep their statistics. In place, no autograd.
    ``task_present=None`` means every task is present: a plain in-place lerp."""
    for running, batch in ((running_mean, mu), (running_std, sigma)):
        rows = running.view(-1, running.shape[-1])
        if task_present is None:
            rows.lerp_(batch.to(rows.dtype), momentum)
        else:
            updated = torch.lerp(rows, batch.to(rows.dtype), momentum)
            rows.copy_(torch.where(task_present.unsqueeze(1), updated, rows))


def iwn_reference(
    x: Tensor,
    labels: Optional[Tensor] = None,
    *,
    gate: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_std: Optional[Tensor] = None,
    task_ids: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    std_mode: str = "class_mean",
    num_classes: Optional[int] = None,
    num_tasks: Optional[int] = None,
    feature_dim: int = -1,
) -> Tensor:
    """Gated instance-weighted normalization, in eager PyTorch.

    ``u = x * sigmoid(gate)``; ``y = (u - mu) / (sigma + eps) * weight + bias``
    with class-balanced batch statistics in training (Eq.10-11 per batch) and
    the given statistics otherwise. This is the definition ``fused_iwn`` matches.
    With ``feature_dim`` before the last dimension (BatchNorm's (N, C, H, W)),
    each position of an instance is a row of that instance's class.
    """
    check_iwn_args(
        x,
        labels,
        gate,
        weight,
        bias,
        running_mean,
        running_std,
        task_ids,
        training,
        momentum,
        eps,
        std_mode,
        num_classes,
        num_tasks,
        feature_dim=feature_dim,
    )
    fd = feature_dim % x.dim()
    moved = fd != x.dim() - 1
    if moved:  # each position of an instance is a row of the instance's class
        positions = x.shape[fd + 1 :]

        def per_position(index):
            if index is None:
                return None
            return index.reshape(*index.shape, *(1,) * len(positions)).expand(
                *index.shape, *positions
            )

        x, labels, task_ids = x.movedim(fd, -1), per_position(labels), per_position(task_ids)
        # y in x's layout where its features are innermost in memory
        # (channels_last), else contiguous: what the fused op gives
        features_innermost = x.is_contiguous()
    y = _iwn_rows(
        x,
        labels,
        gate,
        weight,
        bias,
        running_mean,
        running_std,
        task_ids,
        training,
        momentum,
        eps,
        std_mode,
        num_classes,
        num_tasks,
    )
    if not moved:  # contiguous, as the fused op gives it (and BatchNorm1d on (N, C))
        return y.contiguous()
    y = y.movedim(-1, fd)
    return y if features_innermost else y.contiguous()


def _iwn_rows(
    x,
    labels,
    gate,
    weight,
    bias,
    running_mean,
    running_std,
    task_ids,
    training,
    momentum,
    eps,
    std_mode,
    num_classes,
    num_tasks,
):
    """iwn_reference for features last, its arguments checked."""
    acc = accumulation_dtype(x.dtype)
    Fdim = x.shape[-1]
    # the rows' count given, not inferred (-1 is ambiguous under vmap of no
    # samples); math.prod, unlike Size.numel, keeps a symbolic batch symbolic (export)
    u = x.reshape(math.prod(x.shape[:-1]), Fdim).to(acc)
    if gate is not None:
        u = u * torch.sigmoid(gate.reshape(math.prod(gate.shape[:-1]), Fdim).to(acc))
    tasks = None if task_ids is None else task_ids.flatten()
    if running_mean is not None:
        num_tasks = running_mean.shape[0] if running_mean.dim() == 2 else 1
    elif num_tasks is None:
        num_tasks = int(tasks.max()) + 1 if tasks is not None and tasks.numel() else 1

    if training:
        flat_labels = labels.flatten()
        if num_classes is None:  # (no rows: any class count fits them)
            num_classes = int(flat_labels.max()) + 1 if flat_labels.numel() else 1
        mu, sigma, present = class_balanced_statistics(
            u, flat_labels, num_classes, tasks, num_tasks, std_mode
        )
        if running_mean is not None:  # (a batch of no rows has no task present)
            update_running_statistics(running_mean, running_std, mu, sigma, present, momentum)
    else:
        mu = running_mean.reshape(num_tasks, Fdim).to(acc)
        sigma = running_std.reshape(num_tasks, Fdim).to(acc)

    if tasks is None:
        y = (u - mu[0]) / (sigma[0] + eps)
    else:
        y = (u - mu[tasks]) / (sigma[tasks] + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(x.shape)


def surgical_gate_reference(
    h: Tensor,
    s: Tensor,
    gate_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Eq.6-7 tail: ``LayerNorm(g * h + (1 - g) * s)`` with ``g = sigmoid(logits)``."""
    check_surgical_gate_args(h, s, gate_logits, weight, bias, eps)
    acc = accumulation_dtype(h.dtype)
    g = torch.sigmoid(gate_logits.to(acc))
    fused = g * h.to(acc) + (1 - g) * s.to(acc)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(fused, (h.shape[-1],), w, b, eps).to(h.dtype)
