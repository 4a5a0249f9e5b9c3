"""The readable definition of SURGELLM's building blocks, in plain PyTorch.

Equation numbers refer to the paper (SURGELLM, TrustNLP 2026). Every fused
kernel in this package is tested against the functions and modules here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    IWNCall,
    accumulation_dtype,
    check_index_range,
    check_iwn_args,
    check_process_group,
    check_surgical_gate_args,
    check_float,
    check_index_tensor,
    check_device,
)

__all__ = [
    "safe_sqrt",
    "class_moments",
    "combine_class_statistics",
    "class_balanced_statistics",
    "update_running_statistics",
    "merge_moments",
    "iwn_reference",
    "surgical_gate_reference",
    "InstanceWeightedNorm",
    "SurgicalGate",
]


def safe_sqrt(var: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) gradient where ``var == 0``.

    A class with one row, or a constant feature, has sigma_c = 0; its gradient
    through sigma_c is defined as 0 so that nothing becomes NaN. A NaN
    variance (a non-finite input) stays NaN, as in BatchNorm: never a
    silent 0.
    """
    positive = var > 0
    return torch.where(positive, torch.where(positive, var, torch.ones_like(var)).sqrt(),
                       torch.where(var.isnan(), var, torch.zeros_like(var)))


def class_moments(u: Tensor, keys: Tensor, num_groups: int):
    """Per-group count, mean and population variance of the rows of ``u``.

    ``u``: (N, F); ``keys``: (N,) group index in [0, num_groups).
    Returns count (G,), mean (G, F), var (G, F); empty groups have count 0,
    mean 0 and var 0.
    """
    # Group sums as a one-hot matrix product: dense, static shapes, so eager
    # runs it through BLAS and torch.compile traces it without graph breaks
    # (a fair baseline for the kernels).
    onehot = F.one_hot(keys, num_groups).to(u.dtype)                # (N, G)
    count = onehot.sum(0)
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


def class_balanced_statistics(u: Tensor, labels: Tensor, num_classes: int,
                              task_ids: Optional[Tensor] = None, num_tasks: int = 1,
                              std_mode: str = "class_mean"):
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
def update_running_statistics(running_mean: Tensor, running_std: Tensor, mu: Tensor,
                              sigma: Tensor, task_present: Optional[Tensor],
                              momentum: float) -> None:
    """``r = (1 - momentum) r + momentum * batch_stat`` for the tasks present
    in the batch; absent tasks keep their statistics. In place, no autograd.
    ``task_present=None`` means every task is present (with one task, a
    training batch, which has rows, always is): a plain in-place lerp."""
    for running, batch in ((running_mean, mu), (running_std, sigma)):
        rows = running.view(-1, running.shape[-1])
        if task_present is None:
            rows.lerp_(batch.to(rows.dtype), momentum)
        else:
            updated = torch.lerp(rows, batch.to(rows.dtype), momentum)
            rows.copy_(torch.where(task_present.unsqueeze(1), updated, rows))


def iwn_reference(x: Tensor, labels: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  running_mean: Optional[Tensor] = None, running_std: Optional[Tensor] = None,
                  task_ids: Optional[Tensor] = None, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-5, std_mode: str = "class_mean",
                  num_classes: Optional[int] = None) -> Tensor:
    """Gated instance-weighted normalization, in eager PyTorch.

    ``u = x * sigmoid(gate)``; ``y = (u - mu) / (sigma + eps) * weight + bias``
    with class-balanced batch statistics in training (Eq.10-11 per batch) and
    the given statistics otherwise. This is the definition ``fused_iwn`` matches.
    """
    call = check_iwn_args(x, labels, gate, weight, bias, running_mean, running_std,
                          task_ids, training, momentum, eps, std_mode, num_classes)
    acc = accumulation_dtype(x.dtype)
    Fdim = call.num_features
    u = x.reshape(-1, Fdim).to(acc)
    if gate is not None:
        u = u * torch.sigmoid(gate.reshape(-1, Fdim).to(acc))
    tasks = None if task_ids is None else task_ids.reshape(-1)
    if tasks is not None:
        check_index_range(tasks, "task_ids", call.num_tasks)

    if training:
        flat_labels = labels.reshape(-1)
        check_index_range(flat_labels, "labels", call.num_classes)
        mu, sigma, present = class_balanced_statistics(
            u, flat_labels, call.num_classes, tasks, call.num_tasks, std_mode)
        if running_mean is not None:
            update_running_statistics(running_mean, running_std, mu, sigma,
                                      present if call.num_tasks > 1 else None, momentum)
    else:
        mu = running_mean.reshape(call.num_tasks, Fdim).to(acc)
        sigma = running_std.reshape(call.num_tasks, Fdim).to(acc)

    if tasks is None:
        y = (u - mu[0]) / (sigma[0] + eps)
    else:
        y = (u - mu[tasks]) / (sigma[tasks] + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(x.shape)


def surgical_gate_reference(h: Tensor, s: Tensor, gate_logits: Tensor,
                            weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                            eps: float = 1e-5) -> Tensor:
    """Eq.6-7 tail: ``LayerNorm(g * h + (1 - g) * s)`` with ``g = sigmoid(logits)``."""
    check_surgical_gate_args(h, s, gate_logits, weight, bias, eps)
    acc = accumulation_dtype(h.dtype)
    g = torch.sigmoid(gate_logits.to(acc))
    fused = g * h.to(acc) + (1 - g) * s.to(acc)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(fused, (h.shape[-1],), w, b, eps).to(h.dtype)


class InstanceWeightedNorm(nn.Module):
    """Instance-Weighted Normalization (Eq.10-11) with an optional surgical gate.

    Buffers ``running_mean`` / ``running_std`` (num_tasks, num_features) hold
    either running class-balanced batch statistics (updated in training with
    ``momentum``) or, after :meth:`fit`, the paper's fixed statistics of a
    whole training set. Fitting freezes them: forward then uses them in
    training mode too; :meth:`use_batch_statistics` undoes that.
    """

    # The functional this module calls; the fused twin swaps in ``fused_iwn``.
    _iwn = staticmethod(iwn_reference)

    def __init__(self, num_features: int, num_classes: int, num_tasks: int = 1,
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 gate: bool = False, std_mode: str = "class_mean"):
        super().__init__()
        if std_mode not in ("class_mean", "pooled"):
            raise ValueError(f"std_mode must be 'class_mean' or 'pooled', got {std_mode!r}")
        for name, v in (("num_features", num_features), ("num_classes", num_classes),
                        ("num_tasks", num_tasks)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_features, self.num_classes, self.num_tasks = num_features, num_classes, num_tasks
        self.eps, self.momentum, self.std_mode = eps, momentum, std_mode
        self.affine, self.gated = affine, gate
        self.register_buffer("running_mean", torch.zeros(num_tasks, num_features))
        self.register_buffer("running_std", torch.ones(num_tasks, num_features))
        self.register_buffer("statistics_frozen", torch.zeros((), dtype=torch.bool))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if gate:
            # Logit 0 opens every dimension halfway; training learns the rest.
            self.gate_logits = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("gate_logits", None)
        self._fit_state = None
        # Python mirror of the buffer: forward branches on it without reading
        # tensor data (which torch.compile would treat as a graph break).
        self._frozen = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self.statistics_frozen)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_classes={self.num_classes}, num_tasks={self.num_tasks}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"gate={self.gated}, std_mode={self.std_mode!r}")

    def forward(self, x: Tensor, labels: Optional[Tensor] = None,
                task_ids: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor) and (x.dim() < 1 or x.shape[-1] != self.num_features):
            # (the functional would name the buffers that do not fit x)
            raise ValueError(f"x must have shape (..., {self.num_features}), got {tuple(x.shape)}")
        batch_stats = self.training and not self._frozen
        return self._iwn(
            x, labels if batch_stats else None, self.gate_logits, self.weight, self.bias,
            self.running_mean, self.running_std, task_ids, batch_stats,
            self.momentum, self.eps, self.std_mode, self.num_classes,
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
        check_float(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.num_features:
            raise ValueError(f"x must have shape (..., {self.num_features}), got {tuple(x.shape)}")
        check_index_tensor(labels, "labels", x.shape[:-1], x.device)
        flat_labels = labels.reshape(-1)
        check_index_range(flat_labels, "labels", self.num_classes)
        if task_ids is not None:
            check_index_tensor(task_ids, "task_ids", x.shape[:-1], x.device)
            tasks = task_ids.reshape(-1)
            check_index_range(tasks, "task_ids", self.num_tasks)
            keys = tasks * self.num_classes + flat_labels
        elif self.num_tasks > 1:
            raise ValueError(f"this module holds {self.num_tasks} tasks: task_ids are required")
        else:
            keys = flat_labels
        u = x.reshape(-1, self.num_features).double()
        if self.gate_logits is not None:
            check_device(self.gate_logits, "gate_logits", x.device)
            u = u * torch.sigmoid(self.gate_logits.double())
        groups = self.num_tasks * self.num_classes
        n_b, mean_b, var_b = class_moments(u, keys, groups)
        batch = (n_b, mean_b, var_b * n_b.unsqueeze(1))
        self._fit_state = batch if self._fit_state is None else merge_moments(self._fit_state,
                                                                              batch)

    @torch.no_grad()
    def fit(self, x: Optional[Tensor] = None, labels: Optional[Tensor] = None,
            task_ids: Optional[Tensor] = None, process_group=None) -> "InstanceWeightedNorm":
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
        ranks = check_process_group(process_group, self.running_mean)
        failure, previous = None, self._fit_state
        if x is not None:
            self.reset_fit()
            try:
                if labels is None:
                    raise ValueError("labels are required to fit statistics on x")
                self.partial_fit(x, labels, task_ids)
            except (ValueError, TypeError) as error:
                self._fit_state = previous  # a failed call changes nothing
                if ranks is None:
                    raise
                failure = error
        state = self._fit_state
        if ranks is not None:
            state, failed_ranks = self._moments_of_all_ranks(process_group, ranks.size,
                                                             failure is not None)
            if failure is not None:
                raise failure
            if failed_ranks:
                self._fit_state = previous
                raise ValueError(f"fit failed its checks on rank(s) {failed_ranks} of "
                                 f"process_group (their own errors say why); nothing was fitted")
        if state is None:
            raise RuntimeError("nothing to fit: call fit(x, labels) or partial_fit(...) first")
        n, mean, m2 = state
        T, C, Fdim = self.num_tasks, self.num_classes, self.num_features
        var = m2 / n.clamp_min(1).unsqueeze(1)
        mu, sigma, present = combine_class_statistics(
            n.view(T, C), mean.view(T, C, Fdim), var.view(T, C, Fdim), self.std_mode)
        keep = present.unsqueeze(1)
        self.running_mean.copy_(torch.where(keep, mu.to(self.running_mean), self.running_mean))
        self.running_std.copy_(torch.where(keep, sigma.to(self.running_std), self.running_std))
        self.statistics_frozen.fill_(True)
        self._frozen = True
        self._fit_state = None
        return self

    def _moments_of_all_ranks(self, process_group, size: int, failed: bool):
        """Every rank's fit state merged in rank order (None when no rank has
        any row), and the ranks whose own fit failed: one all-gather."""
        G, Fdim = self.num_tasks * self.num_classes, self.num_features
        state = self._fit_state
        if state is None or failed:  # no data here: this rank sends zeros
            zeros = self.running_mean.new_zeros((G, Fdim), dtype=torch.float64)
            state = (zeros.new_zeros(G), zeros, zeros)
        flag = state[0].new_full((1,), float(failed))
        packed = torch.cat([flag, state[0], state[1].flatten(), state[2].flatten()])
        gathered = [torch.empty_like(packed) for _ in range(size)]
        torch.distributed.all_gather(gathered, packed, group=process_group)
        merged, failed_ranks = None, []
        for rank, row in enumerate(gathered):
            flag, n, mean, m2 = row.split([1, G, G * Fdim, G * Fdim])
            if flag.item():
                failed_ranks.append(rank)
            rank_state = (n, mean.view(G, Fdim), m2.view(G, Fdim))
            merged = rank_state if merged is None else merge_moments(merged, rank_state)
        return (merged if merged[0].sum() > 0 else None), failed_ranks

    def use_batch_statistics(self) -> "InstanceWeightedNorm":
        """Undo :meth:`fit`'s freeze: training mode uses batch statistics again."""
        self.statistics_frozen.fill_(False)
        self._frozen = False
        return self


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

    def __init__(self, d_model: int, num_features: int = 16, num_tasks: int = 1,
                 alpha: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.d_model, self.num_features, self.num_tasks = d_model, num_features, num_tasks
        self.alpha, self.eps = alpha, eps
        self.task_embedding = nn.Embedding(num_tasks, d_model)       # E, Eq.3
        self.feature_projection = nn.Linear(num_features, d_model)   # W_s, b_s, Eq.5
        self.gate = nn.Linear(2 * d_model, d_model)                  # W_g, b_g, Eq.6
        self.norm = nn.LayerNorm(d_model, eps=eps)                   # Eq.7

    def forward(self, h: Tensor, s: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        check_float(h, "h")
        check_float(s, "s")
        if h.shape[-1] != self.d_model:
            raise ValueError(f"h must have shape (..., {self.d_model}), got {tuple(h.shape)}")
        if s.shape[:-1] != h.shape[:-1] or s.shape[-1] != self.num_features:
            raise ValueError(
                f"s must have shape {tuple(h.shape[:-1]) + (self.num_features,)}, got {tuple(s.shape)}")
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(f"this module holds {self.num_tasks} tasks: task_ids are required")
            task_ids = torch.zeros(h.shape[:-1], dtype=torch.long, device=h.device)
        check_index_tensor(task_ids, "task_ids", h.shape[:-1], h.device)
        h_task = h + self.alpha * self.task_embedding(task_ids)
        s_proj = F.relu(self.feature_projection(s))
        w_h, w_s = self.gate.weight.split(self.d_model, dim=1)
        logits = F.linear(h_task, w_h) + F.linear(s_proj, w_s, self.gate.bias)
        # Under autocast the linears return the low-precision dtype while h~
        # keeps the encoder's: the tail (a LayerNorm, which autocast runs in
        # float32) takes all three in their widest dtype.
        dtype = torch.promote_types(torch.promote_types(h_task.dtype, s_proj.dtype), logits.dtype)
        return self._fuse(h_task.to(dtype), s_proj.to(dtype), logits.to(dtype), self.norm.weight,
                          self.norm.bias, self.eps)
