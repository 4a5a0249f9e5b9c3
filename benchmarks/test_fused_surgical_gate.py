"""fused_surgical_gate against eager, torch.compile, F.layer_norm alone and a
memory-copy proxy; and the whole SurgicalGate module, reference vs fused.

    pytest benchmarks/ --benchmark-only -k surgical              # this op only
    SURGELLM_BENCH_FULL=1 pytest benchmarks/ --benchmark-only    # + large shapes, bfloat16
    SURGELLM_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only   # smoke run
"""

import pytest
import torch
import torch.nn.functional as F

from surgellm_kernels import FusedSurgicalGate, SurgicalGate, fused_surgical_gate
from surgellm_kernels.ops.reference import surgical_gate_reference

from harness import (
    COPY_ROOFLINE,
    DEVICES,
    PROXY,
    Case,
    Implementation,
    case_id,
    cases,
    forward_backward,
    kernel_implementation,
    run_case,
    runnable,
    shapes,
    sized,
)

OP = "fused_surgical_gate"
MODULE = "SurgicalGate module"
# pooled states (paper), token level, large
SHAPES = sized(
    quick=[(32, 768), (256, 64)],
    default=[(32, 768), (4096, 768)],
    full=[(32, 768), (4096, 768), (32768, 768), (16384, 1024)],
)
MODULE_SHAPES = sized(
    quick=[(32, 768)], default=[(32, 768), (4096, 768)], full=[(32, 768), (4096, 768)]
)

CASES = cases(OP, SHAPES)
MODULE_CASES = [
    Case(MODULE, "train_fwd_bwd", shape, torch.float32, device)
    for device in DEVICES
    for shape in shapes(MODULE_SHAPES)
]


def _call(fn, case):
    """A closure running fn(h, s, gate_logits, weight, bias) in the case's mode."""
    # on the case's device: large inputs are not drawn on the host and copied
    g = torch.Generator(case.device).manual_seed(0)
    h, s, logits = (
        torch.randn(case.shape, generator=g, device=case.device).to(case.dtype) for _ in range(3)
    )
    d = case.shape[-1]
    weight, bias = torch.ones(d, device=case.device), torch.zeros(d, device=case.device)
    if case.mode == "eval":

        def run():
            with torch.no_grad():
                return fn(h, s, logits, weight, bias)

        return run
    leaves = [t.requires_grad_(True) for t in (h, s, logits, weight, bias)]
    if case.mode == "train_fwd":
        return lambda: fn(*leaves)
    return forward_backward(lambda: fn(*leaves), torch.randn_like(h), leaves)


def _fused(backend):
    return kernel_implementation(
        f"{OP}[{backend}]", "surgical_gate", backend, lambda case: _call(fused_surgical_gate, case)
    )


def _compiled(case):
    # fresh and static for each case: compiled after another shape, dynamo
    # would make the sizes symbolic (automatic dynamic shapes)
    torch._dynamo.reset()
    return _call(torch.compile(surgical_gate_reference, dynamic=False), case), None


def _layer_norm(case):
    """F.layer_norm of h alone: what a user would pick instead (no gate, no blend)."""
    d = case.shape[-1]
    return _call(lambda h, s, logits, w, b: F.layer_norm(h, (d,), w, b), case), None


def _proxy(case):
    """torch.addcmul(a, b, c, out=o): a single op moving 4 tensors of h's size."""
    a, b, c = (torch.randn(case.shape, device=case.device).to(case.dtype) for _ in range(3))
    out = torch.empty_like(a)
    return (lambda: torch.addcmul(a, b, c, out=out)), None


IMPLEMENTATIONS = runnable(
    [
        _fused("cpu"),
        _fused("triton"),
        _fused("cuda"),
        Implementation("eager", lambda case: (_call(surgical_gate_reference, case), None)),
        Implementation("torch.compile", _compiled),
        Implementation("F.layer_norm alone", _layer_norm),
        Implementation(PROXY, _proxy),
        COPY_ROOFLINE,
    ],
    "surgical_gate",
)


def _module(cls):
    """The whole module (task embedding, projection, gate linear, fused tail),
    forward + backward; 16 lexical features, 3 tasks."""

    def build(case):
        if cls is FusedSurgicalGate:  # the row says so when the fast path is not taken
            from surgellm_kernels.ops._backend import planned_backend

            if planned_backend("surgical_gate", case.device) == "eager":
                return None, "FusedSurgicalGate would run the eager reference here"
        torch.manual_seed(0)
        N, d = case.shape
        module = cls(d, num_features=16, num_tasks=3).to(case.device)
        h = torch.randn(N, d, device=case.device)
        s = torch.randn(N, 16, device=case.device)
        tasks = torch.randint(0, 3, (N,), device=case.device)
        dz = torch.randn(N, d, device=case.device)
        return forward_backward(lambda: module(h, s, tasks), dz, module.parameters()), None

    return build


MODULE_IMPLEMENTATIONS = [
    Implementation("eager", _module(SurgicalGate)),
    Implementation("FusedSurgicalGate", _module(FusedSurgicalGate)),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_surgical_gate(benchmark, bench_report, case, impl):
    run_case(benchmark, bench_report, case, impl)


@pytest.mark.parametrize("impl", MODULE_IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("case", MODULE_CASES, ids=case_id)
def test_surgical_gate_module(benchmark, bench_report, case, impl):
    run_case(benchmark, bench_report, case, impl)
