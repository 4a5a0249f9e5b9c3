"""Property-based tests: drawn calls of both ops against the reference.

Hypothesis draws shapes (1 to 3 leading dimensions, widths 1 to 1100, primes
and powers of two among them), dtypes, classes and tasks (absent classes,
singletons, heavy imbalance), gate forms, affine on/off, std_mode, eps,
momentum and value scales from 1e-3 to 1e4 (plus constant columns), and
compares the output, every gradient and the running statistics with the
reference: directly in float64, and by the suite's accuracy rule
(``assert_as_accurate_as_reference``) against the float64 truth otherwise.

Profiles (tests/conftest.py): "ci", derandomized, is the default;
``HYPOTHESIS_PROFILE=long`` draws ten times as many examples. Falsifying
examples found are kept as explicit tests (test_fused_iwn.py:
``test_constant_feature_gives_the_bias_exactly``,
``test_large_constant_feature_over_many_chunks``).
"""

import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgellm_kernels import backends, fused_iwn, fused_surgical_gate
from surgellm_kernels.ops.reference import iwn_reference, surgical_gate_reference

from _helpers import assert_as_accurate_as_reference, assert_close, device_backends

SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1
# Examples per (op, backend): the CPU kernels take the bulk; the Triton
# interpreter is slow and gets a share.
EXAMPLES = {"cpu": 1000, "triton": 200}
# The interpreted Triton kernels' property runs are slow: marked so.
BACKENDS = [
    pytest.param(b, marks=[pytest.mark.slow] if b == "triton" else [])
    for b, device in device_backends()
    if device == "cpu" and b in EXAMPLES
]

WIDTHS = st.one_of(
    st.integers(1, 1100),
    st.sampled_from([1, 2, 3, 5, 7, 13, 31, 64, 127, 128, 257, 509, 512, 1021, 1024, 1100]),
)
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])
SCALES = st.sampled_from([1e-3, 1e-1, 1.0, 1e2, 1e4])


def _leading(draw, max_rows):
    """1 to 3 leading dimensions with at most max_rows rows in all."""
    dims = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    while len(dims) > 1 and torch.Size(dims).numel() > max_rows:
        dims.pop()
    return tuple(dims)


def _values(g, shape, scale):
    """scale * (k + N(0, 1) clipped to 3): float16 keeps its range at 1e4."""
    loc = float(torch.randint(-1, 2, (1,), generator=g)) * scale
    return loc + scale * torch.randn(shape, generator=g, dtype=torch.float64).clamp(-3, 3)


@st.composite
def iwn_calls(draw):
    F = draw(WIDTHS)
    lead = _leading(draw, max(1, 6000 // F))
    N = torch.Size(lead).numel()
    dtype, scale = draw(DTYPES), draw(SCALES)
    T, C = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    training = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = _values(g, (*lead, F), scale)
    if draw(st.booleans()):
        # Constant columns, non-dyadic at the value scale (their sums round, in
        # every chunk). float64 stays within +-3: there the reference is the
        # truth, and at 1e4 / eps its own gate gradient of a constant column
        # is a cancellation of terms ~1e9, off by ~1e-8 (the kernels' closed
        # form is exact); lower precisions are checked against it at scale.
        at = scale if dtype != torch.float64 else min(scale, 1.0)
        columns = torch.randint(0, F, (max(1, F // 8),), generator=g)
        x[..., columns] = at * (6 * float(torch.rand((), generator=g, dtype=torch.float64)) - 3)
    labelling = draw(st.sampled_from(["uniform", "heavy", "singletons"]))
    labels = torch.randint(0, C, lead, generator=g)
    if labelling == "heavy":  # ~90% of the rows in class 0
        labels = torch.where(torch.rand(lead, generator=g) < 0.9, 0, labels)
    elif labelling == "singletons":
        labels = torch.arange(N).remainder(C).view(lead)
    task_ids = torch.randint(0, T, lead, generator=g) if T > 1 else None
    gate = {
        "none": None,
        "vec": torch.randn(F, generator=g, dtype=torch.float64),
        "full": 2 * torch.randn(*lead, F, generator=g, dtype=torch.float64),
    }[draw(st.sampled_from(["none", "vec", "full"]))]
    affine = draw(st.booleans())
    weight = torch.randn(F, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(F, generator=g, dtype=torch.float64) if affine else None
    stats_shape = (T, F) if T > 1 else (F,)
    running_mean = torch.randn(stats_shape, generator=g, dtype=torch.float64) * scale
    running_std = (torch.rand(stats_shape, generator=g, dtype=torch.float64) + 0.5) * scale
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(
        tensors=dict(x=cast(x), gate=cast(gate), weight=cast(weight), bias=cast(bias)),
        stats=dict(running_mean=cast(running_mean), running_std=cast(running_std)),
        labels=labels,
        task_ids=task_ids,
        training=training,
        num_classes=C,
        std_mode=draw(st.sampled_from(["class_mean", "pooled"])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        dy=torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype),
    )


def _iwn_outputs(fn, call, cast=None):
    """Output, gradients of every tensor input present, running statistics."""
    to = (lambda t: t) if cast is None else (lambda t: t.to(cast))  # noqa: E731
    leaves = {
        k: to(v).detach().clone().requires_grad_(True)
        for k, v in call["tensors"].items()
        if v is not None
    }
    stats = {k: to(v).clone() for k, v in call["stats"].items()}
    kwargs = {
        k: call[k]
        for k in ("labels", "task_ids", "training", "num_classes", "std_mode", "eps", "momentum")
    }
    y = fn(**{**dict.fromkeys(call["tensors"]), **leaves}, **stats, **kwargs)
    grads = torch.autograd.grad(y, list(leaves.values()), to(call["dy"]))
    return [y.detach(), *grads, *stats.values()]


def _run_examples(strategy, body, examples):
    """body(value) on ``examples`` values drawn from strategy; fails unless
    every one ran (hypothesis may stop early when it finds nothing new)."""
    ran = []

    @settings(max_examples=examples)
    @given(value=strategy)
    def check(value):
        body(value)
        ran.append(1)

    check()
    assert len(ran) >= examples, f"only {len(ran)} examples ran"


def _op_against_reference(backend, force_backend, strategy, outputs, fused_fn, ref_fn, first):
    """The fused op against the reference on every drawn call: outputs(fn,
    call, cast) gives output, gradients (and statistics); ``first`` names the
    tensor whose dtype the call has."""

    def body(call):
        force_backend(backend)
        fused, ref = outputs(fused_fn, call), outputs(ref_fn, call)
        dtype = call["tensors"][first].dtype
        truth = None if dtype == torch.float64 else outputs(ref_fn, call, torch.float64)
        _check(fused, ref, truth, dtype)

    _run_examples(strategy, body, EXAMPLES[backend] * SCALE)


def _check(fused, ref, truth, dtype):
    for a, r in zip(fused, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert torch.isfinite(a).all() == torch.isfinite(r).all()
    if dtype == torch.float64:
        for a, r in zip(fused, ref):
            assert_close(a, r)
    else:
        assert_as_accurate_as_reference(fused, ref, truth, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_iwn_matches_reference(backend, force_backend):
    _op_against_reference(
        backend, force_backend, iwn_calls(), _iwn_outputs, fused_iwn, iwn_reference, "x"
    )


@st.composite
def surgical_gate_calls(draw):
    d = draw(WIDTHS)
    lead = _leading(draw, max(1, 6000 // d))
    dtype, scale = draw(DTYPES), draw(SCALES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    h, s = _values(g, (*lead, d), scale), _values(g, (*lead, d), scale)
    if draw(st.booleans()):  # constant rows: z = bias there
        rows = torch.randint(0, h[..., 0].numel(), (1,), generator=g)
        h.view(-1, d)[rows] = 3.0
        s.view(-1, d)[rows] = 3.0
    logits = torch.randn(*lead, d, generator=g, dtype=torch.float64) * draw(
        st.sampled_from([1.0, 10.0, 100.0])
    )  # 100: saturated gates
    affine = draw(st.booleans())
    weight = torch.randn(d, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(d, generator=g, dtype=torch.float64) if affine else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(
        tensors=dict(
            h=cast(h), s=cast(s), gate_logits=cast(logits), weight=cast(weight), bias=cast(bias)
        ),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        dz=torch.randn(h.shape, generator=g, dtype=torch.float64).to(dtype),
    )


def _gate_outputs(fn, call, cast=None):
    to = (lambda t: t) if cast is None else (lambda t: t.to(cast))  # noqa: E731
    leaves = {
        k: to(v).detach().clone().requires_grad_(True)
        for k, v in call["tensors"].items()
        if v is not None
    }
    z = fn(**{**dict.fromkeys(call["tensors"]), **leaves}, eps=call["eps"])
    return [z.detach(), *torch.autograd.grad(z, list(leaves.values()), to(call["dz"]))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_surgical_gate_matches_reference(backend, force_backend):
    _op_against_reference(
        backend,
        force_backend,
        surgical_gate_calls(),
        _gate_outputs,
        fused_surgical_gate,
        surgical_gate_reference,
        "h",
    )


MODULE_EXAMPLES = 150  # per module, CPU kernels (the ops above carry the bulk)


@st.composite
def module_setups(draw):
    F = draw(st.sampled_from([1, 3, 16, 31, 64, 257]))
    lead = _leading(draw, max(1, 3000 // F))
    T, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        F=F,
        lead=lead,
        T=T,
        C=C,
        seed=seed,
        affine=draw(st.booleans()),
        gate=draw(st.booleans()),
        std_mode=draw(st.sampled_from(["class_mean", "pooled"])),
        momentum=draw(st.sampled_from([0.1, 0.5])),
        steps=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
    )


@pytest.mark.skipif(not backends()["cpu"].available, reason="the C++ extension is not built")
def test_fused_iwn_module_trains_like_the_reference_module(force_backend):
    """FusedInstanceWeightedNorm loaded with InstanceWeightedNorm's state:
    the same outputs, input and parameter gradients and running statistics
    over a few training steps, then in eval with what training left (float32
    by the accuracy rule against a float64 copy of the reference)."""
    from surgellm_kernels import FusedInstanceWeightedNorm, InstanceWeightedNorm

    def check(setup):
        force_backend("cpu")
        F, lead, T, C, dtype = (setup[k] for k in ("F", "lead", "T", "C", "dtype"))
        g = torch.Generator().manual_seed(setup["seed"])
        options = dict(
            num_tasks=T,
            affine=setup["affine"],
            gate=setup["gate"],
            std_mode=setup["std_mode"],
            momentum=setup["momentum"],
        )
        ref = InstanceWeightedNorm(F, C, **options).to(dtype)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        fused = FusedInstanceWeightedNorm(F, C, **options).to(dtype)
        fused.load_state_dict(ref.state_dict())
        truth = copy.deepcopy(ref).double()  # the float64 truth of a float32 run
        modules = (fused, ref) if dtype == torch.float64 else (fused, ref, truth)
        for step in range(setup["steps"] + 1):
            x = torch.randn(*lead, F, generator=g, dtype=torch.float64).to(dtype)
            labels = torch.randint(0, C, lead, generator=g)
            tasks = torch.randint(0, T, lead, generator=g) if T > 1 else None
            dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
            evaluating = step == setup["steps"]  # the last: eval with what training left
            outs = []
            for module in modules:
                to = (lambda t: t.double()) if module is truth else (lambda t: t)  # noqa: E731
                module.train(not evaluating).zero_grad()
                xr = to(x).clone().requires_grad_()
                y = module(xr, None if evaluating else labels, tasks)
                y.backward(to(dy))
                outs.append(
                    [
                        y.detach(),
                        xr.grad,
                        *[p.grad for p in module.parameters()],
                        module.running_mean.clone(),
                        module.running_std.clone(),
                    ]
                )
            fused_out, ref_out, *truth_out = outs
            _check(fused_out, ref_out, truth_out[0] if truth_out else None, dtype)

    _run_examples(module_setups(), check, MODULE_EXAMPLES * SCALE)


@pytest.mark.skipif(not backends()["cpu"].available, reason="the C++ extension is not built")
def test_fused_surgical_gate_module_matches_the_reference_module(force_backend):
    """FusedSurgicalGate with SurgicalGate's state: the same z and gradients
    of the inputs and of every parameter."""
    from surgellm_kernels import FusedSurgicalGate, SurgicalGate

    setups = st.fixed_dictionaries(
        dict(
            d=st.sampled_from([1, 8, 31, 64, 384]),
            features=st.integers(1, 20),
            tasks=st.integers(1, 3),
            rows=st.integers(1, 40),
            seed=st.integers(0, 2**31 - 1),
            dtype=st.sampled_from([torch.float64, torch.float32]),
        )
    )

    def check(setup):
        d, features, tasks, rows, seed, dtype = (
            setup[k] for k in ("d", "features", "tasks", "rows", "seed", "dtype")
        )
        force_backend("cpu")
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        ref = SurgicalGate(d, num_features=features, num_tasks=tasks).to(dtype)
        fused = FusedSurgicalGate(d, num_features=features, num_tasks=tasks).to(dtype)
        fused.load_state_dict(ref.state_dict())
        h = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)
        s = torch.randn(rows, features, generator=g, dtype=torch.float64).to(dtype)
        task_ids = torch.randint(0, tasks, (rows,), generator=g)
        dz = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype)
        outs = []
        for module in (ref, fused):
            hr, sr = h.clone().requires_grad_(), s.clone().requires_grad_()
            z = module(hr, sr, task_ids)
            grads = torch.autograd.grad(z, [hr, sr, *module.parameters()], dz)
            outs.append([z.detach(), *grads])
        for a, r in zip(outs[1], outs[0]):
            assert_close(a, r, dtype, scale=10.0)

    _run_examples(setups, check, MODULE_EXAMPLES * SCALE)
