"""Backend discovery and selection.

``SURGELLM_BACKEND`` in {triton, cuda, cpu, eager} forces one backend; when the
forced backend cannot run a call, the call raises ``RuntimeError`` saying why.
Without it: the CUDA C++ kernels for CUDA tensors (Triton's run when
forced); the C++ kernel for CPU tensors; the eager reference when the
extension is missing (announced once with ``warnings.warn``).

The compiled backends are kernels of the same dispatcher ops
(``torch.ops.surgellm.*``, declared by the extension): the extension
registers its CPU and CUDA C++ kernels, and choosing Triton registers the
Triton kernels of the row passes for that device type on top of them
(removed again when another backend is chosen), so the dispatcher, not an op
argument, decides what runs. The small per-(task, class) phases stay the C++
ones on every backend (one definition of that math), so Triton on a GPU needs
the extension built with CUDA. Under ``torch.compile`` the registration is
left as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from typing import Dict, NamedTuple, Optional

import torch
from torch.overrides import has_torch_function

BACKENDS = ("triton", "cuda", "cpu", "eager")
ENV_VAR = "SURGELLM_BACKEND"

# Which ops each compiled backend implements. Eager runs every op.
_OPS = {
    "triton": ("iwn", "surgical_gate"),
    "cuda": ("iwn", "surgical_gate"),
    "cpu": ("iwn", "surgical_gate"),
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
_triton_error: Optional[str] = (
    None if importlib.util.find_spec("triton") is not None else "triton is not installed"
)
# The ops users call: their torch.ops overloads and the extension's typed entries.
_USER_OPS = ("iwn", "surgical_gate")
_overloads = (
    {}
    if _extension is None
    else {name: getattr(torch.ops.surgellm, name).default for name in _USER_OPS}
)
_typed_entries = (
    {} if _extension is None else {name: getattr(_extension, name) for name in _USER_OPS}
)
_warned_eager = False


def extension():
    """The compiled ``surgellm_kernels._C`` module, or None if not built."""
    return _extension


def call_op(name: str, args: tuple):
    """``torch.ops.surgellm.<name>(*args)``, the op's one crossing into C++.
    A plain eager call goes through the extension's typed entry of the op
    (pybind11 converts the arguments; no boxing: a third of a small call's
    cost); torch.compile's traces, tensor subclasses and TorchFunctionModes
    go through torch.ops, which they must see, and so does a call whose
    arguments the typed entry cannot convert, so that the dispatcher's
    conversion names the argument."""
    if not torch.compiler.is_compiling() and not has_torch_function(args):
        try:
            return _typed_entries[name](*args)
        except TypeError as error:
            if "incompatible function arguments" not in str(error):
                raise
    return _overloads[name](*args)


def _without(shape, dim: int) -> list:
    return [n for i, n in enumerate(shape) if i != dim]


def register_vmap_by_samples(name: str, checks: str, refuse=None) -> None:
    """``torch.func.vmap`` of ``surgellm::<name>``: the op once per sample (the
    sample's slice of each batched argument, the others as given), outputs
    stacked along dimension 0: what a Python loop over the samples returns.
    A sample is a batch of its own, as for BatchNorm under vmap: IWN's class
    statistics are each sample's. ``checks``: the op that checks the
    arguments (run on a sample of zeros when there are no samples).
    ``refuse(args, in_dims)``, both by argument name (defaults filled in),
    returns why a call cannot be vmapped so (raised as ValueError), or None."""

    op = getattr(torch.ops.surgellm, name).default
    check_op = getattr(torch.ops.surgellm, checks).default
    arguments = op._schema.arguments

    def by_samples(info, in_dims, *args):
        # The dispatcher leaves out trailing arguments at their defaults.
        named = {a.name: v for a, v in zip(arguments, args)}
        named.update({a.name: a.default_value for a in arguments[len(args) :]})
        dims = {a.name: d for a, d in zip(arguments, in_dims)}
        why = refuse(named, dims) if refuse is not None else None
        if why is not None:
            raise ValueError(f"torch.func.vmap: {why}")
        if info.batch_size == 0:
            # No sample to run: the checks on a sample of zeros, and x's (h's)
            # no rows, still tied to it for autograd.
            check_op(
                *(
                    a.new_zeros(_without(a.shape, d)) if d is not None else a
                    for a, d in zip(args, in_dims)
                )
            )
            if not op._schema.returns:
                return None, None
            x, d = args[0], in_dims[0]
            return (x.movedim(d, 0) if d is not None else x.expand(0, *x.shape)) * 0, 0
        outs = [
            op(*(a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)))
            for b in range(info.batch_size)
        ]
        return (None, None) if outs[0] is None else (torch.stack(outs), 0)

    torch.library.register_vmap(f"surgellm::{name}", by_samples)


def cpu_kernel_build() -> Optional[str]:
    """The CPU kernel build in use (DEFAULT, AVX2 or AVX512), or None when the
    extension is not built."""
    return _extension.cpu_capability() if _extension is not None else None


def empty_cpu_cache() -> int:
    """Gives the memory of the CPU output cache back to the system; returns
    how many bytes.

    The CPU kernels keep the storage of their large outputs (128 KiB or more)
    when the tensors are freed, so that the next call's outputs reuse pages
    already mapped instead of faulting fresh ones in. At most
    ``SURGELLM_CPU_OUTPUT_CACHE_MB`` megabytes (default 1024, read at the
    first call; 0 turns the cache off) lie unused, the least recently freed
    released first. Like ``torch.cuda.empty_cache()``, this frees only unused
    blocks; tensors keep theirs."""
    return _extension.empty_output_cache() if _extension is not None else 0


def cpu_cache_stats() -> dict:
    """Bytes of the CPU output cache: ``cached`` (unused, ready for reuse)
    and ``allocated`` (held by live tensors). See :func:`empty_cpu_cache`."""
    if _extension is None:
        return {"cached": 0, "allocated": 0}
    cached, allocated = _extension.output_cache_stats()
    return {"cached": cached, "allocated": allocated}


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
        if extension() is None:
            return f"the Triton kernels implement the extension's ops: {_extension_error}"
        if (
            device is not None
            and device.type != "cuda"
            and not (device.type == "cpu" and triton_interpreted())
        ):
            return (
                f"triton kernels need CUDA tensors (or CPU tensors with "
                f"TRITON_INTERPRET=1 set before import), got {device.type} tensors"
            )
        cuda_tensors = device.type == "cuda" if device is not None else not triton_interpreted()
        if cuda_tensors and not extension().has_cuda:
            return (
                "the Triton kernels run beside the extension's CUDA C++ phases, but it "
                "was built without CUDA (rebuild with nvcc and a CUDA torch)"
            )
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


def backends(device=None, op: Optional[str] = None) -> Dict[str, BackendStatus]:
    """Which backends this installation can run, and why not where it cannot.

    With ``device`` (a ``torch.device`` or its name) and ``op`` (``"iwn"``,
    ``"surgical_gate"``): whether each backend can run that op on tensors of
    that device.
    """
    device = torch.device(device) if device is not None else None
    result = {}
    for name in BACKENDS:
        why = _why_not(name, device, op)
        if name == "cuda" and why is None and not torch.cuda.is_available():
            why = "built with CUDA kernels, but no CUDA device is visible"
        if (
            name == "triton"
            and why is None
            and not (torch.cuda.is_available() or triton_interpreted())
        ):
            why = "triton importable, but no CUDA device (and TRITON_INTERPRET is not set)"
        result[name] = BackendStatus(why is None, why or "available")
    return result


def summary() -> str:
    """One line: the backends that run here, and why the others do not in a
    word or two ("cpu (AVX2), eager; not here: triton (no GPU), cuda (not
    built)")."""
    status = backends()
    gpu = torch.cuda.is_available()
    label = {
        "cpu": f"cpu ({cpu_kernel_build()})",
        "triton": "triton" if gpu else "triton (interpreter, on CPU tensors)",
    }
    ready = [label.get(name, name) for name, s in status.items() if s.available]
    short = {
        "triton": (_triton_error and "not installed")
        or (_extension_error and "not built")
        or (not (gpu or triton_interpreted()) and "no GPU")
        or (gpu and not _extension.has_cuda and "needs the CUDA build")
        or "unavailable",
        "cuda": (_extension_error and "not built")
        or (not getattr(_extension, "has_cuda", False) and "not built")
        or (not gpu and "no GPU")
        or "unavailable",
        "cpu": "not built",
        "eager": "unavailable",
    }
    missing = [f"{name} ({short[name]})" for name, s in status.items() if not s.available]
    return ", ".join(ready) + (f"; not here: {', '.join(missing)}" if missing else "")


def forced_backend() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


def select_backend(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device``; the dispatcher
    is set up to run it (see the module docstring)."""
    if torch.compiler.is_compiling():
        # Not the cache: a trace that filled it guarded on the key's absence,
        # and the next call compiled again.
        return _choose(op, device)
    # The choice depends on nothing but these (the rest is fixed at import),
    # so it is made once per key: this runs on every eager call.
    key = (op, device.type, *_settings())
    backend = _chosen.get(key)
    if backend is None:
        backend = _choose(op, device)  # raises for a forced backend that cannot run
        _chosen[key] = backend
    if backend in ("triton", "cuda", "cpu"):
        _use_triton_kernels(device.type, backend == "triton")
    return backend


_chosen: Dict[tuple, str] = {}


def _settings() -> tuple:
    """The environment variables the choice depends on, as they are now."""
    if _ENVIRON_BYTES is not None:
        return _ENVIRON_BYTES.get(_ENV_KEY), _ENVIRON_BYTES.get(b"TRITON_INTERPRET")
    return os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET")


# On CPython's POSIX build, the bytes dict behind os.environ (updated in place
# by every change through os.environ): os.environ.get costs about a
# microsecond, a tenth of a small call.
_ENVIRON_BYTES = os.environ.__dict__.get("_data") if os.name == "posix" else None
if not isinstance(_ENVIRON_BYTES, dict):
    _ENVIRON_BYTES = None
_ENV_KEY = os.fsencode(ENV_VAR)


def planned_backend(op: str, device) -> str:
    """The backend a call of ``op`` on ``device`` tensors will run, found
    without side effects (no registration, no warning); raises as the call
    would when ``SURGELLM_BACKEND`` forces a backend that cannot run it."""
    return _choose(op, torch.device(device), warn=False)


def _choose(op: str, device: torch.device, warn: bool = True) -> str:
    forced = forced_backend()
    if forced is not None:
        why = _why_not(forced, device, op)
        if why is not None:
            raise RuntimeError(
                f"{ENV_VAR}={forced} cannot run {op} on {device.type} tensors: {why}"
            )
        return forced
    # On a GPU the CUDA C++ kernels: on an H200 they ran fused_iwn's forward
    # + backward in half the Triton kernels' time (docs/benchmarks.md).
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in candidates:
        if _why_not(name, device, op) is None:
            return name
    if warn and device.type in ("cpu", "cuda") and op in _OPS["cpu"]:
        _warn_eager_once(op)
    return "eager"


# Device type -> the torch.library.Library holding the Triton kernels
# registered for it (destroying it restores the C++ kernels). Why a Library
# per device type: registering a Python kernel for the op's dispatch key is
# how torch.library overrides a kernel, and a Library's _destroy removes
# exactly what it registered, so switching backends needs no bookkeeping of
# its own.
_triton_libraries: Dict[str, "torch.library.Library"] = {}
_registration_lock = threading.Lock()


def _triton_kernel(module: str, name: str):
    """The Triton kernel of op ``name`` in ``surgellm_kernels.triton.<module>``,
    imported on its first call (importing Triton is slow, and never happens
    inside a trace: tracing runs the fake kernels)."""

    def kernel(*args):
        kernels = importlib.import_module(f"surgellm_kernels.triton.{module}").KERNELS
        return kernels[name](*args)

    kernel.__name__ = f"triton_{name}"
    return kernel


def _use_triton_kernels(device_type: str, use: bool) -> None:
    """Register (or remove) the Triton kernels of the phase ops for ``device_type``."""
    if use == (device_type in _triton_libraries):
        return
    with _registration_lock:
        if use != (device_type in _triton_libraries):
            _register_triton_kernels(device_type, use)


def _register_triton_kernels(device_type: str, use: bool) -> None:
    if not use:
        _triton_libraries.pop(device_type)._destroy()
        return
    lib = torch.library.Library("surgellm", "IMPL")
    with warnings.catch_warnings():
        # Replacing our own C++ kernel is the point; the dispatcher's
        # "Overriding a previously registered kernel" warning says nothing new.
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for module, names in TRITON_KERNELS.items():
            for name in names:  # names start with "_": the phase ops
                torch.library.register_kernel(
                    f"surgellm::{name}", device_type, _triton_kernel(module, name), lib=lib
                )
    _triton_libraries[device_type] = lib


# The ops each module of triton/ implements (the keys of its KERNELS), named
# here so that choosing a backend imports no Triton.
TRITON_KERNELS = {
    "iwn": ("_iwn_group_moments", "_iwn_apply", "_iwn_task_sums", "_iwn_input_grad"),
    "surgical_gate": ("_surgical_gate_forward", "_surgical_gate_backward"),
}


# Triton chosen for a GPU: registered now, so that a process whose first call
# is compiled already runs it.
if (
    torch.cuda.is_available()
    and _why_not("triton", torch.device("cuda"), None) is None
    and os.environ.get(ENV_VAR, "").strip().lower() == "triton"
):
    _use_triton_kernels("cuda", True)


def _warn_eager_once(op: str) -> None:
    global _warned_eager
    if not _warned_eager:
        _warned_eager = True
        reason = _extension_error or "no compiled kernel for this device"
        warnings.warn(
            f"surgellm_kernels: running {op} with the eager PyTorch reference "
            f"({reason}); build the extension with `pip install --no-build-isolation -e .` "
            f"(bash scripts/bootstrap.sh in a clone)",
            RuntimeWarning,
            stacklevel=3,
        )
