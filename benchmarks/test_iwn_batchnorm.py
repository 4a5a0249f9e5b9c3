"""Class-balanced BatchNorm: fused_iwn over channels (feature_dim=1, what
FusedInstanceWeightedNorm2d runs) against F.batch_norm on the same tensor,
contiguous and channels_last, and against the eager reference.

pytest benchmarks/test_iwn_batchnorm.py --benchmark-only
"""

import pytest
import torch
import torch.nn.functional as F

from surgellm_kernels import fused_iwn
from surgellm_kernels.ops.reference import iwn_reference

from harness import (
    PROXY,
    Implementation,
    case_id,
    cases,
    forward_backward,
    kernel_implementation,
    median_ratio,
    run_case,
    runnable,
    sized,
)

OP = "InstanceWeightedNorm2d"
NUM_CLASSES = 10
SHAPES = sized(
    quick=[(8, 16, 14, 14)],
    default=[(64, 256, 28, 28), (256, 64, 56, 56)],
    full=[(64, 256, 28, 28), (256, 64, 56, 56)],
)
CASES = cases(OP, SHAPES, modes=("eval", "train_fwd_bwd"))
LAST = "channels_last"


def _call(fn, case, channels_last=False):
    """fn(x, labels, weight, bias, running_mean, running_std, training) in the
    case's mode, on x in the memory format asked for."""
    # on the case's device: large inputs are not drawn on the host and copied
    g = torch.Generator(case.device).manual_seed(0)
    x = torch.randn(case.shape, generator=g, device=case.device).to(case.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = case.shape[1]
    labels = torch.randint(0, NUM_CLASSES, (case.shape[0],), generator=g, device=case.device)
    weight = torch.ones(C, dtype=case.dtype, device=case.device)
    bias = torch.zeros(C, dtype=case.dtype, device=case.device)
    stats = [torch.zeros(C, dtype=case.dtype, device=case.device), torch.ones_like(weight)]
    if case.mode == "eval":
        return lambda: fn(x, None, weight, bias, *stats, False)
    leaf = x.detach().requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    return forward_backward(
        lambda: fn(leaf, labels, weight, bias, *stats, True),
        torch.randn_like(leaf),
        (leaf, weight, bias),
    )


def _iwn(fn):
    def call(x, labels, weight, bias, running_mean, running_std, training):
        return fn(
            x,
            labels,
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_std=running_std,
            training=training,
            num_classes=NUM_CLASSES,
            feature_dim=1,
        )

    return call


def _batch_norm(x, labels, weight, bias, running_mean, running_var, training):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training=training)


def _fused(backend, channels_last):
    name = f"fused[{backend}]{' ' + LAST if channels_last else ''}"
    return kernel_implementation(
        name, "iwn", backend, lambda case: _call(_iwn(fused_iwn), case, channels_last)
    )


def _proxy(case):
    a, b, c = (torch.randn(case.shape, device=case.device).to(case.dtype) for _ in range(3))
    out = torch.empty_like(a)
    return (lambda: torch.addcmul(a, b, c, out=out)), None


IMPLEMENTATIONS = runnable(
    [
        *(_fused(backend, last) for backend in ("cpu", "cuda", "triton") for last in (0, 1)),
        Implementation("F.batch_norm", lambda case: (_call(_batch_norm, case), None)),
        Implementation(f"F.batch_norm {LAST}", lambda case: (_call(_batch_norm, case, True), None)),
        Implementation("eager", lambda case: (_call(_iwn(iwn_reference), case), None)),
        Implementation(PROXY, _proxy),
    ],
    "iwn",
)


@pytest.fixture(scope="module", autouse=True)
def against_batch_norm(bench_report):
    """After this module's cases: the ratios the drop-in is judged by,
    F.batch_norm time / fused time on the same tensor and layout (>= 1: no
    slower than BatchNorm), and the fused speed-up over the eager reference,
    each the median of the rounds' ratios where the case's implementations
    took turns."""
    yield
    bench_report.finish_turns()  # the module's last case
    times = {
        (r.mode, r.shape, r.dtype, r.device, r.impl): r.turns_ms
        for r in bench_report.rows
        if r.op == OP and r.turns_ms
    }
    title = (
        f"{OP}: F.batch_norm time / fused time, same tensor and layout (>1: fused "
        "faster; medians of the rounds' ratios)"
    )
    for (mode, shape, dtype, device, impl), ms in sorted(times.items()):
        if not impl.startswith("fused"):
            continue
        layout = LAST if impl.endswith(LAST) else "contiguous"
        case = (mode, shape, dtype, device)
        bn = times.get(case + ("F.batch_norm" + (f" {LAST}" if layout == LAST else ""),))
        eager = times.get(case + ("eager",))
        if bn is None:
            continue
        line = (
            f"  {shape:>13} {dtype.split('.')[-1]:>9} {device:>4} {mode:<14} {layout:<13} "
            f"{median_ratio(bn, ms):5.2f}x"
        )
        if eager is not None:
            line += f"   (vs eager {median_ratio(eager, ms):5.1f}x)"
        bench_report.add_section_line(title, line)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_iwn_batchnorm(benchmark, bench_report, case, impl):
    run_case(benchmark, bench_report, case, impl)
