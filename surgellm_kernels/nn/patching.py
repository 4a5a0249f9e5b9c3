"""``patch_model``: swap the reference modules inside any ``nn.Module`` for
their fused twins, in place. ``convert_to_iwn``: swap BatchNorm1d / 2d for
class-balanced IWN layers; ``iwn_labels``: hand labels to those layers
without changing the model's forward.

Each twin is a new module object of the fused class whose attributes are the
original's: the same ``Parameter`` and buffer objects (so an optimizer built
before patching stays valid, and ``state_dict`` keys, shapes and
``data_ptr``\\ s are unchanged), the same hooks and training flag. It is set
on the parent in the original's slot; nothing else is rebound. Patch before
``torch.compile``, and after moving the model to its device (the report
names the backend for the device the module is on when patched).

Keep using the patched modules, not references to the originals taken
before: the two share their Parameters, buffers and hooks, but plain
attributes (the training flag, the fitted-statistics flag) are the twin's
own from the swap on, until :meth:`PatchReport.revert` copies them back.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..ops import _backend
from .iwn import (
    FusedInstanceWeightedNorm,
    FusedInstanceWeightedNorm1d,
    FusedInstanceWeightedNorm2d,
    InstanceWeightedNorm,
    InstanceWeightedNorm1d,
    InstanceWeightedNorm2d,
    _InstanceWeightedNormNd,
    check_settings,
)
from .surgical_gate import FusedSurgicalGate, SurgicalGate

__all__ = ["patch_model", "PatchReport", "convert_to_iwn", "iwn_labels"]

# reference class -> (fused twin, the op the twin runs)
FUSED_TWINS = {
    InstanceWeightedNorm: (FusedInstanceWeightedNorm, "iwn"),
    InstanceWeightedNorm1d: (FusedInstanceWeightedNorm1d, "iwn"),
    InstanceWeightedNorm2d: (FusedInstanceWeightedNorm2d, "iwn"),
    SurgicalGate: (FusedSurgicalGate, "surgical_gate"),
}


@dataclass
class Swap:
    name: str
    old: nn.Module
    new: nn.Module
    backend: str
    # every (parent, attribute) slot that held ``old``: a module registered
    # under two parents is swapped in both, for one twin
    slots: Tuple[Tuple[nn.Module, str], ...]
    # revert: carry new's state back into old (default: the twin's attributes)
    carry_back: Optional[Callable[[nn.Module, nn.Module], None]] = None
    # the names of the slots after the first (a module registered twice)
    aliases: Tuple[str, ...] = ()

    def __post_init__(self):
        # what revert checks is still so: the class and the Parameters the
        # new module was made with
        self.new_class = type(self.new)
        self.parameter_names = tuple(n for n, p in self.new._parameters.items() if p is not None)

    def why_not_revertible(self) -> Optional[str]:
        new = self.new
        if type(new) is not self.new_class:
            return (
                "its class changed after patching (a parametrization: remove it first, "
                "torch.nn.utils.parametrize.remove_parametrizations)"
            )
        # (a twin is put back by its attributes, which carry a computed
        # weight too; a converted layer hands its Parameters to the BatchNorm)
        changed = [
            n
            for n in self.parameter_names
            if not isinstance(getattr(new, n, None), (nn.Parameter, type(None)))
        ]
        if self.carry_back is not None and changed:
            return (
                f"its {', '.join(changed)} is no longer a Parameter (weight_norm, pruning or "
                f"a hook computes it now: remove that first)"
            )
        if new.__dict__.get("_compiled_call_impl") is not None:
            return (
                "it was compiled in place (module.compile()) after patching, for the new "
                "module's forward: revert before compiling"
            )
        return None


@dataclass
class Skip:
    name: str
    cls: str
    reason: str


class PatchReport:
    """What :func:`patch_model` did: ``swaps`` (qualified name, old class, new
    class, backend that will run) and ``skipped`` (name, class, reason).
    ``str(report)`` is a small table; :meth:`revert` puts the originals back."""

    def __init__(
        self,
        swaps: List[Swap],
        skipped: List[Skip],
        nothing: str = "patch_model: no InstanceWeightedNorm or SurgicalGate found",
    ):
        self.swaps, self.skipped = swaps, skipped
        self.reverted = False
        self._nothing = nothing  # what str() says when nothing was found

    @property
    def backends(self) -> Dict[str, str]:
        """Qualified module name (each, for a module registered twice) ->
        backend its fused op will run."""
        return {name: s.backend for s in self.swaps for name in (s.name, *s.aliases)}

    @property
    def eager(self) -> List[str]:
        """Swapped modules whose op will run the eager reference (no fast path)."""
        return [s.name for s in self.swaps if s.backend.startswith("eager")]

    def rows(self) -> List[Tuple[str, str, str, str]]:
        rows = [
            (", ".join((s.name, *s.aliases)), type(s.old).__name__, type(s.new).__name__, s.backend)
            for s in self.swaps
        ]
        rows += [(k.name, k.cls, "-", f"skipped: {k.reason}") for k in self.skipped]
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return self._nothing
        header = ("module", "was", "now", "backend")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"{len(self.swaps)} swapped, {len(self.skipped)} skipped"
        if self.reverted:
            summary += " (reverted)"
        return "\n".join(lines + [summary])

    def __repr__(self) -> str:
        return (
            f"PatchReport(swapped={len(self.swaps)}, skipped={len(self.skipped)}, "
            f"reverted={self.reverted})"
        )

    def revert(self) -> None:
        """Put every original module back in its slot. State changed while
        patched (training flag, fitted statistics, hooks) is carried over;
        the Parameters were shared all along. Raises, changing nothing, if a
        slot no longer holds the fused module this report put there, or if
        that module was changed in a way revert cannot carry back (a
        parametrization or weight_norm added, compiled in place with
        ``module.compile()``): undo that first."""
        if self.reverted:
            return
        for swap in self.swaps:
            for parent, attr in swap.slots:
                if parent._modules.get(attr) is not swap.new:
                    raise RuntimeError(
                        f"cannot revert {swap.name}: the module at that slot was "
                        f"replaced after patching"
                    )
            problem = swap.why_not_revertible()
            if problem is not None:
                raise RuntimeError(f"cannot revert {swap.name}: {problem}")
        for swap in reversed(self.swaps):
            if swap.carry_back is not None:
                swap.carry_back(swap.old, swap.new)
            else:
                swap.old.__dict__.update(swap.new.__dict__)
            for parent, attr in swap.slots:
                parent._modules[attr] = swap.old
        self.reverted = True


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.buffers():
        return tensor.device
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _backend_label(name: str, device: torch.device) -> str:
    if name == "cpu":
        return f"cpu ({_backend.cpu_kernel_build()})"
    if name == "triton" and device.type == "cpu":
        return "triton (interpreter)"
    if name == "eager":
        if _backend.forced_backend() == "eager":
            return f"eager (reference; {_backend.ENV_VAR}=eager)"
        return "eager (reference; no fused kernel)"
    return name


def _twin(module: nn.Module, fused_cls: type) -> nn.Module:
    twin = fused_cls.__new__(fused_cls)
    # Shares the parameter, buffer, submodule and hook dicts themselves, and
    # the iwn_labels blocks open on the module.
    twin.__dict__.update(module.__dict__)
    if module in _OPEN_LABEL_BLOCKS:
        _OPEN_LABEL_BLOCKS[twin] = _OPEN_LABEL_BLOCKS[module]
    return twin


def _swap_children(model: nn.Module, plan, nothing: str, root: Optional[Skip]) -> PatchReport:
    """Swap the children of ``model`` that ``plan(name, child)`` replaces: it
    returns a Swap (slots filled in here), a Skip, or None (left alone). A
    module registered under several parents is planned once and swapped in
    every slot. Nothing is swapped until every child is planned (plan may
    raise). ``root``: the report's entry for a root module that would have
    been swapped (it has no parent slot)."""
    names = {id(m): name for name, m in model.named_modules()}
    swaps: Dict[int, Swap] = {}
    skipped: Dict[int, Skip] = {}
    for module in model.modules():
        for attr, child in module._modules.items():
            if child is None or id(child) in skipped:
                continue
            if id(child) in swaps:
                swap = swaps[id(child)]
                swap.slots += ((module, attr),)
                swap.aliases += (f"{names[id(module)]}.{attr}".lstrip("."),)
                continue
            outcome = plan(names[id(child)], child)
            if isinstance(outcome, Skip):
                skipped[id(child)] = outcome
            elif outcome is not None:
                outcome.slots = ((module, attr),)
                swaps[id(child)] = outcome
    if root is not None:
        skipped[id(model)] = root
    for swap in swaps.values():
        for parent, attr in swap.slots:
            parent._modules[attr] = swap.new
    return PatchReport(list(swaps.values()), list(skipped.values()), nothing)


def patch_model(model: nn.Module, backend: Optional[str] = None) -> PatchReport:
    """Replace every :class:`InstanceWeightedNorm` and :class:`SurgicalGate`
    inside ``model`` by its fused twin, sharing the same Parameter and buffer
    objects. Idempotent: fused modules are skipped, and so are subclasses
    (their class, and any code of their own, would be lost). ``backend`` (``"cpu"``,
    ``"triton"``, ``"cuda"``, ``"eager"``), when given, must be the backend
    the fused ops will run on each module's device, or nothing is patched
    and ``ValueError`` says why (backends are chosen per process, see
    ``SURGELLM_BACKEND``). Patch before ``torch.compile``.

    Returns a :class:`PatchReport`; a module whose fused op has no fast path
    here (eager reference) is swapped, listed so, and warned about.

    The fused ops have no double backward: a loss differentiated through
    them with ``create_graph=True`` (a gradient penalty) raises, where the
    reference modules compute it; ``report.revert()`` for such training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
    fused_classes = {fused for fused, _ in FUSED_TWINS.values()}
    for module in model.modules():
        # torch.compile(module) wraps it; module.compile() compiles in place
        if (
            type(module).__name__ == "OptimizedModule"
            or module.__dict__.get("_compiled_call_impl") is not None
        ):
            raise ValueError("model contains a torch.compile'd module: patch before torch.compile")

    def plan(name, child):
        if isinstance(child, tuple(fused_classes)):  # the twins and their subclasses (synced)
            return Skip(name, type(child).__name__, "already fused")
        twin_and_op = FUSED_TWINS.get(type(child))
        if twin_and_op is None:
            base = next((c for c in FUSED_TWINS if isinstance(child, c)), None)
            if base is not None:
                return Skip(name, type(child).__name__, _subclass_reason(child, base))
            return None
        fused_cls, op = twin_and_op
        device = _device_of(child)
        planned = _backend.planned_backend(op, device)
        if backend is not None and planned != backend:
            status = _backend.backends(device, op)[backend]
            if status.available:
                remedy = f"set {_backend.ENV_VAR}={backend} before the first call to choose it"
            else:
                remedy = (
                    f"{backend!r} cannot run here: {status.reason}. Leave backend "
                    f"unset to use {planned!r}"
                )
            raise ValueError(
                f"backend={backend!r} was asked for, but {name} is on "
                f"{device.type} and would run {planned!r}; {remedy}"
            )
        return Swap(name, child, _twin(child, fused_cls), _backend_label(planned, device), ())

    root = None
    if isinstance(model, tuple(FUSED_TWINS)) and type(model) not in fused_classes:
        root = Skip(
            "(root)",
            type(model).__name__,
            "the root module has no parent to swap it on; construct the fused class instead",
        )
    report = _swap_children(
        model, plan, "patch_model: no InstanceWeightedNorm or SurgicalGate found", root
    )
    if report.eager:
        why = (
            f"{_backend.ENV_VAR}=eager chooses it"
            if _backend.forced_backend() == "eager"
            else "no fused kernel here"
        )
        warnings.warn(
            f"patch_model: {report.eager} run the eager reference ({why})",
            RuntimeWarning,
            stacklevel=2,
        )
    return report


# BatchNorm class -> (class-balanced reference layer, its fused twin)
IWN_FOR_BATCHNORM = {
    nn.BatchNorm1d: (InstanceWeightedNorm1d, FusedInstanceWeightedNorm1d),
    nn.BatchNorm2d: (InstanceWeightedNorm2d, FusedInstanceWeightedNorm2d),
}


def _iwn_from_batchnorm(bn: nn.Module, cls: type, num_classes: int, std_mode: str):
    stats = bn.running_mean if bn.running_mean is not None else bn.weight
    # As BatchNorm decides: with running buffers, eval uses them, whatever
    # track_running_stats says now (which decides whether training updates
    # them); without (set to None), batch statistics in eval too.
    buffers = bn.running_mean is not None and bn.running_var is not None
    layer = cls(
        bn.num_features,
        num_classes,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=buffers,
        std_mode=std_mode,
        device=stats.device if stats is not None else None,
        dtype=stats.dtype if stats is not None else None,
        bias=bn.bias is not None,
    )
    layer.track_running_stats = bn.track_running_stats
    if bn.affine:  # the same Parameter objects: an optimizer built before stays valid
        layer.weight, layer.bias = bn.weight, bn.bias
    if buffers:
        with torch.no_grad():
            layer.running_mean.copy_(bn.running_mean)
            layer.running_std.copy_(bn.running_var.sqrt())
            if bn.num_batches_tracked is not None:
                layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    layer.train(bn.training)
    # The BatchNorm's forward and backward hooks, the dicts themselves (as a
    # patched twin shares them): a hook added or removed on either is on
    # both, through revert too. (Its state_dict hooks would expect running_var.)
    for name, value in vars(bn).items():
        if "hook" in name and "state_dict" not in name:
            layer.__dict__[name] = value
    return layer


def _holds(old: Optional[torch.Tensor], new: torch.Tensor, of=lambda t: t) -> bool:
    """Whether ``of(old)`` has ``new``'s values, dtype and device (never for
    meta tensors, which hold no values)."""
    return (
        old is not None
        and old.dtype == new.dtype
        and old.device == new.device
        and not old.is_meta
        and torch.equal(of(old), new)
    )


def _batchnorm_from_iwn(bn: nn.Module, layer: nn.Module) -> None:
    """The layer's state back into the BatchNorm, as the layer holds it now
    (device and dtype included: the model may have moved meanwhile)."""
    if layer.affine:
        bn.weight, bn.bias = layer.weight, layer.bias
    if layer.running_mean is not None:
        with torch.no_grad():
            # The BatchNorm's own buffers where the layer's still hold what
            # they were converted from: a round trip with no training puts
            # back the same tensors, bit for bit (sqrt then square would
            # round running_var: by up to 8e-3 relative in bfloat16).
            if not _holds(bn.running_mean, layer.running_mean):
                bn.running_mean = layer.running_mean
            if not _holds(bn.running_var, layer.running_std, torch.sqrt):
                bn.running_var = layer.running_std.square()
            if bn.num_batches_tracked is not None and not _holds(
                bn.num_batches_tracked, layer.num_batches_tracked
            ):
                bn.num_batches_tracked = layer.num_batches_tracked
    bn.eps, bn.momentum = layer.eps, layer.momentum
    bn.track_running_stats = layer.track_running_stats
    bn.train(layer.training)
    # the hook dicts are shared; whether its backward hooks are full ones is a flag
    bn._is_full_backward_hook = layer._is_full_backward_hook


def convert_to_iwn(
    model: nn.Module, num_classes: int, std_mode: str = "class_mean", fused: bool = True
) -> PatchReport:
    """Replace every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` inside ``model``
    by class-balanced normalization: :class:`FusedInstanceWeightedNorm1d` /
    ``2d`` (``fused=False``: the reference layers), in place.

    Each new layer keeps the BatchNorm's settings (eps, momentum, affine,
    track_running_stats), its weight and bias Parameter objects, and its
    running statistics (``running_std = sqrt(running_var)``). Training then
    needs each sample's label at every such layer: pass ``labels=`` where the
    model calls them, or wrap the step in :func:`iwn_labels`. Subclasses of
    BatchNorm (``SyncBatchNorm`` among them) are skipped and listed.

    IWN divides by ``sigma + eps`` where BatchNorm divides by
    ``sqrt(var + eps)``: a converted model computes what it did before only
    after training with the new layers (channels of near-zero variance differ
    most).

    Returns a :class:`PatchReport`; :meth:`PatchReport.revert` puts the
    BatchNorms back with the layers' parameters, running statistics
    (``running_var = running_std ** 2``; the BatchNorm's own tensors, exactly,
    where the layer's still hold what they were converted from), device and
    dtype as they are then.
    A new layer shares its BatchNorm's forward and backward hooks (the same
    hook dicts: a hook added or removed on either is on both; register
    backward hooks on the new layer while converted). Revert outside
    :func:`iwn_labels` blocks: their hooks would pass labels to BatchNorm.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    (num_classes,) = check_settings(std_mode, num_classes=num_classes)

    def plan(name, child):
        classes = IWN_FOR_BATCHNORM.get(type(child))
        if classes is None:
            base = next((c for c in IWN_FOR_BATCHNORM if isinstance(child, c)), None)
            if base is not None:
                return Skip(name, type(child).__name__, _subclass_reason(child, base))
            lazy = nn.modules.batchnorm._LazyNormBase
            if isinstance(child, lazy) and isinstance(child, nn.modules.batchnorm._BatchNorm):
                return Skip(
                    name,
                    type(child).__name__,
                    "uninitialized lazy module: run one forward first (it then becomes a "
                    "BatchNorm1d / BatchNorm2d)",
                )
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                return Skip(name, type(child).__name__, "not BatchNorm1d / BatchNorm2d")
            return None
        if child.momentum is not None and not 0 <= child.momentum <= 1:
            # IWN's layers refuse it at their first call; BatchNorm runs with it
            return Skip(
                name,
                type(child).__name__,
                f"momentum={child.momentum} outside [0, 1], which the IWN layers refuse",
            )
        computed = [
            n
            for n in ("weight", "bias")
            if getattr(child, n) is not None and not isinstance(getattr(child, n), nn.Parameter)
        ]
        if computed:
            return Skip(
                name,
                type(child).__name__,
                f"its {' and '.join(computed)} computed by a hook (weight_norm, spectral_norm): "
                "no Parameter to carry over",
            )
        layer = _iwn_from_batchnorm(
            child, classes[1] if fused else classes[0], num_classes, std_mode
        )
        device = _device_of(child)
        label = (
            _backend_label(_backend.planned_backend("iwn", device), device)
            if fused
            else "eager (reference layers: fused=False)"
        )
        return Swap(name, child, layer, label, (), _batchnorm_from_iwn)

    root = None
    if type(model) in IWN_FOR_BATCHNORM:
        root = Skip("(root)", type(model).__name__, "the root module has no parent to swap it on")
    return _swap_children(model, plan, "convert_to_iwn: no BatchNorm1d or BatchNorm2d found", root)


# What every class body defines, code or not.
_CLASS_BOOKKEEPING = frozenset(
    (
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
    )
)


def _subclass_reason(child: nn.Module, base: type) -> str:
    if nn.utils.parametrize.is_parametrized(child):
        return f"a parametrized {base.__name__} (torch.nn.utils.parametrize)"
    own_code = any(
        set(vars(cls)) - _CLASS_BOOKKEEPING
        for cls in type(child).__mro__[: type(child).__mro__.index(base)]
    )
    if own_code:
        return f"subclass of {base.__name__} with its own code"
    return f"subclass of {base.__name__} (swapping it would lose its class)"


@contextlib.contextmanager
def iwn_labels(model: nn.Module, labels, task_ids=None):
    """Within the ``with`` block, every class-balanced normalization layer of
    ``model`` called without labels (task ids) gets these: a model whose
    forward knows nothing of labels trains unchanged::

        with iwn_labels(model, labels):
            loss = criterion(model(images), labels)

    In nested blocks the innermost one gives both, never one of each block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [
        m for m in model.modules() if isinstance(m, (InstanceWeightedNorm, _InstanceWeightedNormNd))
    ]
    block = (labels, task_ids)
    for layer in layers:
        # One hook per layer, reading the innermost open block: an inner
        # block's labels are never paired with an outer block's task ids.
        opened = _OPEN_LABEL_BLOCKS.setdefault(layer, _OpenLabelBlocks())
        if not opened.blocks:
            opened.hook = layer.register_forward_pre_hook(
                _give_labels, with_kwargs=True, prepend=True
            )
        opened.blocks.append(block)
    try:
        yield model
    finally:
        for layer in layers:
            opened = _OPEN_LABEL_BLOCKS[layer]
            del opened.blocks[max(i for i, b in enumerate(opened.blocks) if b is block)]
            if not opened.blocks:
                opened.hook.remove()
                del _OPEN_LABEL_BLOCKS[layer]


@dataclass
class _OpenLabelBlocks:
    """A layer's open iwn_labels blocks, innermost last, and its hook."""

    blocks: list = field(default_factory=list)
    hook: Optional[torch.utils.hooks.RemovableHandle] = None


# Per layer, outside it: a copy of a layer (deepcopy, torch.save) taken inside
# a block carries the hook but no blocks, so it is given no labels once the
# block has closed. A twin swapped in inside a block shares its layer's.
_OPEN_LABEL_BLOCKS: "weakref.WeakKeyDictionary[nn.Module, _OpenLabelBlocks]" = (
    weakref.WeakKeyDictionary()
)


def _give_labels(module, args, kwargs):
    # forward(x, labels=None, task_ids=None): fill what the call left out
    opened = _OPEN_LABEL_BLOCKS.get(module)
    if opened is None or not opened.blocks:  # a copy of a layer, taken inside a block
        return None
    labels, task_ids = opened.blocks[-1]
    if len(args) < 2 and kwargs.get("labels") is None:
        kwargs["labels"] = labels
    if task_ids is not None and len(args) < 3 and kwargs.get("task_ids") is None:
        kwargs["task_ids"] = task_ids
    return args, kwargs
