"""Data-parallel IWN: class-balanced statistics shared by every rank.

Under ``DistributedDataParallel`` each rank normalizes a shard of the batch.
Per-shard class-balanced statistics weigh the classes differently on each
rank (a class can be present on one rank and absent on another), so
:class:`SyncInstanceWeightedNorm` computes them over all shards together, as
``torch.nn.SyncBatchNorm`` does for BatchNorm: ``fused_iwn(...,
process_group=...)`` exchanges the per-(task, class) moments in forward and
the per-task gradient sums in backward, on the group's own backend (gloo for
CPU tensors, NCCL for CUDA ones). :func:`convert_sync_iwn` swaps it into a
model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..ops import fused_iwn
from ..ops.iwn import join_failed_training_step, rank_group
from ..ops.reference import accumulation_dtype
from .iwn import (
    FusedInstanceWeightedNorm,
    FusedInstanceWeightedNorm1d,
    FusedInstanceWeightedNorm2d,
    InstanceWeightedNorm,
    InstanceWeightedNorm1d,
    InstanceWeightedNorm2d,
)
from .patching import _twin

__all__ = [
    "SyncInstanceWeightedNorm",
    "SyncInstanceWeightedNorm1d",
    "SyncInstanceWeightedNorm2d",
    "convert_sync_iwn",
    "SyncPayload",
    "sync_payload",
]


class SyncPayload(NamedTuple):
    """Bytes one rank puts into the collectives of one synchronized training
    step; both are independent of the batch size."""

    all_gather: int  # forward; each rank receives world_size times this
    all_reduce: int  # backward


def sync_payload(
    num_features: int, num_classes: int, num_tasks: int = 1, dtype: torch.dtype = torch.float32
) -> SyncPayload:
    """What ``fused_iwn(..., process_group=...)`` exchanges per training step.

    Forward: count, mean, M2 and mean residual of every (task, class) group,
    ``T * C * (1 + 3 F)`` values, and a flag saying whether this rank's own
    checks failed, all-gathered. Backward: the per-task sums of dy and
    dy (u - mu), ``2 * T * F`` values, all-reduced. Values are in the
    accumulation dtype (float64 for float64 inputs, else float32).
    """
    itemsize = accumulation_dtype(dtype).itemsize
    groups = num_tasks * num_classes
    return SyncPayload(
        (1 + groups * (1 + 3 * num_features)) * itemsize, 2 * num_tasks * num_features * itemsize
    )


def _default_group():
    """The default process group when torch.distributed is initialized, else None."""
    dist = torch.distributed
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


class _SyncedNorm:
    """What the synced layers add to their fused twins: ``process_group``
    after the twin's constructor arguments, and the functional call carries
    it in training (in eval, as SyncBatchNorm, no rank waits on another: an
    evaluation loop may run on one rank only)."""

    process_group = None

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _group(self):
        return self.process_group if self.process_group is not None else _default_group()

    def _training_group(self):
        return self._group() if self.training else None

    def _batch_spans_ranks(self, x: Tensor) -> bool:
        # As SyncBatchNorm: one sample on this rank is not one value per
        # channel in the global batch; a rank raising alone would leave the
        # others waiting in the collective.
        return rank_group(self._training_group(), x) is not None

    def _check_input(self, x: Tensor) -> None:
        # The op's own checks take part in the forward's all-gather when they
        # fail (none is left waiting); these, before the op, do so too.
        try:
            super()._check_input(x)
        except ValueError:
            ranks = rank_group(self._training_group(), x) if self._uses_batch_statistics() else None
            if ranks is not None:
                # the groups the op's call would have: the layer's tasks (its
                # num_tasks, or running statistics of as many rows) times the classes
                join_failed_training_step(
                    ranks, self.num_tasks * self.num_classes, self.num_features, x.dtype, x.device
                )
            raise

    def _group_args(self, x: Tensor) -> dict:
        ranks = rank_group(self._training_group(), x)
        return {} if ranks is None else {"group_name": ranks.name, "group_size": ranks.size}

    # Called by the layer's forward in place of the static functional.
    def _iwn(self, *args, **kwargs) -> Tensor:
        return fused_iwn(*args, **kwargs, process_group=self._training_group())


class SyncInstanceWeightedNorm(_SyncedNorm, FusedInstanceWeightedNorm):
    """:class:`InstanceWeightedNorm` whose training statistics are those of
    every rank's rows together.

    Same constructor as :class:`InstanceWeightedNorm`, plus ``process_group``
    (default: the whole world, once ``torch.distributed`` is initialized;
    without it the module behaves as :class:`FusedInstanceWeightedNorm`).
    Every rank must run the module on each training step, a rank without
    rows too (with x of shape (0, F)). Running statistics end identical on
    every rank. :meth:`fit` communicates only when given a process group,
    the one the module syncs over (``torch.distributed.group.WORLD`` when
    ``process_group`` is None), so that fitting on one rank alone stays
    possible: the others then take its buffers with ``load_state_dict`` (on
    a GPU, a collective's in-place result such as
    ``torch.distributed.broadcast`` is not seen; see
    :class:`InstanceWeightedNorm`).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        num_tasks: int = 1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        gate: bool = False,
        std_mode: str = "class_mean",
        process_group=None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features,
            num_classes,
            num_tasks,
            eps,
            momentum,
            affine,
            gate,
            std_mode,
            process_group=process_group,
            device=device,
            dtype=dtype,
        )


class SyncInstanceWeightedNorm1d(_SyncedNorm, FusedInstanceWeightedNorm1d):
    """:class:`FusedInstanceWeightedNorm1d` whose training statistics are
    those of every rank's samples together (see
    :class:`SyncInstanceWeightedNorm`); ``process_group`` after its
    constructor's arguments."""


class SyncInstanceWeightedNorm2d(_SyncedNorm, FusedInstanceWeightedNorm2d):
    """:class:`FusedInstanceWeightedNorm2d` whose training statistics are
    those of every rank's samples together (see
    :class:`SyncInstanceWeightedNorm`); ``process_group`` after its
    constructor's arguments."""


# Each layer, reference or fused, and its synced form.
_SYNCED = {
    InstanceWeightedNorm: SyncInstanceWeightedNorm,
    FusedInstanceWeightedNorm: SyncInstanceWeightedNorm,
    InstanceWeightedNorm1d: SyncInstanceWeightedNorm1d,
    FusedInstanceWeightedNorm1d: SyncInstanceWeightedNorm1d,
    InstanceWeightedNorm2d: SyncInstanceWeightedNorm2d,
    FusedInstanceWeightedNorm2d: SyncInstanceWeightedNorm2d,
}


def convert_sync_iwn(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every :class:`InstanceWeightedNorm` and
    :class:`FusedInstanceWeightedNorm` in ``module`` by a
    :class:`SyncInstanceWeightedNorm`, and every class-balanced BatchNorm
    layer (``InstanceWeightedNorm1d/2d``, fused or not, as
    :func:`convert_to_iwn` makes them) by ``SyncInstanceWeightedNorm1d/2d``,
    each holding the same Parameter and buffer
    objects (so an optimizer built before keeps training them), hooks and
    attributes, like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. A
    norm registered under several parents becomes one synced module. Returns
    ``module``, or the new module when ``module`` itself is one. Subclasses
    are left as they are (their class would be lost); modules already synced take
    ``process_group`` in place, as a second ``convert_sync_batchnorm`` gives
    its (new) layers the new group.
    """
    return _convert(module, process_group, {})


def _convert(module: nn.Module, process_group, converted: dict) -> nn.Module:
    if type(module) in _SYNCED.values():
        module.process_group = process_group
        return module
    if type(module) in _SYNCED:
        if id(module) not in converted:
            synced = _twin(module, _SYNCED[type(module)])  # shares the module's dicts
            synced.process_group = process_group
            converted[id(module)] = synced
        return converted[id(module)]
    for name, child in module.named_children():
        new = _convert(child, process_group, converted)
        if new is not child:
            setattr(module, name, new)
    return module
