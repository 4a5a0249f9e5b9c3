"""Reliability: failed calls change nothing, non-finite inputs, threads,
fork, checkpoints."""

import io
import threading

import pytest
import torch

from surgellm_kernels import (
    FusedInstanceWeightedNorm,
    FusedSurgicalGate,
    InstanceWeightedNorm,
    SurgicalGate,
    SyncInstanceWeightedNorm,
    fused_iwn,
    fused_surgical_gate,
    lexical_features,
)

from _helpers import assert_close, device_backends

CPU_PAIRS = [(b, d) for b, d in device_backends() if d == "cpu"]


def _snapshot(module):
    """Every piece of a module's state, cloned: parameters, buffers, fit state, flags."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fit = getattr(module, "_fit_state", None)
    return (
        state,
        None if fit is None else [t.clone() for t in fit],
        getattr(module, "_frozen", None),
    )


def _assert_unchanged(module, before):
    state, fit, frozen = _snapshot(module)
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]), f"{k} changed"
    assert (fit is None) == (before[1] is None), "fit state changed"
    if fit is not None:
        assert all(torch.equal(a, b) for a, b in zip(fit, before[1])), "fit state changed"
    assert frozen == before[2], "frozen flag changed"


def _norm(cls=FusedInstanceWeightedNorm):
    torch.manual_seed(0)
    norm = cls(6, 3, num_tasks=2, affine=True, gate=True).train()
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
        norm.running_mean.normal_()
    norm.partial_fit(torch.randn(10, 6), torch.randint(0, 3, (10,)), torch.randint(0, 2, (10,)))
    return norm


X, LABELS, TASKS = (
    torch.randn(8, 6),
    torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
    torch.zeros(8, dtype=torch.long),
)
FAILING_CALLS = {  # (what, call(norm)) -- every one raises
    "labels out of range": lambda m: m(X, LABELS + 1, TASKS),
    "negative label": lambda m: m(X, LABELS - 1, TASKS),
    "task id out of range": lambda m: m(X, LABELS, TASKS + 2),
    "labels of the wrong shape": lambda m: m(X, LABELS[:5], TASKS),
    "x of the wrong width": lambda m: m(X[:, :5], LABELS, TASKS),
    "integer x": lambda m: m(X.long(), LABELS, TASKS),
    "no task ids for 2 tasks": lambda m: m(X, LABELS),
    "fit: labels out of range": lambda m: m.fit(X, LABELS + 1, TASKS),
    "fit: no labels": lambda m: m.fit(X, None, TASKS),
    "fit: x of no rows": lambda m: m.fit(X[:0], LABELS[:0], TASKS[:0]),
    "partial_fit: task id out of range": lambda m: m.partial_fit(X, LABELS, TASKS - 1),
    "partial_fit: x of the wrong width": lambda m: m.partial_fit(X[:, :4], LABELS, TASKS),
    "fit_batches: a bad second batch": lambda m: m.fit_batches(
        [(X, LABELS, TASKS), (X, LABELS[:5], TASKS)]
    ),
    "fit_batches: no batches": lambda m: m.fit_batches([]),
}


@pytest.mark.parametrize("backend,device", CPU_PAIRS)
@pytest.mark.parametrize("case", FAILING_CALLS)
@pytest.mark.parametrize("cls", [InstanceWeightedNorm, FusedInstanceWeightedNorm])
def test_failed_calls_change_nothing(backend, device, case, cls, force_backend):
    """Parameters, running statistics, the frozen flag and the fit state are
    bitwise as they were after any failed call."""
    force_backend(backend)
    norm = _norm(cls)
    before = _snapshot(norm)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        FAILING_CALLS[case](norm)
    _assert_unchanged(norm, before)


def test_a_forced_backend_that_cannot_run_changes_nothing(force_backend):
    norm = _norm()
    before = _snapshot(norm)
    force_backend("cuda")  # this machine may have no GPU; on a GPU one, CPU tensors
    with pytest.raises(RuntimeError, match="SURGELLM_BACKEND=cuda cannot run iwn on cpu"):
        norm(X, LABELS, TASKS)
    _assert_unchanged(norm, before)
    gate = FusedSurgicalGate(6, num_features=4)
    before = _snapshot(gate)
    with pytest.raises(RuntimeError, match="SURGELLM_BACKEND=cuda cannot run surgical_gate"):
        gate(torch.randn(3, 6), torch.randn(3, 4))
    _assert_unchanged(gate, before)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
@pytest.mark.parametrize("rows", [12, 48])
def test_non_finite_input_poisons_its_feature_only(backend, device, std_mode, rows, force_backend):
    """As BatchNorm1d: a NaN or inf in x makes its feature's outputs and
    running statistics non-finite (they are updated with it, not silently
    kept or zeroed); every other feature is exactly what it would be
    without that feature. (With more than 8 rows of a class, the CPU
    kernels' one pass over a class gave way to two passes for every
    feature of the class: the others moved by an ulp.)"""
    force_backend(backend)
    torch.manual_seed(0)
    x = torch.randn(rows, 5, dtype=torch.float64, device=device)
    labels = (torch.arange(rows) % 3).to(device)
    bad = x.clone()
    bad[3, 1], bad[5, 2] = float("nan"), float("inf")
    results = []
    for inputs in (x, bad):
        rm = torch.zeros(5, dtype=torch.float64, device=device)
        rs = torch.ones(5, dtype=torch.float64, device=device)
        y = fused_iwn(
            inputs,
            labels,
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=3,
            std_mode=std_mode,
        )
        results.append((y, rm, rs))
    (y, rm, rs), (y_bad, rm_bad, rs_bad) = results
    for f in (1, 2):
        assert not torch.isfinite(y_bad[:, f]).any()
        assert not torch.isfinite(rm_bad[f]) and not torch.isfinite(rs_bad[f])
    for f in (0, 3, 4):
        assert torch.equal(y_bad[:, f], y[:, f])
        assert torch.equal(rm_bad[f], rm[f]) and torch.equal(rs_bad[f], rs[f])
    # In eval the statistics are given: only the rows with the bad values.
    y_eval = fused_iwn(bad, running_mean=rm, running_std=rs)
    assert torch.isfinite(y_eval).sum() == y_eval.numel() - 2


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_row_of_the_gate_stays_in_its_row(backend, device, dtype, force_backend):
    """As F.layer_norm: a NaN in h, s or the logits makes its row non-finite
    only (in a row's full vectors and its tail); infinite logits select h or s."""
    force_backend(backend)
    g = torch.Generator().manual_seed(0)
    h, s, logits = (torch.randn(6, 37, generator=g).to(dtype).to(device) for _ in range(3))
    clean = fused_surgical_gate(h, s, logits)
    h[1, 2], s[2, 0] = float("nan"), float("inf")
    logits[3, 20] = logits[0, 36] = float("nan")  # a full vector's lane, a tail's
    logits[4], logits[5] = float("inf"), -float("inf")
    z = fused_surgical_gate(h, s, logits)
    assert not torch.isfinite(z[:4]).all(dim=1).any()
    for row, chosen in ((4, h), (5, s)):
        want = torch.nn.functional.layer_norm(chosen[row].double(), (37,))
        assert_close(z[row], want, dtype=dtype, name=f"row {row}")
    assert torch.equal(z[4:], fused_surgical_gate(h[4:], s[4:], logits[4:]))
    assert torch.isfinite(clean).all()


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_whose_variance_overflows_is_nan_not_the_bias(backend, device, dtype, force_backend):
    """Finite values whose squares pass float32's range: the row is NaN, a
    visible failure. A NaN variance was read as 0 (finite numbers far from
    the truth), an infinite one gave rstd = 0 (the row silently the bias).
    F.layer_norm gives NaN or zeros here depending on the row's length (37:
    zeros; 4, 64, 768 at 1e30: NaN). The other rows keep their values."""
    force_backend(backend)
    g = torch.Generator().manual_seed(0)
    h, s = (torch.randn(5, 37, generator=g) for _ in range(2))
    logits = torch.full((5, 37), 20.0)  # g = 1: the blend is h
    h[1] *= 1e20  # squares overflow: an infinite variance
    h[2] *= 1e30  # the sums overflow too: inf - inf
    h[3] *= 1e18  # squares within range: finite output
    h, s, logits = (t.to(dtype).to(device) for t in (h, s, logits))
    z = fused_surgical_gate(h, s, logits)
    assert torch.isnan(z[1:3]).all()
    want = torch.nn.functional.layer_norm(h[[0, 3, 4]].double(), (37,))
    assert_close(z[[0, 3, 4]], want, dtype=dtype)


# Not the interpreted Triton kernels: Triton's interpreter keeps its grid in
# a global and is not thread-safe (compiled Triton runs this on a GPU).
@pytest.mark.parametrize(
    "backend,device", [p for p in device_backends() if p[0] != "eager" and p != ("triton", "cpu")]
)
def test_threads_give_the_serial_bits(backend, device, force_backend):
    """Four Python threads calling both ops at once on their own tensors get
    bitwise what one thread gets calling them in turn."""
    force_backend(backend)
    inputs = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2048, 33, generator=g).to(device)
        labels = torch.randint(0, 3, (2048,), generator=g).to(device)
        h, s, logits = (torch.randn(512, 40, generator=g).to(device) for _ in range(3))
        inputs.append((x, labels, h, s, logits))

    def work(x, labels, h, s, logits):
        xr = x.clone().requires_grad_()
        rm, rs = torch.zeros(33, device=device), torch.ones(33, device=device)
        y = fused_iwn(xr, labels, running_mean=rm, running_std=rs, training=True, num_classes=3)
        (dx,) = torch.autograd.grad(y.square().sum(), xr)
        hr = h.clone().requires_grad_()
        z = fused_surgical_gate(hr, s, logits)
        (dh,) = torch.autograd.grad(z.square().sum(), hr)
        return [y.detach(), dx, rm, rs, z.detach(), dh]

    serial = [work(*args) for args in inputs]
    threaded = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def run(i):
        start.wait()  # all four call at once
        for _ in range(3):
            threaded[i].append(work(*inputs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    for expected, runs in zip(serial, threaded):
        assert len(runs) == 3
        for got in runs:
            assert all(torch.equal(p, q) for p, q in zip(expected, got))


class _FeatureTexts(torch.utils.data.Dataset):
    texts = [
        "A captivating film!",
        "Moreover, results show a 3% gain.",
        "I think, maybe?",
        "Firstly, the data show (1) a rise.",
    ]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        s = lexical_features([self.texts[i % 4]])[0]
        y = fused_iwn(s.unsqueeze(0), running_mean=torch.zeros(16), running_std=torch.ones(16))
        return s, y[0]


def test_the_ops_work_in_forked_dataloader_workers():
    """Worker processes forked after the parent ran the ops on its thread
    pool (OpenMP, more than one thread) compute the same features and
    normalized rows."""
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:  # big enough to run parallel_for across threads, training and backward
        x = torch.randn(8192, 256, requires_grad=True)
        fused_iwn(x, torch.randint(0, 4, (8192,)), training=True, num_classes=4).sum().backward()
        fused_surgical_gate(*(torch.randn(8192, 256) for _ in range(3)))
    finally:
        torch.set_num_threads(threads)
    data = _FeatureTexts()
    expected = [data[i] for i in range(len(data))]
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, num_workers=2, multiprocessing_context="fork", timeout=120
    )
    got = [row for s, y in loader for row in zip(s, y)]
    assert len(got) == len(expected)
    for (s, y), (s_ref, y_ref) in zip(got, expected):
        assert torch.equal(s, s_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize(
    "make",
    [
        lambda: InstanceWeightedNorm(6, 3, num_tasks=2, affine=True, gate=True),
        lambda: FusedInstanceWeightedNorm(6, 3, std_mode="pooled"),
        lambda: SyncInstanceWeightedNorm(6, 3, affine=True),
        lambda: SurgicalGate(8, num_features=4, num_tasks=2),
        lambda: FusedSurgicalGate(8, num_features=4),
    ],
    ids=["iwn", "fused_iwn", "sync_iwn", "surgical_gate", "fused_surgical_gate"],
)
def test_state_dicts_load_with_weights_only(make):
    """Every module's state_dict is plain tensors: torch.load(weights_only=True)
    reads it, and a fresh module loads it to the same state."""
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.normal_()
    if isinstance(module, InstanceWeightedNorm):
        module.fit(
            torch.randn(20, 6),
            torch.randint(0, 3, (20,)),
            torch.randint(0, module.num_tasks, (20,)) if module.num_tasks > 1 else None,
        )
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = make()
    fresh.load_state_dict(loaded)
    for k, v in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    if isinstance(module, InstanceWeightedNorm):
        assert fresh._frozen  # the Python mirror of the loaded flag


@pytest.mark.parametrize("backend,device", device_backends())
def test_activation_checkpointing_recomputes_the_fused_ops(backend, device, force_backend):
    """torch.utils.checkpoint (non-reentrant, transformers' default for
    gradient checkpointing) recomputes a region's forward when backward
    unpacks what it saved: the fused ops' backward unpacked below autograd,
    so the recomputed op recorded nothing ("a different number of tensors
    was saved"). Gradients now equal the uncheckpointed ones."""
    from torch.utils.checkpoint import checkpoint

    force_backend(backend)
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.float64, device=device)
    x = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
    labels = (torch.arange(9) % 3).to(device)
    regions = (
        lambda x: fused_surgical_gate(x @ w, x, x.flip(0)),
        lambda x: fused_iwn(x @ w, labels, training=True, num_classes=3),
    )
    for region in regions:
        expected = torch.autograd.grad(region(x).sin().sum(), x)[0]
        got = torch.autograd.grad(checkpoint(region, x, use_reentrant=False).sin().sum(), x)[0]
        assert_close(got, expected)


@pytest.mark.parametrize(
    "backend,device", device_backends() + [("eager", "cpu")], ids=lambda v: str(v)
)
@pytest.mark.parametrize("tasks", [1, 2])
def test_an_empty_training_batch_changes_nothing(backend, device, tasks, force_backend):
    """As F.batch_norm takes one, a training batch of no rows gives an empty
    output and zero gradients for gate, weight and bias, and leaves the
    running statistics as they were (it raised "x is empty"; the eager
    reference moved them toward 0). num_classes may be left out."""
    force_backend(backend)
    x = torch.zeros(0, 4, device=device, requires_grad=True)
    params = [torch.randn(4, device=device, requires_grad=True) for _ in range(3)]
    shape = (tasks, 4) if tasks > 1 else (4,)
    rm, rs = torch.full(shape, 0.5, device=device), torch.full(shape, 2.0, device=device)
    task_ids = torch.zeros(0, dtype=torch.long, device=device) if tasks > 1 else None
    y = fused_iwn(
        x,
        torch.zeros(0, dtype=torch.long, device=device),
        gate=params[0],
        weight=params[1],
        bias=params[2],
        running_mean=rm,
        running_std=rs,
        task_ids=task_ids,
        training=True,
        momentum=0.3,
    )
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 4)
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert torch.equal(rm, torch.full(shape, 0.5, device=device))
    assert torch.equal(rs, torch.full(shape, 2.0, device=device))
