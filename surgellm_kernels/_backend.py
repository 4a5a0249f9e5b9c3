"""Backend discovery and selection (SPEC §5).

``SURGELLM_BACKEND`` in {triton, cuda, cpu, eager} forces one backend; when the
forced backend cannot run a call, the call raises ``RuntimeError`` saying why.
Without it: Triton for CUDA tensors when importable, else the CUDA C++ kernels;
the C++ kernel for CPU tensors; the eager reference when the extension is
missing (announced once with ``warnings.warn``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Dict, NamedTuple, Optional

import torch

BACKENDS = ("triton", "cuda", "cpu", "eager")
ENV_VAR = "SURGELLM_BACKEND"

# Which ops each compiled backend implements. Eager runs every op.
_OPS = {
    "triton": ("iwn",),
    "cuda": ("iwn",),
    "cpu": ("iwn",),
}


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _load_extension():
    try:
        return importlib.import_module("surgellm_kernels._C"), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"C++ extension not importable ({exc})"


# Discovered once, at import: select_backend runs inside code that
# torch.compile traces, where an import cannot happen. Triton itself is only
# looked up here (importing it is slow); its kernels import it when chosen.
_extension, _extension_error = _load_extension()
_triton_error: Optional[str] = (None if importlib.util.find_spec("triton") is not None
                                else "triton is not installed")
_warned_eager = False


def extension():
    """The compiled ``surgellm_kernels._C`` module, or None if not built."""
    return _extension


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not(backend: str, device: Optional[torch.device], op: Optional[str]) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device``, else the reason."""
    if backend == "eager":
        return None
    if op is not None and op not in _OPS[backend]:
        return f"backend {backend!r} has no kernel for op {op!r}"
    if backend == "triton":
        if _triton_error:
            return _triton_error
        if device is not None and device.type != "cuda" and not (
                device.type == "cpu" and triton_interpreted()):
            return (f"triton kernels need CUDA tensors (or CPU tensors with "
                    f"TRITON_INTERPRET=1 set before import), got {device.type} tensors")
        return None
    ext = extension()
    if ext is None:
        return _extension_error
    if backend == "cuda":
        if not getattr(ext, "has_cuda", False):
            return "the C++ extension was built without CUDA kernels (no nvcc or CPU-only torch)"
        if device is not None and device.type != "cuda":
            return f"CUDA kernels need CUDA tensors, got {device.type} tensors"
        return None
    if device is not None and device.type != "cpu":
        return f"CPU kernels need CPU tensors, got {device.type} tensors"
    return None


def backends() -> Dict[str, BackendStatus]:
    """Which backends this installation can run, and why not where it cannot."""
    result = {}
    for name in BACKENDS:
        why = _why_not(name, None, None)
        if name == "cuda" and why is None and not torch.cuda.is_available():
            why = "built with CUDA kernels, but no CUDA device is visible"
        if name == "triton" and why is None and not (torch.cuda.is_available() or triton_interpreted()):
            why = "triton importable, but no CUDA device (and TRITON_INTERPRET is not set)"
        result[name] = BackendStatus(why is None, why or "available")
    return result


def forced_backend() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


def select_backend(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device``."""
    forced = forced_backend()
    if forced is not None:
        why = _why_not(forced, device, op)
        if why is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run {op} on {device.type} tensors: {why}")
        return forced
    candidates = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for name in candidates:
        if _why_not(name, device, op) is None:
            return name
    if device.type in ("cpu", "cuda") and op in _OPS["cpu"]:
        _warn_eager_once(op)
    return "eager"


def _warn_eager_once(op: str) -> None:
    global _warned_eager
    if not _warned_eager:
        _warned_eager = True
        reason = _extension_error or "no compiled kernel for this device"
        warnings.warn(
            f"surgellm_kernels: running {op} with the eager PyTorch reference "
            f"({reason}); build the extension with `pip install --no-build-isolation -e .`",
            RuntimeWarning, stacklevel=3)
