"""The functional ops (one file each), their reference and the backend choice."""

from ._backend import backends, cpu_cache_stats, cpu_kernel_build, empty_cpu_cache
from .iwn import fused_iwn
from .surgical_gate import fused_surgical_gate

__all__ = [
    "fused_iwn",
    "fused_surgical_gate",
    "backends",
    "cpu_kernel_build",
    "empty_cpu_cache",
    "cpu_cache_stats",
]
