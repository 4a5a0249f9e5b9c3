"""Modules: the paper's reference modules (Eq.3-7, Eq.10-11), their fused
twins, the data-parallel IWN and ``patch_model``."""

from .distributed import SyncInstanceWeightedNorm, convert_sync_iwn, sync_payload
from .iwn import FusedInstanceWeightedNorm, InstanceWeightedNorm
from .patching import PatchReport, patch_model
from .surgical_gate import FusedSurgicalGate, SurgicalGate

__all__ = [
    "InstanceWeightedNorm",
    "FusedInstanceWeightedNorm",
    "SurgicalGate",
    "FusedSurgicalGate",
    "SyncInstanceWeightedNorm",
    "convert_sync_iwn",
    "sync_payload",
    "patch_model",
    "PatchReport",
]
