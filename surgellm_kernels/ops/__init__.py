"""The fused functional ops, one file each."""
from .iwn import fused_iwn
from .surgical_gate import fused_surgical_gate

__all__ = ["fused_iwn", "fused_surgical_gate"]
