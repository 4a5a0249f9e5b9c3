"""Instance-Weighted Normalization (Eq.10-11) as a module, and its fused twin.

:class:`InstanceWeightedNorm` reads like the paper: class-balanced batch
statistics in training, running statistics in eval, and :meth:`fit` for the
paper's fixed statistics of a whole training set. :class:`FusedInstanceWeightedNorm`
has the same constructor, parameters and buffers (each loads the other's
``state_dict``); only the functional it calls differs.

:class:`InstanceWeightedNorm1d` / :class:`InstanceWeightedNorm2d` (and their
fused twins) are class-balanced BatchNorm: BatchNorm1d / BatchNorm2d's
constructor, buffers and layouts, with each sample's label.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import _backend
from ..ops.iwn import fused_iwn, rank_group
from ..ops.reference import (
    check_iwn_args,
    class_moments,
    combine_class_statistics,
    iwn_reference,
    merge_moments,
)
from ._checks import check_counts, holds_data, is_vmapped

__all__ = [
    "InstanceWeightedNorm",
    "FusedInstanceWeightedNorm",
    "InstanceWeightedNorm1d",
    "InstanceWeightedNorm2d",
    "FusedInstanceWeightedNorm1d",
    "FusedInstanceWeightedNorm2d",
]


def check_settings(
    std_mode: str, momentum: Optional[float] = 0.1, cumulative: bool = False, **counts: int
) -> Tuple[int, ...]:
    """A module's settings, checked when it is built (before any call):
    std_mode, counts that must be positive ints (returned as Python ints, in
    the order given), and a momentum of None (a cumulative average) only
    where the module takes it (``cumulative``), with one task. (A
    momentum's range is the op's check, at each call.)"""
    if std_mode not in ("class_mean", "pooled"):
        raise ValueError(f"std_mode must be 'class_mean' or 'pooled', got {std_mode!r}")
    ints = check_counts(**counts)
    if momentum is None and not cumulative:
        raise ValueError(
            "momentum must be a number in [0, 1], got None (the cumulative average of "
            "BatchNorm's momentum=None is InstanceWeightedNorm1d / 2d's)"
        )
    if momentum is None and counts.get("num_tasks", 1) > 1:
        # One batch count for all tasks would average a task absent from
        # some batches as if it had been present.
        raise ValueError(
            f"momentum=None (a cumulative average) needs num_tasks=1, got "
            f"num_tasks={counts['num_tasks']}: pass a momentum"
        )
    return ints


class InstanceWeightedNorm(nn.Module):
    """Instance-Weighted Normalization (Eq.10-11) with an optional surgical gate.

    Buffers ``running_mean`` / ``running_std`` (num_tasks, num_features) hold
    either running class-balanced batch statistics (updated in training with
    ``momentum``) or, after :meth:`fit`, the paper's fixed statistics of a
    whole training set. Fitting freezes them: forward then uses them in
    training mode too; :meth:`use_batch_statistics` undoes that. In eager
    calls the ``statistics_frozen`` buffer says which, however it was
    written (fit, ``load_state_dict``, a copy into the buffers,
    DistributedDataParallel's buffer sync, ``torch.func.functional_call``).
    On a GPU it is read when the buffer or its version changes (reading it
    is a host sync; DDP's buffer sync, each step by default, changes the
    version): write it with tensor ops (``copy_``), not as a collective's
    in-place result (``torch.distributed.broadcast`` leaves the version as
    it was). Under ``torch.compile`` and ``vmap``, forward branches on the
    value last read in an eager call, ``fit`` or ``load_state_dict``: after
    writing the buffers otherwise, load them (``load_state_dict``) or make
    one eager call.
    """

    # The functional this module calls; the fused twin swaps in ``fused_iwn``.
    _iwn = staticmethod(iwn_reference)

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
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_features, num_classes, num_tasks = check_settings(
            std_mode,
            momentum,
            num_features=num_features,
            num_classes=num_classes,
            num_tasks=num_tasks,
        )
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.num_classes, self.num_tasks = num_features, num_classes, num_tasks
        self.eps, self.momentum, self.std_mode = eps, momentum, std_mode
        self.affine, self.gated = affine, gate
        self.register_buffer("running_mean", torch.empty(num_tasks, num_features, **factory))
        self.register_buffer("running_std", torch.empty(num_tasks, num_features, **factory))
        self.register_buffer("statistics_frozen", torch.empty((), dtype=torch.bool, device=device))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if gate:
            self.gate_logits = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("gate_logits", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running statistics 0 and 1, not fitted, nothing accumulated."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_std.fill_(1.0)
            self.statistics_frozen.fill_(False)
        self._fit_state = None
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        # The Python mirror of the buffer (forward branches on it: reading
        # tensor data under torch.compile would break the graph), and the
        # buffer (held, so that no other tensor can take its identity) and
        # version it was read from.
        self._frozen = frozen
        flag = self.statistics_frozen
        # (inference tensors keep no version: read again each time)
        self._frozen_source = (flag, None if flag.is_inference() else flag._version)

    @staticmethod
    def _read_on_every_call(flag: Tensor) -> bool:
        # Reading a CPU tensor costs no host sync.
        return flag.device.type == "cpu"

    def _uses_fitted_statistics(self) -> bool:
        """Whether forward normalizes with the fitted (frozen) statistics:
        the buffer decides, read on every call on the CPU, elsewhere when the
        buffer or its version changed since it was last read; while
        compiling or under vmap (a batched flag has no one value), the last
        value read."""
        flag = self.statistics_frozen
        if torch.compiler.is_compiling() or is_vmapped(flag) or not holds_data(flag):
            return self._frozen
        source, version = getattr(self, "_frozen_source", (None, None))
        if (
            self._read_on_every_call(flag)
            or source is not flag
            or version is None
            or version != flag._version
        ):
            self._set_frozen(bool(flag))
        return self._frozen

    def reset_parameters(self) -> None:
        """The running statistics reset; weight 1, bias 0, gate logits 0
        (each dimension open halfway; training learns the rest)."""
        self.reset_running_stats()
        with torch.no_grad():
            for p, value in ((self.weight, 1.0), (self.bias, 0.0), (self.gate_logits, 0.0)):
                if p is not None:
                    p.fill_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A module on the meta device keeps no value: the mirror takes the
        # loaded one, where there is one.
        flag = self.statistics_frozen
        if not holds_data(flag):
            flag = state_dict.get(prefix + "statistics_frozen")
        if isinstance(flag, Tensor) and holds_data(flag):
            self._set_frozen(bool(flag))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_classes={self.num_classes}, num_tasks={self.num_tasks}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"gate={self.gated}, std_mode={self.std_mode!r}"
        )

    def _check_width(self, x: Tensor) -> None:
        # (the functional would name the buffers that do not fit x)
        if x.dim() < 1 or x.shape[-1] != self.num_features:
            raise ValueError(f"x must have shape (..., {self.num_features}), got {tuple(x.shape)}")

    def _check_input(self, x: Tensor) -> None:
        self._check_width(x)

    def _uses_batch_statistics(self) -> bool:
        return self.training and not self._uses_fitted_statistics()

    def forward(
        self, x: Tensor, labels: Optional[Tensor] = None, task_ids: Optional[Tensor] = None
    ) -> Tensor:
        if isinstance(x, Tensor):
            self._check_input(x)
        batch_stats = self._uses_batch_statistics()
        return self._iwn(
            x,
            labels if batch_stats else None,
            gate=self.gate_logits,
            weight=self.weight,
            bias=self.bias,
            running_mean=self.running_mean,
            running_std=self.running_std,
            task_ids=task_ids,
            training=batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            std_mode=self.std_mode,
            num_classes=self.num_classes,
            num_tasks=self.num_tasks,
        )

    # -- the paper's fixed statistics -------------------------------------------------
    def reset_fit(self) -> None:
        """Forget what :meth:`partial_fit` has accumulated."""
        self._fit_state = None

    @torch.no_grad()
    def partial_fit(self, x: Tensor, labels: Tensor, task_ids: Optional[Tensor] = None) -> None:
        """Accumulate one batch of the training set into the fixed statistics.

        Per (task, class, feature) count, mean and sum of squared deviations are
        kept in float64 and merged with Chan's formula, so streaming the data in
        any batches gives the statistics of the whole set. Call :meth:`fit`
        (no arguments) to finalize. The gate, if any, is applied first.
        Data-parallel: each rank streams its own shard, and
        ``fit(process_group=...)`` merges every rank's.
        """
        if isinstance(x, Tensor):
            self._check_width(x)
            if x.numel() == 0:  # no rows (a rank without data): nothing to add
                return
        check_iwn_args(
            x,
            labels,
            self.gate_logits,
            running_mean=self.running_mean,
            running_std=self.running_std,
            task_ids=task_ids,
            training=True,
            num_classes=self.num_classes,
            num_tasks=self.num_tasks,
        )
        keys = labels.reshape(-1)
        if task_ids is not None:
            keys = task_ids.reshape(-1) * self.num_classes + keys
        u = x.reshape(-1, self.num_features).double()
        if self.gate_logits is not None:
            u = u * torch.sigmoid(self.gate_logits.double())
        groups = self.num_tasks * self.num_classes
        n_b, mean_b, var_b = class_moments(u, keys, groups)
        batch = (n_b, mean_b, var_b * n_b.unsqueeze(1))
        if self._fit_state is None:
            self._fit_state = batch
        else:  # on the batch's device: the module may have moved since the last batch
            previous = tuple(t.to(u.device) for t in self._fit_state)
            self._fit_state = merge_moments(previous, batch)

    @torch.no_grad()
    def fit(
        self,
        x: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        task_ids: Optional[Tensor] = None,
        process_group=None,
    ) -> "InstanceWeightedNorm":
        """Set the paper's fixed statistics (Eq.10-11) and freeze them.

        ``fit(x, labels, task_ids=None)`` fits a whole data set in one call;
        ``fit()`` finalizes what :meth:`partial_fit` accumulated. Tasks with no
        rows keep their current statistics.

        ``process_group``: each rank of the ``torch.distributed`` group holds
        a shard of the data set (fitted here or streamed through
        :meth:`partial_fit`); every rank calls ``fit`` (a rank without data
        too), the per-(task, class) count, mean and M2 are merged across ranks
        in rank order (one all-gather), and every rank sets the statistics of
        the whole set. When ``fit(x, labels)`` fails its checks on one rank,
        every rank raises after the all-gather (none is left waiting).
        """
        ranks = rank_group(process_group, self.running_mean)
        with self._fit_state_kept_on_error():
            failure = None
            if x is not None:
                self.reset_fit()
                try:
                    if labels is None:
                        raise ValueError("labels are required to fit statistics on x")
                    self.partial_fit(x, labels, task_ids)
                except Exception as error:
                    if ranks is None:
                        raise
                    failure = error  # raised after the all-gather: no rank is left waiting
            state = self._fit_state
            if ranks is not None:
                try:
                    state = self._moments_of_all_ranks(ranks, failure is not None)
                except ValueError:
                    if failure is not None:
                        raise failure from None
                    raise
            if state is None:
                if x is not None:
                    raise ValueError(
                        "x has no rows: there is nothing to fit (pass the data set, or call "
                        "fit() without arguments to finalize partial_fit)"
                    )
                raise RuntimeError("nothing to fit: call fit(x, labels) or partial_fit(...) first")
        n, mean, m2 = state
        T, C, Fdim = self.num_tasks, self.num_classes, self.num_features
        var = m2 / n.clamp_min(1).unsqueeze(1)
        mu, sigma, present = combine_class_statistics(
            n.view(T, C), mean.view(T, C, Fdim), var.view(T, C, Fdim), self.std_mode
        )
        keep = present.unsqueeze(1)
        self.running_mean.copy_(torch.where(keep, mu.to(self.running_mean), self.running_mean))
        self.running_std.copy_(torch.where(keep, sigma.to(self.running_std), self.running_std))
        self.statistics_frozen.fill_(True)
        self._set_frozen(True)
        self._fit_state = None
        return self

    @torch.no_grad()
    def fit_batches(self, batches) -> "InstanceWeightedNorm":
        """:meth:`fit` on a data set streamed once: ``batches`` yields
        ``(x, labels, task_ids)`` (task_ids None with one task), each
        :meth:`partial_fit`, then :meth:`fit`. A call that raises leaves what
        :meth:`partial_fit` had accumulated before it as it was."""
        with self._fit_state_kept_on_error():
            self.reset_fit()
            for x, labels, task_ids in batches:
                self.partial_fit(x, labels, task_ids)
            if self._fit_state is None:
                raise ValueError("batches hold no rows: there is nothing to fit")
            return self.fit()

    @contextlib.contextmanager
    def _fit_state_kept_on_error(self):
        """A call that raises inside leaves what :meth:`partial_fit` had
        accumulated before it as it was."""
        previous = self._fit_state
        try:
            yield
        except BaseException:
            self._fit_state = previous
            raise

    def _moments_of_all_ranks(self, ranks, failed: bool):
        """Every rank's fit state merged in rank order (None when no rank has
        any row): the op the synchronized forward merges with. Raises on
        every rank when one flagged a failure."""
        if _backend.extension() is None:
            raise RuntimeError(
                "fit(process_group=...) needs the compiled extension "
                "(pip install --no-build-isolation -e .)"
            )
        G, Fdim = self.num_tasks * self.num_classes, self.num_features
        state = self._fit_state
        if state is None or failed:  # no data here: this rank sends zeros
            zeros = self.running_mean.new_zeros((G, Fdim), dtype=torch.float64)
            state = (zeros.new_zeros(G), zeros, zeros)
        n, mean, m2 = state
        merged = torch.ops.surgellm._iwn_all_ranks_moments(
            n, mean, m2, torch.zeros_like(mean), failed, ranks.name, ranks.size
        )
        return merged[:3] if merged[0].sum() > 0 else None

    def use_batch_statistics(self) -> "InstanceWeightedNorm":
        """Undo :meth:`fit`'s freeze: training mode uses batch statistics again."""
        self.statistics_frozen.fill_(False)
        self._set_frozen(False)
        return self


class FusedInstanceWeightedNorm(InstanceWeightedNorm):
    """:class:`InstanceWeightedNorm` running :func:`fused_iwn`."""

    _iwn = staticmethod(fused_iwn)


class _InstanceWeightedNormNd(nn.Module):
    """Class-balanced BatchNorm over channels (dimension 1): per channel, the
    statistics of every position of the samples of each class, every class
    present counting equally (Eq.10-11 with one sample = one instance), and
    ``y = (x - mu) / (sigma + eps) * weight + bias``. BatchNorm's
    constructor, buffers and modes, with ``running_std`` for ``running_var``:
    training normalizes with the batch's class-balanced statistics and updates
    the running ones (``momentum``; ``None``: cumulative average); eval
    normalizes with the running ones (``track_running_stats=False``: with the
    batch's, so labels are needed in eval too). ``forward(x, labels=None,
    task_ids=None)``: labels (and task ids) of shape (N,), one per sample.
    With ``num_tasks`` > 1 the running statistics are (num_tasks, C) and each
    sample's task picks its row. Loads a BatchNorm's ``state_dict``
    (``running_std = sqrt(running_var)``).
    """

    # The functional this module calls; the fused twin swaps in ``fused_iwn``.
    _iwn = staticmethod(iwn_reference)
    # As BatchNorm's: from version 2, num_batches_tracked is in the state_dict.
    _version = 2

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        num_tasks: int = 1,
        std_mode: str = "class_mean",
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__()
        num_features, num_classes, num_tasks = check_settings(
            std_mode,
            momentum,
            cumulative=True,
            num_features=num_features,
            num_classes=num_classes,
            num_tasks=num_tasks,
        )
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.num_classes, self.num_tasks = num_features, num_classes, num_tasks
        self.eps, self.momentum, self.std_mode = eps, momentum, std_mode
        self.affine, self.track_running_stats = affine, track_running_stats
        for name, present in (("weight", affine), ("bias", affine and bias)):
            value = nn.Parameter(torch.empty(num_features, **factory)) if present else None
            self.register_parameter(name, value)
        if track_running_stats:
            shape = (num_features,) if num_tasks == 1 else (num_tasks, num_features)
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_std", torch.ones(shape, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_std", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_std.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_classes={self.num_classes}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}, num_tasks={self.num_tasks}, "
            f"std_mode={self.std_mode!r}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        var, std = prefix + "running_var", prefix + "running_std"
        if self.running_std is not None and var in state_dict and std not in state_dict:
            running_var = state_dict.pop(var)  # a BatchNorm's
            if running_var.is_floating_point():  # sqrt in the finer of the two dtypes
                running_var = running_var.to(
                    torch.promote_types(running_var.dtype, self.running_std.dtype)
                )
            state_dict[std] = running_var.sqrt()
        count = prefix + "num_batches_tracked"
        version = local_metadata.get("version")
        if (
            (version is None or version < 2)
            and self.track_running_stats
            and count not in state_dict
        ):
            # from before BatchNorm counted batches: the count stays, as BatchNorm's does
            kept = self.num_batches_tracked
            unknown = kept is None or kept.device.type == "meta"
            state_dict[count] = torch.tensor(0, dtype=torch.long) if unknown else kept
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x must have num_features={self.num_features} channels in dimension 1, "
                f"got shape {tuple(x.shape)}"
            )

    def _uses_batch_statistics(self) -> bool:
        return self.training or self.running_mean is None

    def _batch_spans_ranks(self, x: Tensor) -> bool:
        """Whether x's batch statistics are those of several ranks' batches."""
        return False

    def forward(
        self, x: Tensor, labels: Optional[Tensor] = None, task_ids: Optional[Tensor] = None
    ) -> Tensor:
        if isinstance(x, Tensor):
            self._check_input(x)
        batch_stats = self._uses_batch_statistics()
        if (
            batch_stats
            and isinstance(x, Tensor)
            and x.numel() == x.shape[1]
            and x.numel() > 0
            and not self._batch_spans_ranks(x)
        ):
            # BatchNorm's own check: the one value of a channel is its mean,
            # and every output would be the bias.
            raise ValueError(
                f"Expected more than 1 value per channel when normalizing with batch "
                f"statistics, got input size {tuple(x.shape)}"
            )
        if batch_stats and not self.training and labels is None:
            # The op would say "in training"; the reason here is the layer's state.
            raise ValueError(
                "labels are required in eval too: this layer tracks no running statistics "
                "(track_running_stats=False), so it normalizes with the batch's class-balanced "
                "statistics, as BatchNorm does; pass labels, or build it with "
                "track_running_stats=True"
            )
        # As BatchNorm: track_running_stats read now (it may have been set
        # since); buffers without it are used in eval and left alone in training.
        tracking = self.training and self.track_running_stats and self.running_mean is not None
        running = (self.running_mean, self.running_std)
        if self.training and not tracking:
            running = (None, None)
        momentum = 0.0 if self.momentum is None else self.momentum
        cumulative = tracking and self.momentum is None  # BatchNorm's cumulative average
        if cumulative:
            if torch.compiler.is_compiling():  # a clear error under fullgraph=True
                torch._dynamo.graph_break(
                    msg="momentum=None: the cumulative average's momentum is read from "
                    "num_batches_tracked, a value the graph cannot hold; compile without "
                    "fullgraph=True, or build the layer with a momentum"
                )
            momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)
        labels = labels if batch_stats else None
        args = dict(
            weight=self.weight,
            bias=self.bias,
            running_mean=running[0],
            running_std=running[1],
            task_ids=task_ids,
            training=batch_stats,
            momentum=momentum,
            eps=self.eps,
            std_mode=self.std_mode,
            num_classes=self.num_classes,
            num_tasks=self.num_tasks,
            feature_dim=1,
        )
        if (
            tracking
            and (cumulative or (isinstance(x, Tensor) and x.device.type == "cpu"))
            and torch.compiler.is_compiling()
            and self._iwn is not iwn_reference
        ):
            # Inductor may run the count's add (which depends on nothing the
            # op computes) before the op, whose checks raise inside it: the
            # checks as an op of their own, first, keep a failed call from
            # counting. (On a GPU only where the count sets the next
            # momentum: there their range check is a host sync. The
            # reference checks first itself.)
            check_iwn_args(x, labels, **args, **self._group_args(x))
        y = self._iwn(x, labels, **args)
        if tracking:  # after the call: a failed call changes nothing
            self.num_batches_tracked.add_(1)
        return y

    def _group_args(self, x: Tensor) -> dict:
        """The process group of a training call, as the checks op takes it."""
        return {}


class InstanceWeightedNorm1d(_InstanceWeightedNormNd):
    """Class-balanced :class:`torch.nn.BatchNorm1d`: x of shape (N, C) or
    (N, C, L); see :class:`_InstanceWeightedNormNd`."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(
                f"x must be 2-D (N, C) or 3-D (N, C, L), got {x.dim()}-D input of shape "
                f"{tuple(x.shape)}"
            )


class InstanceWeightedNorm2d(_InstanceWeightedNormNd):
    """Class-balanced :class:`torch.nn.BatchNorm2d`: x of shape (N, C, H, W),
    contiguous or ``torch.channels_last``; see :class:`_InstanceWeightedNormNd`."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"x must be 4-D (N, C, H, W), got {x.dim()}-D input of shape {tuple(x.shape)}"
            )


class FusedInstanceWeightedNorm1d(InstanceWeightedNorm1d):
    """:class:`InstanceWeightedNorm1d` running :func:`fused_iwn`."""

    _iwn = staticmethod(fused_iwn)


class FusedInstanceWeightedNorm2d(InstanceWeightedNorm2d):
    """:class:`InstanceWeightedNorm2d` running :func:`fused_iwn`."""

    _iwn = staticmethod(fused_iwn)
