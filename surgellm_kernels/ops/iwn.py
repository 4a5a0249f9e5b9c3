"""``fused_iwn``: sigmoid gate + instance-weighted normalization in one pass.

``u = x * sigmoid(gate)``; class-balanced statistics of u per (task, class)
in training (Eq.10-11 per batch); ``y = (u - mu) / (sigma + eps) * weight +
bias``. The op is ``torch.ops.surgellm.iwn``, declared with its phases and
its one autograd implementation in csrc/ops/iwn.cpp; the dispatcher runs the
CPU or CUDA C++ kernels, or the Triton kernels registered for the device by
``_backend`` when Triton is the chosen backend. This file gives the phases
their fake kernels (so ``torch.compile(fullgraph=True)`` traces the op) and
makes the call. An eager call crosses into C++ once: ``_C.fused_iwn``
(csrc/ops/eager_calls.cpp) checks the arguments as ``_checks.check_iwn_args``
does (same errors and messages) and calls the op; under torch.compile the
Python checks run and the op is traced.

What is checked where: argument types, shapes, devices and ``std_mode``
before anything runs; label and task-id ranges in C++ (``iwn_group_keys``)
before any kernel runs, on every device (running statistics stay untouched
on error). On CUDA the range check reads the labels' and task ids' min and
max back in one copy (one host sync); under CUDA graph capture, which
forbids syncs, it is skipped: a row whose label or task id is out of range
is then left out of the statistics and its outputs are NaN. Inferring ``num_classes`` (or the task
count without running statistics) reads the data too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from .. import _backend
from .._checks import accumulation_dtype, check_iwn_args, check_process_group
from ..reference import iwn_reference

__all__ = ["fused_iwn"]


def _register_fake_kernels() -> None:
    """Output shapes of the phase ops, for torch.compile and meta tensors."""

    def define(name):
        return torch.library.register_fake(f"surgellm::{name}")

    @define("iwn_group_keys")
    def _(labels, task_ids, num_tasks, num_classes):
        first = labels if labels is not None else task_ids
        return first.new_empty(first.shape, dtype=torch.int32)

    @define("iwn_group_moments")
    def _(x, keys, gate, num_groups):
        acc = accumulation_dtype(x.dtype)
        per_group = x.new_empty((num_groups, x.shape[1]), dtype=acc)
        return (x.new_empty((num_groups,), dtype=acc), per_group, torch.empty_like(per_group),
                torch.empty_like(per_group))

    @define("iwn_combine")
    def _(count, mean, m2, mean_residual, num_tasks, pooled, momentum, running_mean,
          running_std):
        stats = mean.new_empty((num_tasks, mean.shape[1]))
        return torch.empty_like(mean), stats, torch.empty_like(stats)

    @define("iwn_apply")
    def _(x, keys, gate, weight, bias, mu, sigma, key_div, eps):
        return torch.empty_like(x)

    @define("iwn_task_sums")
    def _(grad_y, x, keys, gate, mu, key_div):
        return mu.new_empty((2, *mu.shape))

    @define("iwn_coefficients")
    def _(sums, weight, count, group_mean, group_std, mean_residual, mu, sigma, pooled, eps):
        F = mu.shape[1]
        per_group = mu.new_empty((count.shape[0] if count is not None else 0, F))
        per_feature = mu.new_empty((F,))
        return (torch.empty_like(mu), per_group, torch.empty_like(per_group),
                torch.empty_like(per_group), per_feature, torch.empty_like(per_feature),
                torch.empty_like(per_feature))

    @define("iwn_input_grad")
    def _(grad_y, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u, key_div,
          training):
        dgate = (torch.empty_like(gate) if gate is not None
                 else x.new_empty((0,), dtype=accumulation_dtype(x.dtype)))
        return torch.empty_like(x), dgate


if _backend.extension() is not None:
    _register_fake_kernels()


def fused_iwn(x: Tensor, labels: Optional[Tensor] = None, gate: Optional[Tensor] = None,
              weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              running_mean: Optional[Tensor] = None, running_std: Optional[Tensor] = None,
              task_ids: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
              eps: float = 1e-5, std_mode: str = "class_mean",
              num_classes: Optional[int] = None, process_group=None) -> Tensor:
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
            when compiling with ``torch.compile(fullgraph=True)``, and on CUDA
            to avoid a host sync. Required with a process group.
        process_group: a ``torch.distributed`` process group (or
            ``torch.distributed.group.WORLD``) whose ranks each hold a shard of
            the batch: in training the statistics, and the running statistics
            every rank ends with, are those of all shards together -- one
            all-gather of the per-(task, class) moments in forward, one
            all-reduce of the per-task gradient sums in backward. Every rank
            of the group must make the call (a rank with no rows too, with x
            of shape (0, F)). Eval, or a group of one rank, communicates
            nothing. Weight, bias and gate gradients stay per rank (as
            ``DistributedDataParallel`` expects).

    Returns y with the shape and dtype of x. Statistics accumulate in float32
    (float64 for float64 x). Label and task-id ranges are checked before any
    kernel runs (on CUDA, except under graph capture: see the module
    docstring).
    """
    # Only training shares statistics; eval normalizes with the running ones.
    ranks = check_process_group(process_group, x)
    if not training:
        ranks = None
    # The C++ entry skips Python's __torch_function__ protocol: tensor
    # subclasses and TorchFunctionModes take the path below, which calls the
    # op through torch.ops (so they see it), as do traces.
    if (isinstance(x, Tensor) and not torch.compiler.is_compiling() and
            not has_torch_function_variadic(x, labels, gate, weight, bias, running_mean,
                                            running_std, task_ids)):
        backend = _backend.select_backend("iwn", x.device)
        if backend != "eager":  # the checks below and the op call, in C++
            return _backend.extension().fused_iwn(
                x, labels, gate, weight, bias, running_mean, running_std, task_ids,
                bool(training), momentum, eps, std_mode, num_classes,
                ranks.name if ranks else None, ranks.size if ranks else 1)
    call = check_iwn_args(x, labels, gate, weight, bias, running_mean, running_std, task_ids,
                          training, momentum, eps, std_mode, num_classes, synced=ranks is not None)
    backend = _backend.select_backend("iwn", x.device)
    if backend == "eager":
        if ranks is not None:
            raise RuntimeError(
                "fused_iwn with a process_group needs the compiled kernels (backend cpu, cuda "
                "or triton): the eager reference computes one process's statistics only"
            )
        return iwn_reference(x, labels, gate, weight, bias, running_mean, running_std, task_ids,
                             training, momentum, eps, std_mode, call.num_classes or num_classes)
    return torch.ops.surgellm.iwn(
        x, labels if training else None, task_ids, gate, weight, bias, running_mean, running_std,
        training, float(momentum), float(eps), call.pooled, call.num_tasks,
        call.num_classes if training else 1, ranks.name if ranks else None,
        ranks.size if ranks else 1)
