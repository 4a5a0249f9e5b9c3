"""The CPU kernels of the builds below this processor's, and the AVX512
build's own bfloat16 rounding where the processor would round with
avx512_bf16. The build is chosen once per process, so those run nowhere else
in the suite: the CPU kernel tests of the gate, IWN and class-balanced
BatchNorm again, in a process that ATEN_CPU_CAPABILITY (or
SURGELLM_CPU_NO_AVX512_BF16) points at one."""

import os
import subprocess
import sys

import pytest
import torch

from surgellm_kernels import backends, cpu_kernel_build
from surgellm_kernels.ops import _backend

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = [
    os.path.join(HERE, "test_fused_surgical_gate.py"),
    os.path.join(HERE, "test_fused_iwn.py"),
    os.path.join(HERE, "test_iwn_ops.py"),
    os.path.join(os.path.dirname(HERE), "nn", "test_iwn_batchnorm.py"),
]
# The CPU kernel backend's parametrizations ("cpu-cpu"), the combine's
# bit test, and the BatchNorm layers (their default backend on CPU tensors).
SELECTION = (
    "(cpu-cpu or bits_of_one_feature or test_iwn_batchnorm)"
    " and not compile and not gpu and not triton"
)


def _native_bf16_rounding():
    return getattr(_backend._extension, "cpu_avx512_bf16_rounding", lambda: False)()


def _run_cpu_kernel_tests(env):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES, "-k", SELECTION],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.mark.skipif(not backends()["cpu"].available, reason="the C++ extension is not built")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_kernels_of_another_build(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    which = "import surgellm_kernels as s; print(s.cpu_kernel_build())"
    build = subprocess.run(
        [sys.executable, "-c", which], env=env, capture_output=True, text=True
    ).stdout.strip()
    if build != capability.upper() or build == cpu_kernel_build():
        pytest.skip(f"this processor runs {cpu_kernel_build()}; {capability} gives {build}")
    _run_cpu_kernel_tests(env)


@pytest.mark.skipif(not backends()["cpu"].available, reason="the C++ extension is not built")
def test_avx512_build_with_its_own_bfloat16_rounding():
    if cpu_kernel_build() != "AVX512" or not _native_bf16_rounding():
        pytest.skip("this processor does not round to bfloat16 with avx512_bf16")
    env = dict(os.environ, SURGELLM_CPU_NO_AVX512_BF16="1")
    which = (
        "from surgellm_kernels.ops import _backend as b; "
        "print(b._extension.cpu_avx512_bf16_rounding())"
    )
    off = subprocess.run([sys.executable, "-c", which], env=env, capture_output=True, text=True)
    assert off.stdout.strip() == "False", off.stdout + off.stderr
    _run_cpu_kernel_tests(env)


_BF16_OUTPUTS = """
import sys, torch
from surgellm_kernels import fused_iwn, fused_surgical_gate
torch.manual_seed(0)
h, s, logits = (torch.randn(64, 200).bfloat16() for _ in range(3))
x = torch.randn(64, 200).bfloat16() * 1e3
labels = torch.randint(0, 3, (64,))
z = fused_surgical_gate(h, s, logits, torch.randn(200), torch.randn(200))
y = fused_iwn(x, labels, training=True, num_classes=3)
torch.save([z, y], sys.argv[1])
"""


@pytest.mark.skipif(not backends()["cpu"].available, reason="the C++ extension is not built")
def test_avx512_bf16_rounding_gives_the_build_s_own_bits(tmp_path):
    """Finite, normal results round to the same bfloat16 bits either way."""
    if cpu_kernel_build() != "AVX512" or not _native_bf16_rounding():
        pytest.skip("this processor does not round to bfloat16 with avx512_bf16")
    outputs = []
    for off in ("0", "1"):
        path = tmp_path / f"off{off}.pt"
        env = dict(os.environ, SURGELLM_CPU_NO_AVX512_BF16=off)
        run = subprocess.run(
            [sys.executable, "-c", _BF16_OUTPUTS, str(path)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(torch.load(path))
    for native, own in zip(*outputs):
        assert torch.isfinite(own).all() and (own.float().abs() >= 2.0**-126).all()
        assert torch.equal(native.view(torch.int16), own.view(torch.int16))
