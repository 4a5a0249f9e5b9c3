"""``fused_iwn``: sigmoid gate + instance-weighted normalization in one pass.

SPEC §2. ``u = x * sigmoid(gate)``; class-balanced statistics of u per
(task, class) in training (Eq.10-11 per batch); ``y = (u - mu) / (sigma + eps)
* weight + bias``. The math lives in the kernels (csrc/cpu/iwn.cpp,
csrc/cuda/iwn.cu, surgellm_kernels/triton/iwn.py, all built on the same
coefficients as csrc/include/iwn_math.h); this file checks arguments, registers
the op with ``torch.library`` (fake kernel and autograd, so that
``torch.compile(fullgraph=True)`` sees no graph break), dispatches to a
backend and updates running statistics.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import accumulation_dtype, check_index_range, check_iwn_args
from ..reference import iwn_reference, update_running_statistics

__all__ = ["fused_iwn"]


def _group_keys(labels: Optional[Tensor], task_ids: Optional[Tensor], training: bool,
                num_tasks: int, num_classes: int, check: bool) -> Optional[Tensor]:
    """Row keys of the kernels: ``task * C + label`` in training, ``task`` in eval
    (None when every row has key 0). Ranges are checked here, inside the op,
    because the check reads the data."""
    if not training and task_ids is None:
        return None
    ext = _backend.extension()
    first = labels if training else task_ids
    if ext is not None and first.device.type == "cpu":  # one C++ pass
        return ext.group_keys(labels if training else None, task_ids, num_tasks, num_classes,
                              check)
    if check:
        if training:
            check_index_range(labels, "labels", num_classes)
        if task_ids is not None:
            check_index_range(task_ids, "task_ids", num_tasks)
    if not training:
        keys = task_ids
    elif task_ids is None:
        keys = labels
    else:
        keys = task_ids * num_classes + labels
    return keys.to(torch.int32)


def _kernels(backend: str):
    if backend == "triton":
        from ..triton import iwn as triton_iwn
        return triton_iwn.iwn_forward, triton_iwn.iwn_backward
    ext = _backend.extension()
    return ext.iwn_forward, ext.iwn_backward


def _forward_impl(x, labels, task_ids, gate, weight, bias, mean_in, std_in, training,
                  num_tasks, num_classes, eps, pooled, backend):
    keys = _group_keys(labels, task_ids, training, num_tasks, num_classes, check=True)
    forward, _ = _kernels(backend)
    y, count, mean, std, mu, sigma = forward(x, keys, gate, weight, bias, mean_in, std_in,
                                             training, num_tasks, num_classes if training else 1,
                                             eps, pooled)
    return y, count, mean, std, mu, sigma


def _backward_impl(grad_y, x, labels, task_ids, gate, weight, group_count, group_mean, group_std,
                   mu, sigma, training, num_tasks, num_classes, eps, pooled, backend):
    keys = _group_keys(labels, task_ids, training, num_tasks, num_classes, check=False)
    _, backward = _kernels(backend)
    stats = (group_count, group_mean, group_std) if training else (None, None, None)
    dx, dgate, dweight, dbias = backward(grad_y.contiguous(), x, keys, gate, weight, *stats, mu,
                                         sigma, training, num_tasks,
                                         num_classes if training else 1, eps, pooled)
    return dx, dgate, dweight, dbias


# -- torch.library registration: what torch.compile traces --------------------------

@torch.library.custom_op("surgellm::iwn_forward", mutates_args=())
def _iwn_forward(x: Tensor, labels: Optional[Tensor], task_ids: Optional[Tensor],
                 gate: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 mean_in: Optional[Tensor], std_in: Optional[Tensor], training: bool,
                 num_tasks: int, num_classes: int, eps: float, pooled: bool,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns y, group count (K,), group mean and std (K, F), mu and sigma
    (T, F), with K = T * C in training and 0 in eval."""
    return _forward_impl(x, labels, task_ids, gate, weight, bias, mean_in, std_in, training,
                         num_tasks, num_classes, eps, pooled, backend)


@_iwn_forward.register_fake
def _(x, labels, task_ids, gate, weight, bias, mean_in, std_in, training, num_tasks,
      num_classes, eps, pooled, backend):
    acc = accumulation_dtype(x.dtype)
    K = num_tasks * num_classes if training else 0
    F = x.shape[1]
    stats = x.new_empty((num_tasks, F), dtype=acc)
    return (torch.empty_like(x), x.new_empty((K,), dtype=acc), x.new_empty((K, F), dtype=acc),
            x.new_empty((K, F), dtype=acc), stats, torch.empty_like(stats))


@torch.library.custom_op("surgellm::iwn_backward", mutates_args=())
def _iwn_backward(grad_y: Tensor, x: Tensor, labels: Optional[Tensor],
                  task_ids: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor],
                  group_count: Tensor, group_mean: Tensor, group_std: Tensor, mu: Tensor,
                  sigma: Tensor, training: bool, num_tasks: int, num_classes: int, eps: float,
                  pooled: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dgate (empty without gate), dweight and dbias (F,)."""
    return _backward_impl(grad_y, x, labels, task_ids, gate, weight, group_count, group_mean,
                          group_std, mu, sigma, training, num_tasks, num_classes, eps, pooled,
                          backend)


@_iwn_backward.register_fake
def _(grad_y, x, labels, task_ids, gate, weight, group_count, group_mean, group_std, mu, sigma,
      training, num_tasks, num_classes, eps, pooled, backend):
    acc = accumulation_dtype(x.dtype)
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty((0,), dtype=acc)
    F = x.shape[1]
    return (torch.empty_like(x), dgate, x.new_empty((F,), dtype=acc),
            x.new_empty((F,), dtype=acc))


def _setup_context(ctx, inputs, output):
    (x, labels, task_ids, gate, weight, bias, _mean_in, _std_in, training, num_tasks,
     num_classes, eps, pooled, backend) = inputs
    _y, count, mean, std, mu, sigma = output
    ctx.save_for_backward(x, labels, task_ids, gate, weight, count, mean, std, mu, sigma)
    ctx.config = (training, num_tasks, num_classes, eps, pooled, backend)
    ctx.has_bias = bias is not None


def _gradients(ctx, grad_y, run_backward):
    x, labels, task_ids, gate, weight, count, mean, std, mu, sigma = ctx.saved_tensors
    dx, dgate, dweight, dbias = run_backward(grad_y, x, labels, task_ids, gate, weight, count,
                                             mean, std, mu, sigma, *ctx.config)
    return (dx, None, None, dgate if gate is not None else None,
            dweight if weight is not None else None, dbias if ctx.has_bias else None,
            None, None, None, None, None, None, None, None)


_iwn_forward.register_autograd(
    lambda ctx, grad_y, *_: _gradients(ctx, grad_y, torch.ops.surgellm.iwn_backward),
    setup_context=_setup_context)


class _IWNFunction(torch.autograd.Function):
    """The same forward and backward as the custom op, without the custom-op
    dispatch (tens of microseconds a call): what eager mode runs."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    def backward(ctx, grad_y, *_stat_grads):
        return _gradients(ctx, grad_y, _backward_impl)


def fused_iwn(x: Tensor, labels: Optional[Tensor] = None, gate: Optional[Tensor] = None,
              weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              running_mean: Optional[Tensor] = None, running_std: Optional[Tensor] = None,
              task_ids: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
              eps: float = 1e-5, std_mode: str = "class_mean",
              num_classes: Optional[int] = None) -> Tensor:
    """Gated instance-weighted normalization, called like ``F.batch_norm``.

    Args:
        x: (..., F) floating tensor; every leading index is one instance.
        labels: int64, shape ``x.shape[:-1]``, values in [0, num_classes);
            required when ``training``.
        gate: gate logits, (F,) or the shape of x: ``u = x * sigmoid(gate)``.
        weight, bias: optional (F,) affine parameters.
        running_mean, running_std: (F,) or (T, F). Used when not training;
            updated in place (``r = (1 - momentum) r + momentum * batch``) when
            training, per task present in the batch.
        task_ids: int64, shape ``x.shape[:-1]``: per-task statistics.
        training: batch statistics (class-balanced) instead of the running ones.
        eps: added to sigma (``sigma + eps``, as the paper writes it).
        std_mode: "class_mean" (mean of class deviations, the paper) or
            "pooled" (deviation of the class-balanced distribution).
        num_classes: classes per task; default ``labels.max() + 1``. Pass it
            when compiling with ``torch.compile(fullgraph=True)``.

    Returns y with the shape and dtype of x. Statistics accumulate in float32
    (float64 for float64 x).
    """
    call = check_iwn_args(x, labels, gate, weight, bias, running_mean, running_std, task_ids,
                          training, momentum, eps, std_mode, num_classes)
    backend = _backend.select_backend("iwn", x.device)
    if backend == "eager":
        return iwn_reference(x, labels, gate, weight, bias, running_mean, running_std, task_ids,
                             training, momentum, eps, std_mode, call.num_classes or num_classes)
    Fdim = call.num_features
    acc = accumulation_dtype(x.dtype)
    x2 = x.reshape(-1, Fdim).contiguous()
    if gate is not None:
        # A (F,) gate runs in the accumulation dtype; a per-instance gate keeps x's.
        gate = gate.to(acc) if gate.dim() == 1 else gate.reshape(-1, Fdim).contiguous()
    weight = None if weight is None else weight.to(acc).contiguous()
    bias = None if bias is None else bias.to(acc).contiguous()
    labels2 = labels.reshape(-1) if training else None
    tasks2 = None if task_ids is None else task_ids.reshape(-1)
    mean_in = std_in = None
    if not training:
        mean_in = call.rows_mean.to(acc).contiguous()
        std_in = call.rows_std.to(acc).contiguous()
    run = torch.ops.surgellm.iwn_forward if torch.compiler.is_compiling() else _IWNFunction.apply
    y, count, _mean, _std, mu, sigma = run(
        x2, labels2, tasks2, gate, weight, bias, mean_in, std_in, training, call.num_tasks,
        call.num_classes, float(eps), call.pooled, backend)
    if training and running_mean is not None:
        present = (count.view(call.num_tasks, call.num_classes).sum(1) > 0
                   if call.num_tasks > 1 else None)
        update_running_statistics(running_mean, running_std, mu.detach(), sigma.detach(),
                                  present, momentum)
    return y.view(x.shape)
