"""surgellm_kernels: fused kernels for SURGELLM's surgical gate and
instance-weighted normalization (IWN), the paper's reference modules, and the
SURGELLM model built on them.

Layers, each importing only those below it: kernels (the C++ extension,
``triton``) -> ``ops`` (the functional ops) -> ``nn`` (modules) -> the
application, ``surgellm``. Importing this package loads no transformers: the
application's names below are imported on first use.
"""

from .nn import (
    FusedInstanceWeightedNorm,
    FusedInstanceWeightedNorm1d,
    FusedInstanceWeightedNorm2d,
    FusedSurgicalGate,
    InstanceWeightedNorm,
    InstanceWeightedNorm1d,
    InstanceWeightedNorm2d,
    PatchReport,
    SurgicalGate,
    SyncInstanceWeightedNorm,
    SyncInstanceWeightedNorm1d,
    SyncInstanceWeightedNorm2d,
    convert_sync_iwn,
    convert_to_iwn,
    iwn_labels,
    patch_model,
)
from .ops import (
    backends,
    cpu_cache_stats,
    cpu_kernel_build,
    empty_cpu_cache,
    fused_iwn,
    fused_surgical_gate,
)

# The application's names, from surgellm_kernels.surgellm on first use.
_APPLICATION = (
    "SurgeLLMConfig",
    "SurgeLLMModel",
    "SurgeLLMForSequenceClassification",
    "SurgeLLMProcessor",
    "LexicalFeaturizer",
    "lexical_features",
    "task_prefix",
)

__all__ = [
    "fused_iwn",
    "fused_surgical_gate",
    "InstanceWeightedNorm",
    "SurgicalGate",
    "FusedInstanceWeightedNorm",
    "FusedSurgicalGate",
    "SyncInstanceWeightedNorm",
    "SyncInstanceWeightedNorm1d",
    "SyncInstanceWeightedNorm2d",
    "convert_sync_iwn",
    "patch_model",
    "PatchReport",
    "InstanceWeightedNorm1d",
    "InstanceWeightedNorm2d",
    "FusedInstanceWeightedNorm1d",
    "FusedInstanceWeightedNorm2d",
    "convert_to_iwn",
    "iwn_labels",
    "backends",
    "cpu_kernel_build",
    "empty_cpu_cache",
    "cpu_cache_stats",
    *_APPLICATION,
]
__version__ = "0.2.0"


def __getattr__(name):
    if name in _APPLICATION:
        from . import surgellm

        return getattr(surgellm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
