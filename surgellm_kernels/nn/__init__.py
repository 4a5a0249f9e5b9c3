"""Modules: the paper's reference modules (Eq.3-7, Eq.10-11), their fused
twins, the data-parallel IWN and ``patch_model``."""

from .distributed import (
    SyncInstanceWeightedNorm,
    SyncInstanceWeightedNorm1d,
    SyncInstanceWeightedNorm2d,
    convert_sync_iwn,
    sync_payload,
)
from .iwn import (
    FusedInstanceWeightedNorm,
    FusedInstanceWeightedNorm1d,
    FusedInstanceWeightedNorm2d,
    InstanceWeightedNorm,
    InstanceWeightedNorm1d,
    InstanceWeightedNorm2d,
)
from .patching import PatchReport, convert_to_iwn, iwn_labels, patch_model
from .surgical_gate import FusedSurgicalGate, SurgicalGate

__all__ = [
    "InstanceWeightedNorm",
    "FusedInstanceWeightedNorm",
    "InstanceWeightedNorm1d",
    "InstanceWeightedNorm2d",
    "FusedInstanceWeightedNorm1d",
    "FusedInstanceWeightedNorm2d",
    "convert_to_iwn",
    "iwn_labels",
    "SurgicalGate",
    "FusedSurgicalGate",
    "SyncInstanceWeightedNorm",
    "SyncInstanceWeightedNorm1d",
    "SyncInstanceWeightedNorm2d",
    "convert_sync_iwn",
    "sync_payload",
    "patch_model",
    "PatchReport",
]
