"""The CPU output cache: large outputs' storage reused after they are freed,
bounded by SURGELLM_CPU_OUTPUT_CACHE_MB, given back by empty_cpu_cache(),
seen by torch's profiler."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import surgellm_kernels
from surgellm_kernels import (
    backends,
    cpu_cache_stats,
    empty_cpu_cache,
    fused_iwn,
    fused_surgical_gate,
)
from surgellm_kernels.ops.reference import iwn_reference, surgical_gate_reference

from _helpers import assert_as_accurate_as_reference, assert_close

pytestmark = pytest.mark.skipif(
    not backends(torch.device("cpu"))["cpu"].available, reason="the C++ extension is not built"
)

# 1031 x 263 float32: about 1.03 MiB, a size no other test's output has.
ROWS, FEATURES = 1031, 263


def _iwn(x, labels):
    return fused_iwn(x, labels, training=True, num_classes=3)


@pytest.fixture
def cpu_backend(force_backend):
    force_backend("cpu")
    empty_cpu_cache()
    yield
    empty_cpu_cache()


def test_a_freed_output_is_reused_by_the_next_call_of_its_size(cpu_backend):
    x = torch.randn(ROWS, FEATURES)
    labels = torch.arange(ROWS) % 3
    first = _iwn(x, labels)
    expected = first.clone()
    ptr = first.data_ptr()
    cached = cpu_cache_stats()["cached"]
    del first
    assert cpu_cache_stats()["cached"] > cached  # kept, not given back
    second = _iwn(x, labels)
    assert cpu_cache_stats()["cached"] == cached  # and taken again
    assert second.data_ptr() == ptr
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    truth = iwn_reference(x.double(), labels, training=True, num_classes=3)
    assert_close(second, truth, dtype=torch.float32, name="y in a reused block")


def test_stats_count_live_and_cached_bytes_and_empty_gives_them_back(cpu_backend):
    x = torch.randn(ROWS, FEATURES)
    labels = torch.arange(ROWS) % 3
    before = cpu_cache_stats()
    y = _iwn(x, labels)
    block = -(-y.nbytes // 4096) * 4096  # whole pages
    assert cpu_cache_stats()["allocated"] == before["allocated"] + block
    del y
    after = cpu_cache_stats()
    assert after["allocated"] == before["allocated"]
    assert after["cached"] == before["cached"] + block
    assert empty_cpu_cache() == after["cached"]
    assert cpu_cache_stats()["cached"] == 0


def test_gate_outputs_and_gradients_come_from_the_cache(cpu_backend):
    h, s, logits = (torch.randn(ROWS, FEATURES, requires_grad=True) for _ in range(3))
    z = fused_surgical_gate(h, s, logits)
    assert cpu_cache_stats()["allocated"] >= z.nbytes
    z.backward(torch.randn_like(z))
    del z
    for t in (h, s, logits):  # dh, ds, dlogits: cached storage, right values
        assert t.grad is not None and torch.isfinite(t.grad).all()
    live = cpu_cache_stats()["allocated"]
    h.grad = s.grad = logits.grad = None
    assert cpu_cache_stats()["allocated"] < live


def test_outputs_keep_the_inputs_layout_and_can_be_resized(cpu_backend):
    x = torch.randn(8, 64, 23, 23).to(memory_format=torch.channels_last)
    labels = torch.arange(8) % 2
    y = surgellm_kernels.FusedInstanceWeightedNorm2d(64, num_classes=2)(x, labels)
    assert y.stride() == x.stride()
    flat = _iwn(torch.randn(ROWS, FEATURES), torch.arange(ROWS) % 3)
    flat.resize_(2 * ROWS, FEATURES)  # its storage grows like any tensor's
    flat.fill_(1.0)
    assert flat.sum().item() == 2 * ROWS * FEATURES


def test_profiler_sees_the_cached_outputs(cpu_backend):
    x = torch.randn(ROWS, FEATURES)
    labels = torch.arange(ROWS) % 3
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = _iwn(x, labels)
        del y
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert any(s >= ROWS * FEATURES * 4 for s in sizes)  # the output, allocated
    assert any(s <= -ROWS * FEATURES * 4 for s in sizes)  # and freed


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "SURGELLM_BACKEND": "cpu", **env},
        capture_output=True,
        text=True,
    )


CACHE_AFTER_ONE_OUTPUT = """
    import torch
    from surgellm_kernels import cpu_cache_stats, fused_iwn
    x = torch.randn(1031, 263)
    y = fused_iwn(x, torch.arange(x.shape[0]) % 3, training=True)
    del y
    print(cpu_cache_stats()["cached"])
"""


def test_a_limit_of_zero_turns_the_cache_off():
    done = _run(CACHE_AFTER_ONE_OUTPUT, SURGELLM_CPU_OUTPUT_CACHE_MB="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_an_output_larger_than_the_limit_is_not_kept_and_evicts_nothing():
    code = """
        import torch
        from surgellm_kernels import cpu_cache_stats, fused_iwn
        def output(rows, features):
            x = torch.randn(rows, features)
            return fused_iwn(x, torch.arange(rows) % 3, training=True)
        small = output(1031, 263)  # about 1 MiB
        del small
        kept = cpu_cache_stats()["cached"]
        large = output(2048, 1024)  # 8 MiB, over the 4 MiB limit
        del large
        print(kept, cpu_cache_stats()["cached"])
    """
    done = _run(code, SURGELLM_CPU_OUTPUT_CACHE_MB="4")
    assert done.returncode == 0, done.stderr
    kept, after = (int(v) for v in done.stdout.split())
    assert kept >= 1031 * 263 * 4
    # the small output's block is still there, the large one is not
    assert kept <= after < 8 * 2**20


def test_a_limit_past_what_bytes_hold_is_no_limit():
    """2**44 MiB is 2**64 bytes: the limit wrapped to 0 (the cache silently
    off) or to a small number."""
    for mb in ("17592186044416", "17592186044417"):
        done = _run(CACHE_AFTER_ONE_OUTPUT, SURGELLM_CPU_OUTPUT_CACHE_MB=mb)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) >= ROWS * FEATURES * 4


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_emptying_the_cache_gives_its_memory_to_the_system():
    """empty_cpu_cache() freed its blocks into glibc's heap, which kept them
    (blocks past its mmap threshold, which rises to 32 MiB as large blocks
    are freed, between live small ones): resident memory did not go down."""
    code = """
        import os, torch
        from surgellm_kernels import empty_cpu_cache, fused_iwn
        def resident():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        warm = torch.empty(30 << 20, dtype=torch.uint8).fill_(1)
        del warm  # glibc's mmap threshold rises to 30 MiB: the outputs below come from its heap
        outputs, pins = [], []
        for i in range(48):  # about 100 MB of outputs, each a size of its own
            x = torch.randn(1024 + i, 512)
            outputs.append(fused_iwn(x, torch.arange(1024 + i) % 3, training=True))
            pins.append(torch.ones(16 << 10))  # small live blocks between them
            del x
        del outputs
        before = resident()
        freed = empty_cpu_cache()
        print(freed, before - resident())
    """
    done = _run(code)
    assert done.returncode == 0, done.stderr
    freed, returned = (int(v) for v in done.stdout.split())
    assert freed > 90 * 2**20
    assert returned > freed // 2, (freed, returned)


def test_a_bad_limit_names_the_variable():
    done = _run(CACHE_AFTER_ONE_OUTPUT, SURGELLM_CPU_OUTPUT_CACHE_MB="lots")
    assert done.returncode != 0
    assert "SURGELLM_CPU_OUTPUT_CACHE_MB must be a whole number of megabytes" in done.stderr
    assert "ValueError" in done.stderr


# A pass whose tensors together exceed the last-level cache (32 MiB or less
# on the machines this runs on) writes float32 outputs with non-temporal
# stores: whole aligned vectors, the rest of a row with ordinary stores. Rows
# of 1024 and 1031 features (aligned and not), channels-first planes
# (BatchNorm's layout, fused_iwn's feature_dim=1), and bfloat16, streamed in
# pairs of vectors where its output alone exceeds the cache.
STREAMED = [
    (torch.float32, (((32 << 20) // (4 * 1024)) + 5, 1024)),
    (torch.float32, (((32 << 20) // (4 * 1031)) + 5, 1031)),
    (torch.bfloat16, (((32 << 20) // (2 * 1031)) + 5, 1031)),
    (torch.float32, (1024, 128, 33)),  # planes of 33: unaligned, with tails
    (torch.bfloat16, (2048, 256, 33)),
]


@pytest.mark.parametrize("dtype, shape", STREAMED, ids=lambda v: str(v).replace("torch.", ""))
def test_outputs_written_with_streaming_stores_match_float64_truth(cpu_backend, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    planes = len(shape) == 3
    features = shape[1] if planes else shape[-1]
    gate = None if planes else torch.randn(features, generator=g)
    labels = torch.randint(0, 5, (shape[0],), generator=g)
    args = dict(training=True, num_classes=5, feature_dim=1 if planes else -1)

    def iwn_and_grads(fn, as_dtype):
        xg = x.to(as_dtype, copy=True).requires_grad_()
        gg = None if gate is None else gate.to(as_dtype, copy=True).requires_grad_()
        y = fn(xg, labels, gate=gg, **args)
        y.backward(dy.to(as_dtype))
        return (y, xg.grad) + (() if gg is None else (gg.grad,))

    def gate_and_grads(fn, as_dtype):
        h, s, logits = (t.to(as_dtype, copy=True).requires_grad_() for t in (x, dy, x.flip(0)))
        z = fn(h, s, logits)
        z.backward(dy.to(as_dtype))
        return z, h.grad, s.grad, logits.grad

    cases = [(iwn_and_grads, fused_iwn, iwn_reference)]
    if not planes:
        cases.append((gate_and_grads, fused_surgical_gate, surgical_gate_reference))
    for run, fused, reference in cases:
        truth = run(reference, torch.float64)
        got = run(fused, dtype)
        if dtype == torch.float32:
            for i, (a, t) in enumerate(zip(got, truth)):
                assert_close(a, t, dtype=dtype, scale=10, name=f"{fused.__name__} output {i}")
        else:
            assert_as_accurate_as_reference(got, run(reference, dtype), truth, dtype)
