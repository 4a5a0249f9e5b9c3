"""``fused_iwn``: sigmoid gate + instance-weighted normalization in one pass.

``u = x * sigmoid(gate)``; class-balanced statistics of u per (task, class)
in training (Eq.10-11 per batch); ``y = (u - mu) / (sigma + eps) * weight +
bias``. The op is ``torch.ops.surgellm.iwn`` (csrc/iwn/iwn.cpp: its schema,
its argument checks and its one autograd implementation); the dispatcher
runs its phases on the CPU or CUDA C++ kernels, or on the Triton kernels
registered for the device when Triton is the chosen backend. This file gives
the phases their fake kernels (so ``torch.compile(fullgraph=True)`` traces
the op), converts what the schema cannot carry (a process group) and makes
the call: one crossing into C++.

What is checked where: every argument (types, shapes, devices, std_mode,
eps, momentum, num_classes, num_tasks) by the op before anything runs, so eager calls,
``torch.compile`` and direct ``torch.ops`` calls raise the same errors; label
and task-id ranges before any kernel runs, on every device (running
statistics stay untouched on error). On CUDA the range check reads the
labels' and task ids' min and max back in one copy (one host sync); under
CUDA graph capture, which forbids syncs, it is skipped: a row whose label or
task id is out of range is then left out of the statistics and its outputs
are NaN. Inferring ``num_classes`` (or ``num_tasks`` without running
statistics) reads the data too, and cannot happen while tracing: pass them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backend
from .reference import accumulation_dtype, iwn_reference

__all__ = ["fused_iwn"]


def _register_fake_kernels() -> None:
    """Output shapes of the phase ops, for torch.compile and meta tensors."""

    def define(name):
        return torch.library.register_fake(f"surgellm::{name}")

    @define("_iwn_group_keys")
    def _(labels, task_ids, num_tasks, num_classes):
        first = labels if labels is not None else task_ids
        return first.new_empty(first.shape, dtype=torch.int32)

    @define("_iwn_group_moments")
    def _(x, keys, gate, num_groups):
        acc = accumulation_dtype(x.dtype)
        per_group = x.new_empty((num_groups, x.shape[1]), dtype=acc)
        return (
            x.new_empty((num_groups,), dtype=acc),
            per_group,
            torch.empty_like(per_group),
            torch.empty_like(per_group),
        )

    @define("_iwn_merge_moments")
    def _(count, mean, m2, residual_sum):
        per_group = mean.new_empty(mean.shape[1:])
        return (
            count.new_empty(count.shape[1:]),
            per_group,
            torch.empty_like(per_group),
            torch.empty_like(per_group),
        )

    @define("_iwn_combine")
    def _(count, mean, m2, mean_residual, num_tasks, pooled, momentum, running_mean, running_std):
        stats = mean.new_empty((num_tasks, mean.shape[1]))
        return torch.empty_like(mean), stats, torch.empty_like(stats)

    @define("_iwn_apply")
    def _(x, keys, gate, weight, bias, mu, sigma, key_div, eps):
        return torch.empty_like(x)

    @define("_iwn_task_sums")
    def _(grad_y, x, keys, gate, mu, key_div):
        return mu.new_empty((2, *mu.shape))

    @define("_iwn_coefficients")
    def _(
        sums,
        param_sums,
        weight,
        count,
        group_mean,
        group_std,
        mean_residual,
        mu,
        sigma,
        pooled,
        eps,
    ):
        F = mu.shape[1]
        per_group = mu.new_empty((count.shape[0] if count is not None else 0, F))
        per_feature = mu.new_empty((F,))
        return (
            torch.empty_like(mu),
            per_group,
            torch.empty_like(per_group),
            torch.empty_like(per_group),
            per_feature,
            torch.empty_like(per_feature),
            torch.empty_like(per_feature),
        )

    @define("_iwn_input_grad")
    def _(grad_y, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u, key_div, training):
        dgate = (
            torch.empty_like(gate)
            if gate is not None
            else x.new_empty((0,), dtype=accumulation_dtype(x.dtype))
        )
        return torch.empty_like(x), dgate


def _not_by_samples(args: dict, in_dims: dict) -> Optional[str]:
    """Why vmap cannot run fused_iwn (or its checks) once per sample."""
    if not args["training"]:
        return None
    running = ("running_mean", "running_std")
    if any(args[r] is not None and in_dims.get(r) is None for r in running):
        # shared by every sample (not batched, as torch.func.stack_module_state
        # batches an ensemble's), they would be updated once per sample
        return (
            "training updates running_mean / running_std in place, once per sample, and "
            "they are not batched; batch them too (torch.func.stack_module_state), or "
            "call without running statistics (track_running_stats=False) or in eval"
        )
    if args["group_name"] is not None and args["group_size"] > 1:
        # each sample's call would be a collective: ranks with other batch
        # sizes would wait for each other
        return "a process group's statistics are one batch's, not a sample's: call it unbatched"
    return None


if _backend.extension() is not None:
    _register_fake_kernels()
    # It returns nothing: without this a traced graph drops it, and with it
    # the label and task-id range checks of the reference modules.
    torch.fx.node.has_side_effect(torch.ops.surgellm._iwn_check_args.default)
    for _name in ("_iwn_check_args", "iwn"):
        _backend.register_vmap_by_samples(_name, "_iwn_check_args", refuse=_not_by_samples)


class RankGroup(NamedTuple):
    """A process group as the op takes it: torch.distributed's registered
    name and the group's size."""

    name: str
    size: int


def rank_group(process_group, like: Tensor) -> Optional[RankGroup]:
    """The group a call communicates over: None without a group or with a
    group of one rank; a clear error for what cannot be one (``like``: a
    tensor the group must be able to communicate)."""
    if process_group is None:
        return None
    dist = torch.distributed
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "process_group: this rank is not a member of the group (new_group returned "
            "GroupMember.NON_GROUP_MEMBER here); only its members may call with it"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (or None), got "
            f"{type(process_group).__name__}"
        )
    # Traced by torch.compile, the group is an opaque object that shows its
    # name and size only: the eager call checks the backend.
    device = like.device if isinstance(like, Tensor) and not torch.compiler.is_compiling() else None
    device_types = (
        set() if device is None else {d.type for d in getattr(process_group, "_device_types", ())}
    )
    if device is not None and device_types and device.type not in device_types:
        raise ValueError(
            f"process_group (backend {dist.get_backend(process_group)!r}) cannot communicate "
            f"{device.type} tensors (x is on {device}); it serves "
            f"{', '.join(sorted(device_types))} tensors: use a group whose backend serves "
            f"{device.type} (gloo for CPU, NCCL for CUDA)"
        )
    size = process_group.size()
    return RankGroup(process_group.group_name, size) if size > 1 else None


def join_failed_training_step(
    ranks: RankGroup, num_groups: int, num_features: int, dtype: torch.dtype, device
) -> None:
    """For a caller whose own checks of a synchronized training call failed
    before the op ran: this rank takes part in the forward's all-gather of
    the moments (``num_groups`` (task, class) groups of ``num_features``,
    as the other ranks' calls send them), flagged as failed, so that every
    rank raises and none is left waiting. The caller then raises its error."""
    try:  # the other ranks' calls communicate only where the kernels run
        if _backend.planned_backend("iwn", device) == "eager":
            return
    except RuntimeError:
        return
    acc = accumulation_dtype(dtype if dtype.is_floating_point else torch.get_default_dtype())
    zeros = torch.zeros(num_groups, num_features, dtype=acc, device=device)
    try:
        torch.ops.surgellm._iwn_all_ranks_moments(
            zeros[:, 0], zeros, zeros, zeros, True, ranks.name, ranks.size
        )
    except Exception:  # every rank raises (this one flagged), or the group failed:
        pass  # the caller's own error is the one to raise


def fused_iwn(
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
    process_group=None,
    feature_dim: int = -1,
) -> Tensor:
    """Gated instance-weighted normalization.

    The counterpart of ``F.batch_norm(input, running_mean, running_var, weight,
    bias, training, momentum, eps)`` with the class labels second; the others
    are keyword-only (their order is not batch_norm's). Training
    (``training=True``, labels required) uses class-balanced batch statistics
    and updates the running ones in place; eval (the default) normalizes with
    ``running_mean`` / ``running_std``.

    Args:
        x: (..., F) floating tensor; every leading index is one instance
            (see ``feature_dim`` for BatchNorm's layouts).
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
            when compiling with ``torch.compile``, and on CUDA to avoid a
            host sync. Required with a process group. Training keeps
            statistics for every class of every task, present or not:
            ``num_classes * num_tasks * F`` may be at most 2**26.
        num_tasks: tasks, with ``task_ids``; default the rows of
            ``running_mean``, else ``task_ids.max() + 1``. Pass it when
            compiling a training call with task ids and no running
            statistics (required then with a process group); task ids at
            or past it are refused.
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
        feature_dim: the dimension of x that holds the features. -1 (the
            default): x is (..., F) and every leading index is one instance.
            Otherwise, as ``F.batch_norm`` reads (N, C, H, W) with
            ``feature_dim=1``: labels and task_ids have shape
            ``x.shape[:feature_dim]`` (one per sample), and the statistics
            of each class take every position (H, W) of its samples. No
            gate then. On the CPU, contiguous (channels-first) x is read in
            place, and so is ``torch.channels_last`` x on every backend; on a
            GPU, channels-first x is copied to channels-last order first
            (with a one-time warning).

    Returns y with the shape and dtype of x. Statistics accumulate in float32
    (float64 for float64 x). Bad arguments raise ``ValueError`` or
    ``TypeError`` naming the argument (see the module docstring).
    """
    ranks = rank_group(process_group, x)
    if not training:  # eval normalizes with the running statistics: nothing to share
        ranks = None
    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    if _backend.select_backend("iwn", device) == "eager":
        if ranks is not None:
            raise RuntimeError(
                "fused_iwn with a process_group needs the compiled kernels (backend cpu, cuda "
                "or triton): the eager reference computes one process's statistics only"
            )
        return iwn_reference(
            x,
            labels,
            gate=gate,
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_std=running_std,
            task_ids=task_ids,
            training=training,
            momentum=momentum,
            eps=eps,
            std_mode=std_mode,
            num_classes=num_classes,
            num_tasks=num_tasks,
            feature_dim=feature_dim,
        )
    # The op's arguments in its schema's order: a tuple, as the hot path's
    # one crossing into C++ takes them (a dict of them cost 6% of a small call).
    group = (ranks.name, ranks.size) if ranks else (None, 1)
    args = (x, labels, gate, weight, bias, running_mean, running_std, task_ids, training)
    args += (momentum, eps, std_mode, num_classes, num_tasks, *group, feature_dim)
    return _backend.call_op("iwn", args)
