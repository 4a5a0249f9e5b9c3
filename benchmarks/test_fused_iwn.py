"""fused_iwn against eager, torch.compile, F.batch_norm and a memory-copy proxy.

pytest benchmarks/ --benchmark-only                          # default run
SURGELLM_BENCH_FULL=1 pytest benchmarks/ --benchmark-only    # + large shapes, bfloat16
SURGELLM_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only   # smoke run
"""

import pytest
import torch
import torch.nn.functional as F

from surgellm_kernels import fused_iwn
from surgellm_kernels.ops.reference import iwn_reference

from harness import (
    COPY_ROOFLINE,
    PROXY,
    Implementation,
    case_id,
    cases,
    forward_backward,
    kernel_implementation,
    run_case,
    runnable,
    sized,
)

NUM_CLASSES = 10
# the paper's lexical features and pooled states, token level, large
SHAPES = sized(
    quick=[(32, 16), (256, 64)],
    default=[(32, 16), (32, 768), (4096, 768)],
    full=[(32, 16), (32, 768), (4096, 768), (32768, 768), (65536, 1024)],
)

CASES = cases("fused_iwn", SHAPES)


def _inputs(case):
    # on the case's device: large inputs are not drawn on the host and copied
    g = torch.Generator(case.device).manual_seed(0)
    N, Fd = case.shape
    x = torch.randn(N, Fd, generator=g, device=case.device).to(case.dtype)
    params = dict(
        labels=torch.randint(0, NUM_CLASSES, (N,), generator=g, device=case.device),
        gate=torch.randn(Fd, generator=g, device=case.device),
        weight=torch.ones(Fd, device=case.device),
        bias=torch.zeros(Fd, device=case.device),
        running_mean=torch.zeros(Fd, device=case.device),
        running_std=torch.ones(Fd, device=case.device),
    )
    return x, params


def _call(fn, case):
    """A closure running ``fn`` in the case's mode; returns what it produces."""
    x, p = _inputs(case)
    if case.mode == "eval":
        kwargs = dict(p, labels=None, training=False)
        return lambda: fn(x, **kwargs)
    kwargs = dict(p, training=True, num_classes=NUM_CLASSES)
    if case.mode == "train_fwd":
        return lambda: fn(x, **kwargs)
    leaf = x.detach().requires_grad_(True)
    for name in ("gate", "weight", "bias"):
        kwargs[name] = kwargs[name].detach().requires_grad_(True)
    leaves = (leaf, kwargs["gate"], kwargs["weight"], kwargs["bias"])
    return forward_backward(lambda: fn(leaf, **kwargs), torch.randn_like(leaf), leaves)


def _fused(backend):
    return kernel_implementation(
        f"fused_iwn[{backend}]", "iwn", backend, lambda case: _call(fused_iwn, case)
    )


def _compiled(case):
    # fresh and static for each case: compiled after another shape, dynamo
    # would make the sizes symbolic (automatic dynamic shapes)
    torch._dynamo.reset()
    return _call(torch.compile(iwn_reference, dynamic=False), case), None


def _batch_norm(case):
    """ATen's class-blind batch norm (no gate) on the same tensor."""

    def bn(
        x,
        labels=None,
        gate=None,
        weight=None,
        bias=None,
        running_mean=None,
        running_std=None,
        training=False,
        num_classes=None,
    ):
        return F.batch_norm(x, running_mean, running_std, weight, bias, training=training)

    return _call(bn, case), None


def _proxy(case):
    """torch.addcmul(a, b, c, out=o): a single op moving 4 tensors of x's size."""
    a, b, c = (torch.randn(case.shape, device=case.device).to(case.dtype) for _ in range(3))
    out = torch.empty_like(a)
    return (lambda: torch.addcmul(a, b, c, out=out)), None


IMPLEMENTATIONS = runnable(
    [
        _fused("cpu"),
        _fused("triton"),
        _fused("cuda"),
        Implementation("eager", lambda case: (_call(iwn_reference, case), None)),
        Implementation("torch.compile", _compiled),
        Implementation("F.batch_norm (class-blind)", _batch_norm),
        Implementation(PROXY, _proxy),
        COPY_ROOFLINE,
    ],
    "iwn",
)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_iwn(benchmark, bench_report, case, impl):
    run_case(benchmark, bench_report, case, impl)
