"""More than 2^31 elements: every index is 64-bit.

A bfloat16 x of 2,097,216 x 1024 (2^31 + 65,536 elements, 4.3 GB), eval and
training forward on the CPU kernels, rows past element 2^31 checked against
the reference. Slow and memory-hungry (about 9 GB): marked slow (run with
`pytest -m slow`, as .ci/run does).
"""

import pytest
import torch

from surgellm_kernels import backends, fused_iwn
from surgellm_kernels.ops.reference import class_balanced_statistics, iwn_reference

F = 1024
PERIOD = 192  # 64 distinct rows x 3 labels: every class sees the same rows
N = PERIOD * 10923  # N * F = 2^31 + 65,536


def _free_gib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not backends(torch.device("cpu"))["cpu"].available, reason="the C++ extension is not built"
    ),
]


@pytest.fixture(scope="module")
def big():
    if _free_gib() < 12:  # asked for, so not skipped quietly
        pytest.fail(f"needs about 12 GiB free, {_free_gib():.1f} available")
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(64, F, generator=g).to(torch.bfloat16)
    x = pattern.repeat(N // 64, 1)
    labels = torch.arange(N) % 3
    assert x.numel() > 2**31
    return x, labels


def test_eval_and_training_forward_past_2_to_the_31(big, force_backend):
    force_backend("cpu")
    x, labels = big
    checked = [0, N // 2, 2**31 // F, N - 2, N - 1]  # row 2^31 / F starts past element 2^31
    rm, rs = torch.randn(F), torch.rand(F) + 0.5
    y = fused_iwn(x, running_mean=rm, running_std=rs)
    torch.testing.assert_close(
        y[checked], iwn_reference(x[checked], running_mean=rm, running_std=rs), rtol=1e-2, atol=1e-2
    )
    del y
    # Training: with momentum 1 the running statistics become the batch's,
    # which one period of rows has too (every class sees the same rows).
    rm, rs = torch.zeros(F), torch.ones(F)
    y = fused_iwn(
        x, labels, running_mean=rm, running_std=rs, training=True, momentum=1.0, num_classes=3
    )
    mu, sigma, _ = class_balanced_statistics(x[:PERIOD].float(), labels[:PERIOD], 3)
    torch.testing.assert_close(rm, mu[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rs, sigma[0], rtol=1e-4, atol=1e-4)
    expected = iwn_reference(x[checked], running_mean=rm, running_std=rs)
    torch.testing.assert_close(y[checked], expected, rtol=1e-2, atol=1e-2)
    del y
    # Rows past element 2^31 made unlike any other: a 32-bit offset that
    # wrapped would read another row.
    past = slice(2**31 // F, N)
    x[past] = torch.randn(x[past].shape, generator=torch.Generator().manual_seed(1)).to(x)
    y = fused_iwn(x, running_mean=rm, running_std=rs)
    torch.testing.assert_close(
        y[past], iwn_reference(x[past], running_mean=rm, running_std=rs), rtol=1e-2, atol=1e-2
    )
