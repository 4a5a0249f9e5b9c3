"""Argument checks shared by the reference and the fused ops.

Every check raises with the argument's name and what was expected, so a bad
call fails in Python with a readable message instead of inside a kernel.
Checks that need the data (label ranges) are separate: the fused op runs them
in C++, inside the op, so that ``torch.compile`` sees no data-dependent branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STD_MODES = ("class_mean", "pooled")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(value, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_float(value: Tensor, name: str) -> None:
    _check_tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {value.dtype}"
        )


def check_device(value: Tensor, name: str, device: torch.device, first: str = "x") -> None:
    if value.device != device:
        raise ValueError(
            f"{name} is on {value.device} but {first} is on {device}: all tensors must "
            f"be on one device"
        )


def check_index_tensor(value, name: str, shape, device: torch.device) -> None:
    _check_tensor(value, name)
    if value.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (x.shape[:-1]), got {tuple(value.shape)}"
        )
    check_device(value, name, device)


def min_max(value: Tensor):
    """(min, max) of a non-empty tensor as Python numbers: one read back."""
    return torch.stack(torch.aminmax(value)).tolist()


def check_index_range(value: Tensor, name: str, upper: int) -> None:
    """Data-dependent: every entry of ``value`` must lie in [0, upper).

    Skipped while torch.compile traces (the fused op runs it inside its custom
    op, where tracing never looks; only the eager reference traced by
    torch.compile goes without it)."""
    if value.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = min_max(value)
    if lo < 0 or hi >= upper:
        raise ValueError(
            f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]"
        )


@dataclass(frozen=True)
class IWNCall:
    """The normalized description of one ``fused_iwn`` call."""

    num_features: int
    num_tasks: int
    num_classes: int  # 0 when not training (no labels are used)
    pooled: bool


class RankGroup(NamedTuple):
    """A process group a training call synchronizes over, as the op takes it."""

    name: str  # torch.distributed's registered group name
    size: int


def check_process_group(process_group, x: Tensor) -> Optional[RankGroup]:
    """The group ``fused_iwn`` communicates over: None without a group or
    with a group of one rank; a clear error for what cannot be one."""
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
    # (x that is no tensor fails the argument checks that follow.) Traced by
    # torch.compile, the group is an opaque object that shows its name and
    # size only: the eager call checks the backend.
    device = x.device if isinstance(x, Tensor) and not torch.compiler.is_compiling() else None
    device_types = set() if device is None else {
        d.type for d in getattr(process_group, "_device_types", ())}
    if device is not None and device_types and device.type not in device_types:
        raise ValueError(
            f"process_group (backend {dist.get_backend(process_group)!r}) cannot communicate "
            f"{device.type} tensors (x is on {device}); it serves "
            f"{', '.join(sorted(device_types))} tensors: use a group whose backend serves "
            f"{device.type} (gloo for CPU, NCCL for CUDA)"
        )
    size = process_group.size()
    return RankGroup(process_group.group_name, size) if size > 1 else None


def check_iwn_args(
    x, labels, gate, weight, bias, running_mean, running_std, task_ids,
    training, momentum, eps, std_mode, num_classes, synced: bool = False,
) -> IWNCall:
    """Validate a ``fused_iwn`` call (static checks only) and normalize it.

    ``synced``: the statistics are shared with other ranks, which fixes the
    class and task counts up front and lets this rank have no rows."""
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., F), got a scalar")
    F = x.shape[-1]
    if F == 0:
        raise ValueError(
            f"x must have at least one feature (last dimension > 0), got shape {tuple(x.shape)}"
        )
    device = x.device
    rows_shape = x.shape[:-1]

    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")

    if gate is not None:
        check_float(gate, "gate")
        check_device(gate, "gate", device)
        if tuple(gate.shape) not in ((F,), tuple(x.shape)):
            raise ValueError(
                f"gate must have shape ({F},) or the shape of x {tuple(x.shape)}, "
                f"got {tuple(gate.shape)}"
            )
        if gate.shape == x.shape and gate.dim() > 1 and gate.dtype != x.dtype:
            raise TypeError(
                f"a per-instance gate must have the dtype of x ({x.dtype}), got {gate.dtype}"
            )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_float(p, name)
            check_device(p, name, device)
            if tuple(p.shape) != (F,):
                raise ValueError(f"{name} must have shape ({F},), got {tuple(p.shape)}")

    if (running_mean is None) != (running_std is None):
        given = "running_mean" if running_std is None else "running_std"
        raise ValueError(f"running_mean and running_std must be given together, got {given} only")
    num_tasks = 1
    if running_mean is not None:
        for name, r in (("running_mean", running_mean), ("running_std", running_std)):
            check_float(r, name)
            check_device(r, name, device)
            if r.dim() not in (1, 2) or r.shape[-1] != F:
                raise ValueError(
                    f"{name} must have shape ({F},) or (num_tasks, {F}), got {tuple(r.shape)}"
                )
        if running_mean.shape != running_std.shape:
            raise ValueError(
                f"running_mean {tuple(running_mean.shape)} and running_std "
                f"{tuple(running_std.shape)} must have the same shape"
            )
        num_tasks = running_mean.shape[0] if running_mean.dim() == 2 else 1
        if running_mean.dim() == 1 and task_ids is not None:
            raise ValueError(
                "task_ids were given but running_mean has shape (F,): per-task "
                "statistics need (num_tasks, F) running_mean / running_std"
            )
        if running_mean.dim() == 2 and num_tasks > 1 and task_ids is None:
            raise ValueError(
                f"running statistics hold {num_tasks} tasks: task_ids (shape "
                f"{tuple(rows_shape)}) are required to pick each row's task"
            )

    if task_ids is not None:
        check_index_tensor(task_ids, "task_ids", rows_shape, device)
        if running_mean is None:
            # Without running statistics the task count comes from the data.
            if synced:
                raise ValueError(
                    "task_ids with a process_group need running_mean / running_std of shape "
                    "(num_tasks, F): every rank must use the same task count, not the one its "
                    "own rows show"
                )
            num_tasks = int(task_ids.max()) + 1 if task_ids.numel() else 1

    if training:
        if labels is None:
            raise ValueError(
                "labels are required in training: class-balanced statistics need "
                "each row's class (pass labels, or training=False with running stats)"
            )
        check_index_tensor(labels, "labels", rows_shape, device)
        if x.numel() == 0 and not synced:
            raise ValueError("x has no rows: training statistics need at least one row")
        if synced and num_classes is None:
            raise ValueError(
                "num_classes is required with a process_group: every rank must group its rows "
                "by the same classes, not those its own labels show"
            )
        if num_classes is None:
            lo, hi = min_max(labels)
            if hi < 0:
                raise ValueError(f"labels must be class indices (>= 0), got values in [{lo}, {hi}]")
            num_classes = hi + 1
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        return IWNCall(F, num_tasks, num_classes, std_mode == "pooled")

    if running_mean is None:
        raise ValueError(
            "running_mean and running_std are required when training=False "
            "(there are no batch statistics to normalize with)"
        )
    return IWNCall(F, num_tasks, 0, std_mode == "pooled")


def check_surgical_gate_args(h, s, gate_logits, weight, bias, eps) -> None:
    check_float(h, "h")
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h must have shape (..., d) with d > 0, got {tuple(h.shape)}")
    for name, t in (("s", s), ("gate_logits", gate_logits)):
        check_float(t, name)
        check_device(t, name, h.device, "h")
        if t.shape != h.shape:
            raise ValueError(f"{name} must have the shape of h {tuple(h.shape)}, got {tuple(t.shape)}")
        if t.dtype != h.dtype:
            raise TypeError(f"{name} must have the dtype of h ({h.dtype}), got {t.dtype}")
    d = h.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_float(p, name)
            check_device(p, name, h.device, "h")
            if tuple(p.shape) != (d,):
                raise ValueError(f"{name} must have shape ({d},), got {tuple(p.shape)}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
