"""Repository-wide pytest setup.

Triton kernels run on CPU tensors only under the Triton interpreter, which
must be switched on before ``triton`` (and our kernels) are imported: this
file is loaded by pytest before any test module. On a machine with a CUDA GPU
the real compiler is used instead.
"""

import os

# `SURGELLM_BACKEND=cuda pytest tests/` (scripts/gpu_check.sh) selects the
# kernels under test: the (backend, device) parametrized tests run that
# backend (and the eager reference) only. The variable itself is removed, as
# forcing one backend on every call would break the tests of CPU tensors.
# pytest-xdist's workers inherit the environment without it and load this
# file again: they keep the choice the main process made.
_forced = os.environ.pop("SURGELLM_BACKEND", None)
if _forced is not None or "SURGELLM_TESTED_BACKEND" not in os.environ:
    os.environ["SURGELLM_TESTED_BACKEND"] = _forced or ""

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
