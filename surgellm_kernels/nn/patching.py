"""``patch_model``: swap the reference modules inside any ``nn.Module`` for
their fused twins, in place.

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

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..ops import _backend
from .iwn import FusedInstanceWeightedNorm, InstanceWeightedNorm
from .surgical_gate import FusedSurgicalGate, SurgicalGate

__all__ = ["patch_model", "PatchReport"]

# reference class -> (fused twin, the op the twin runs)
FUSED_TWINS = {
    InstanceWeightedNorm: (FusedInstanceWeightedNorm, "iwn"),
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


@dataclass
class Skip:
    name: str
    cls: str
    reason: str


class PatchReport:
    """What :func:`patch_model` did: ``swaps`` (qualified name, old class, new
    class, backend that will run) and ``skipped`` (name, class, reason).
    ``str(report)`` is a small table; :meth:`revert` puts the originals back."""

    def __init__(self, swaps: List[Swap], skipped: List[Skip]):
        self.swaps, self.skipped = swaps, skipped
        self.reverted = False

    @property
    def backends(self) -> Dict[str, str]:
        """Qualified module name -> backend its fused op will run."""
        return {s.name: s.backend for s in self.swaps}

    @property
    def eager(self) -> List[str]:
        """Swapped modules whose op will run the eager reference (no fast path)."""
        return [s.name for s in self.swaps if s.backend.startswith("eager")]

    def rows(self) -> List[Tuple[str, str, str, str]]:
        rows = [(s.name, type(s.old).__name__, type(s.new).__name__, s.backend) for s in self.swaps]
        rows += [(k.name, k.cls, "-", f"skipped: {k.reason}") for k in self.skipped]
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "patch_model: no InstanceWeightedNorm or SurgicalGate found"
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
        slot no longer holds the fused module this report put there."""
        if self.reverted:
            return
        for swap in self.swaps:
            for parent, attr in swap.slots:
                if parent._modules.get(attr) is not swap.new:
                    raise RuntimeError(
                        f"cannot revert {swap.name}: the module at that slot was "
                        f"replaced after patching"
                    )
        for swap in reversed(self.swaps):
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
        return "eager (reference; no fused kernel)"
    return name


def _twin(module: nn.Module, fused_cls: type) -> nn.Module:
    twin = fused_cls.__new__(fused_cls)
    # Shares the parameter, buffer, submodule and hook dicts themselves.
    twin.__dict__.update(module.__dict__)
    return twin


def patch_model(model: nn.Module, backend: Optional[str] = None) -> PatchReport:
    """Replace every :class:`InstanceWeightedNorm` and :class:`SurgicalGate`
    inside ``model`` by its fused twin, sharing the same Parameter and buffer
    objects. Idempotent: fused modules are skipped, and so are subclasses
    with code of their own (it would be lost). ``backend`` (``"cpu"``,
    ``"triton"``, ``"cuda"``, ``"eager"``), when given, must be the backend
    the fused ops will run on each module's device, or nothing is patched
    and ``ValueError`` says why (backends are chosen per process, see
    ``SURGELLM_BACKEND``). Patch before ``torch.compile``.

    Returns a :class:`PatchReport`; a module whose fused op has no fast path
    here (eager reference) is swapped, listed so, and warned about.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")
    fused_classes = {fused for fused, _ in FUSED_TWINS.values()}
    names = {id(m): name for name, m in model.named_modules()}
    # keyed by id(child): a module registered under several parents is
    # swapped (one twin, every slot) or skipped once
    swaps: Dict[int, Swap] = {}
    skipped: Dict[int, Skip] = {}
    for module in model.modules():
        # torch.compile(module) wraps it; module.compile() compiles in place
        if (
            type(module).__name__ == "OptimizedModule"
            or module.__dict__.get("_compiled_call_impl") is not None
        ):
            raise ValueError("model contains a torch.compile'd module: patch before torch.compile")
        for attr, child in module._modules.items():
            if child is None or id(child) in skipped:
                continue
            if id(child) in swaps:
                swaps[id(child)].slots += ((module, attr),)
                continue
            name = names[id(child)]
            if type(child) in fused_classes:
                skipped[id(child)] = Skip(name, type(child).__name__, "already fused")
                continue
            twin_and_op = FUSED_TWINS.get(type(child))
            if twin_and_op is None:
                base = next((c for c in FUSED_TWINS if isinstance(child, c)), None)
                if base is not None:
                    skipped[id(child)] = Skip(
                        name, type(child).__name__, f"subclass of {base.__name__} with its own code"
                    )
                continue
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
            swaps[id(child)] = Swap(
                name,
                child,
                _twin(child, fused_cls),
                _backend_label(planned, device),
                ((module, attr),),
            )
    if isinstance(model, tuple(FUSED_TWINS)) and type(model) not in fused_classes:
        skipped[id(model)] = Skip(
            "(root)",
            type(model).__name__,
            "the root module has no parent to swap it on; construct the fused class instead",
        )
    # Everything checked: now swap.
    for swap in swaps.values():
        for parent, attr in swap.slots:
            parent._modules[attr] = swap.new
    report = PatchReport(list(swaps.values()), list(skipped.values()))
    if report.eager:
        warnings.warn(
            f"patch_model: no fused kernel here for {report.eager}; they run the eager reference",
            RuntimeWarning,
            stacklevel=2,
        )
    return report
