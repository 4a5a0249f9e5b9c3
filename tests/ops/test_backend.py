"""Backend discovery, forcing, and the package without its extension."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import surgellm_kernels
from surgellm_kernels import backends, fused_iwn, fused_surgical_gate


def _inputs():
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    return x, labels


def test_backends_reports_every_backend_with_a_reason():
    status = backends()
    assert set(status) == {"triton", "cuda", "cpu", "eager"}
    assert status["eager"].available
    for st in status.values():
        assert isinstance(st.reason, str) and st.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available


def test_forced_backend_that_cannot_run_raises(force_backend):
    x, labels = _inputs()
    force_backend("cuda")  # CPU tensors: the CUDA kernels cannot run them
    with pytest.raises(RuntimeError, match="SURGELLM_BACKEND=cuda cannot run iwn"):
        fused_iwn(x, labels, training=True)


def test_unknown_backend_name_raises(force_backend):
    x, labels = _inputs()
    force_backend("tpu")
    with pytest.raises(ValueError, match="SURGELLM_BACKEND"):
        fused_iwn(x, labels, training=True)


def test_forced_backend_that_cannot_run_the_surgical_gate_raises(force_backend):
    h = torch.randn(2, 4)
    force_backend("cuda")
    with pytest.raises(RuntimeError, match="SURGELLM_BACKEND=cuda cannot run surgical_gate"):
        fused_surgical_gate(h, h, h)
    force_backend("eager")
    assert fused_surgical_gate(h, h, h).shape == h.shape


@pytest.mark.skipif(not backends()["cpu"].available, reason="extension not built")
def test_default_backend_on_cpu_is_the_cpp_kernel(monkeypatch):
    monkeypatch.delenv("SURGELLM_BACKEND", raising=False)
    assert surgellm_kernels.ops._backend.select_backend("iwn", torch.device("cpu")) == "cpu"


def test_default_backend_on_a_gpu_is_the_cuda_kernels(monkeypatch):
    """Where both compiled GPU backends can run, the faster one: on an H200
    the CUDA C++ kernels ran fused_iwn in half the Triton kernels' time."""
    backend = surgellm_kernels.ops._backend
    monkeypatch.delenv("SURGELLM_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_why_not", lambda name, device, op: None)
    assert backend._choose("iwn", torch.device("cuda")) == "cuda"
    assert backend._choose("surgical_gate", torch.device("cuda")) == "cuda"


def test_package_works_without_the_extension():
    """A fresh interpreter where importing surgellm_kernels._C fails."""
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "surgellm_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, surgellm_kernels as sk
        status = sk.backends()
        assert not status["cpu"].available and "blocked" in status["cpu"].reason, status
        x, labels = torch.randn(8, 4), torch.randint(0, 2, (8,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = sk.fused_iwn(x, labels, training=True)
            y2 = sk.fused_iwn(x, labels, training=True)
        eager = [w for w in caught if "eager PyTorch reference" in str(w.message)]
        assert len(eager) == 1, [str(w.message) for w in caught]
        # Eq.10-11 written out: the mean and the mean deviation of the classes
        u = x.double()
        classes = [u[labels == c] for c in labels.unique()]
        mu = torch.stack([c.mean(0) for c in classes]).mean(0)
        sigma = torch.stack([c.std(0, unbiased=False) for c in classes]).mean(0)
        assert torch.allclose(y1.double(), (u - mu) / (sigma + 1e-5), atol=1e-5)
        assert torch.equal(y1, y2)
        print("ok")
    """)
    env = {"SURGELLM_BACKEND": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not backends("cpu", "iwn")["triton"].available, reason="Triton not runnable")
def test_triton_registers_a_kernel_for_every_kernel_op():
    import importlib
    import inspect

    from surgellm_kernels.ops import _backend

    for module, names in _backend.TRITON_KERNELS.items():
        kernels = importlib.import_module(f"surgellm_kernels.triton.{module}").KERNELS
        assert set(names) == set(kernels)
        for name in names:  # the Python kernels take the schema's arguments
            schema = getattr(torch.ops.surgellm, name).default._schema
            params = list(inspect.signature(kernels[name]).parameters)
            assert params == [a.name for a in schema.arguments], name


@pytest.mark.parametrize("eps", [1e-5, 1e-12, 1 / 3, 3.14159e-7, 0.0, 1.0, 2.5e30])
def test_triton_kernels_get_eps_in_float32_parts_that_sum_to_it_exactly(eps):
    # Triton passes Python floats to kernels as float32; float64 kernels
    # rebuild eps from three float32 parts (the interpreter would not show
    # the rounding, a GPU did)
    float32_parts = pytest.importorskip("surgellm_kernels.triton.iwn").float32_parts
    parts = float32_parts(eps)
    as_float32 = torch.tensor(parts, dtype=torch.float32)
    assert as_float32.double().tolist() == list(parts)  # each part is a float32
    assert as_float32.double().sum().item() == eps
    assert float(torch.tensor(eps, dtype=torch.float32)) == parts[0]  # what float32 kernels use


def test_triton_eps_beyond_float32_is_a_clear_error():
    float32_parts = pytest.importorskip("surgellm_kernels.triton.iwn").float32_parts
    with pytest.raises(ValueError, match="eps must be at most"):
        float32_parts(1e39)
    assert float32_parts(float("inf"))[0] == float("inf")


def test_backends_for_a_device_and_op():
    status = backends("cpu", "surgical_gate")
    assert not status["cuda"].available and "CUDA" in status["cuda"].reason
    assert backends("cpu", "iwn")["eager"].available


def test_pytest_workers_keep_the_tested_backend(monkeypatch):
    """pytest-xdist's workers load the root conftest.py again, in the
    environment the main process left, SURGELLM_BACKEND removed: they keep
    its choice (they reset it to every backend, and the GPU check's cuda and
    triton test steps ran the same tests)."""
    import runpy
    from pathlib import Path

    conftest = str(Path(__file__).resolve().parents[2] / "conftest.py")
    monkeypatch.setenv("SURGELLM_BACKEND", "cuda")
    monkeypatch.delenv("SURGELLM_TESTED_BACKEND", raising=False)
    for process in ("main", "worker"):
        runpy.run_path(conftest)
        assert "SURGELLM_BACKEND" not in os.environ, process
        assert os.environ["SURGELLM_TESTED_BACKEND"] == "cuda", process


@pytest.mark.skipif(surgellm_kernels.ops._backend.extension() is None, reason="no extension")
def test_eager_calls_take_the_typed_entries(monkeypatch, force_backend):
    """The argument tuples fused_iwn and fused_surgical_gate build are the
    extension's typed entries' (csrc/library.cpp): a schema change they miss
    would send every eager call down the boxed path, correct and slower."""
    from surgellm_kernels.ops import _backend

    def boxed(*args):
        raise AssertionError("the typed entry refused the arguments")

    force_backend("cpu")
    for name in ("iwn", "surgical_gate"):
        monkeypatch.setitem(_backend._overloads, name, boxed)
    x, labels = _inputs()
    fused_iwn(x, labels, task_ids=labels % 2, training=True, num_classes=3, num_tasks=2)
    fused_iwn(
        x, labels, weight=torch.ones(3), running_mean=torch.zeros(3), running_std=torch.ones(3)
    )
    fused_surgical_gate(x, x, x, torch.ones(3), torch.zeros(3))
