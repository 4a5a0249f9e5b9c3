"""surgellm_kernels: fused kernels for SURGELLM's surgical gate and
instance-weighted normalization (IWN), with the paper's reference modules."""
from ._backend import backends, cpu_kernel_build
from .distributed import SyncInstanceWeightedNorm, convert_sync_iwn
from .features import LexicalFeaturizer, lexical_features, task_prefix
from .model import SurgeLLMConfig, SurgeLLMModel
from .modules import FusedInstanceWeightedNorm, FusedSurgicalGate
from .ops import fused_iwn, fused_surgical_gate
from .patching import PatchReport, patch_model
from .reference import InstanceWeightedNorm, SurgicalGate

__all__ = [
    "fused_iwn",
    "fused_surgical_gate",
    "InstanceWeightedNorm",
    "SurgicalGate",
    "FusedInstanceWeightedNorm",
    "FusedSurgicalGate",
    "SyncInstanceWeightedNorm",
    "convert_sync_iwn",
    "SurgeLLMConfig",
    "SurgeLLMModel",
    "patch_model",
    "PatchReport",
    "lexical_features",
    "task_prefix",
    "LexicalFeaturizer",
    "backends",
    "cpu_kernel_build",
]
__version__ = "0.1.0"
