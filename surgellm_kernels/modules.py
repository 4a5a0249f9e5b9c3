"""Drop-in fused twins of the reference modules.

Same constructor, same parameters and buffers (so the same ``state_dict``
keys, and each loads the other's ``state_dict``); only the functional they
call differs.
"""
from __future__ import annotations

from .ops import fused_iwn, fused_surgical_gate
from .reference import InstanceWeightedNorm, SurgicalGate

__all__ = ["FusedInstanceWeightedNorm", "FusedSurgicalGate"]


class FusedInstanceWeightedNorm(InstanceWeightedNorm):
    """:class:`InstanceWeightedNorm` running :func:`fused_iwn`."""

    _iwn = staticmethod(fused_iwn)


class FusedSurgicalGate(SurgicalGate):
    """:class:`SurgicalGate` whose fusion tail runs :func:`fused_surgical_gate`."""

    _fuse = staticmethod(fused_surgical_gate)
