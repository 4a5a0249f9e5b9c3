"""The CPU kernels of the builds below this processor's. The build is
chosen once per process, so those builds run nowhere else in the suite: the
CPU kernel tests of the gate, IWN and class-balanced BatchNorm again, in a
process that ATEN_CPU_CAPABILITY points at one."""

import os
import subprocess
import sys

import pytest

from surgellm_kernels import backends, cpu_kernel_build

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
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES, "-k", SELECTION],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
