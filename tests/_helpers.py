"""Helpers shared by the test modules (imported as a plain module)."""

import os

import torch
from torch.overrides import TorchFunctionMode

from surgellm_kernels import backends


def on_device(device, *values):
    """``values`` (tensors, or lists, tuples and dicts of tensors and other
    things) moved to ``device``; one value is returned as itself, several as a tuple."""

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(item) for k, item in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(move(item) for item in v)
        return v

    moved = tuple(move(v) for v in values)
    return moved[0] if len(moved) == 1 else moved


def cpu_backends():
    """Kernel backends that can run CPU tensors here (Triton through its
    interpreter). The eager backend is the reference itself: it is tested
    against float64 truth and independent formulas (test_reference.py),
    never against itself."""
    status = backends(torch.device("cpu"))
    # With a backend under test (SURGELLM_BACKEND=cuda or triton on a GPU
    # machine, scripts/gpu_check.sh), the CPU kernels are not tested there.
    tested = os.environ.get("SURGELLM_TESTED_BACKEND", "")
    return [name for name in ("cpu", "triton") if status[name].available and tested in ("", name)]


def device_backends():
    """(backend, device) pairs of kernel backends runnable on this machine;
    with SURGELLM_BACKEND given to pytest (see conftest.py), that backend's
    pairs only."""
    pairs = [(name, "cpu") for name in cpu_backends()]
    if torch.cuda.is_available():
        status = backends()
        pairs += [(name, "cuda") for name in ("triton", "cuda") if status[name].available]
    tested = os.environ.get("SURGELLM_TESTED_BACKEND", "")
    if tested and tested not in {b for b, _ in pairs}:
        status = backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        raise RuntimeError(
            f"SURGELLM_BACKEND={tested}: that backend cannot run here "
            f"({status[tested].reason if tested in status else 'unknown name'})"
        )
    return [(b, d) for b, d in pairs if not tested or b == tested]


TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def assert_close(actual, expected, dtype=None, scale=1.0, name=None):
    """Compare in float64 at the tolerance of ``dtype`` (default: actual's);
    ``name`` prefixes the failure message."""
    tol = TOLERANCES[dtype or actual.dtype] * scale
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=tol,
        atol=tol,
        msg=None if name is None else (lambda m: f"{name}: {m}"),
    )


def assert_as_accurate_as_reference(fused, ref, truth, dtype, scale=1.0):
    """The accuracy rule for lower precisions: each of ``fused`` (outputs,
    gradients, statistics) lies within a few times the reference's own error
    in ``dtype`` of the float64 ``truth`` computed on the same rounded inputs,
    plus the dtype's tolerance. (Some gradients are cancellations: y is
    invariant to scaling u, so d gate is a small sum of large terms; a fixed
    tolerance on them would test luck, not the kernel.)"""
    tol = TOLERANCES[dtype] * scale
    for i, (a, r, t) in enumerate(zip(fused, ref, truth)):
        err, ref_err = (a.double() - t).abs().max(), (r.double() - t).abs().max()
        bound = 4 * ref_err + tol * max(1.0, t.abs().max())
        assert err <= bound, (
            f"output {i}: error {err:.3g} > bound {bound:.3g} (reference {ref_err:.3g})"
        )


def assert_same_bits_across_threads(run):
    """``run()`` (returning a sequence of tensors) gives bitwise the same
    results twice with 2 threads and once with 1: the reductions must not
    depend on scheduling or thread count."""
    threads = torch.get_num_threads()

    def once(num_threads):
        torch.set_num_threads(num_threads)
        try:
            return run()
        finally:
            torch.set_num_threads(threads)

    first = once(2)
    for other in (once(2), once(1)):
        for a, b in zip(first, other):
            assert torch.equal(a, b)


class TorchCalls(TorchFunctionMode):
    """Records every torch function called from Python, tensor metadata aside."""

    METADATA = {"__get__", "dim", "numel", "size", "stride", "is_contiguous"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in self.METADATA:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
