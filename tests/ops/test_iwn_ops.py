"""The dispatcher ops behind fused_iwn: one crossing into C++ per call, the
phase ops called directly, and the defects a review of the GPU paths found
(each test fails on the code before its fix where this machine can show it;
the CUDA-only ones run on a GPU machine)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from surgellm_kernels import backends, fused_iwn
from surgellm_kernels.ops._backend import select_backend
from surgellm_kernels.ops.reference import iwn_reference

from _helpers import TOLERANCES, TorchCalls, device_backends

KERNEL_PAIRS = [(b, d) for b, d in device_backends() if b != "eager"]
needs_extension = pytest.mark.skipif(
    not backends()["cpu"].available, reason="the C++ extension is not built"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_extension
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("tasks", [False, True])
def test_one_call_is_one_op(training, tasks, force_backend):
    """fused_iwn crosses into C++ once: a TorchFunctionMode sees the one
    dispatcher op (and nothing of the checks, which are in it); backward is
    the op's C++ autograd node."""
    force_backend("cpu")
    x = torch.randn(8, 4, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    kwargs = dict(
        gate=torch.zeros(4, requires_grad=True),
        weight=torch.ones(4),
        bias=torch.zeros(4),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
        task_ids=torch.randint(0, 2, (8,)),
    )
    if not tasks:
        kwargs.update(running_mean=torch.zeros(4), running_std=torch.ones(4), task_ids=None)
    with TorchCalls() as recorded:
        y = fused_iwn(x, labels, training=training, num_classes=3, **kwargs)
    assert recorded.calls == ["iwn.default"]
    with TorchCalls() as recorded:
        y.sum().backward()  # the autograd engine runs the C++ backward node
    assert recorded.calls == ["sum", "backward"]


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("wanted", ["weight", "bias", "gate", "x"])
@pytest.mark.parametrize("training", [True, False])
def test_backward_computes_only_the_gradients_asked_for(
    backend, device, wanted, training, force_backend
):
    """With x and the gate frozen, the pass over x that gives dx and dgate is
    skipped (it ran for a weight or bias gradient alone); the gradients asked
    for are the reference's -- in eval too, where no labels are given (the
    gate is then autograd's second input, not its third)."""
    from torch.profiler import ProfilerActivity, profile

    force_backend(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, 4, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 3, (30, 5), generator=g).to(device)
    inputs = {"x": x}
    inputs.update(
        (name, torch.randn(4, generator=g, dtype=torch.float64).to(device))
        for name in ("gate", "weight", "bias")
    )
    inputs[wanted] = inputs[wanted].clone().requires_grad_(True)
    dy = torch.randn(30, 5, 4, generator=g, dtype=torch.float64).to(device)
    kwargs = dict(training=True, labels=labels, num_classes=3)
    if not training:
        running_std = torch.rand(4, generator=g, dtype=torch.float64).add(0.5).to(device)
        kwargs = dict(training=False, running_mean=torch.randn(4).to(x), running_std=running_std)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = fused_iwn(**kwargs, **inputs)
        (grad,) = torch.autograd.grad(y, inputs[wanted], dy)
    ran = {e.name for e in prof.events()}
    assert "surgellm::_iwn_task_sums" in ran
    assert ("surgellm::_iwn_input_grad" in ran) == (wanted in ("x", "gate")), sorted(ran)
    y_ref = iwn_reference(**kwargs, **inputs)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, torch.autograd.grad(y_ref, inputs[wanted], dy)[0])


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_strided_gate_weight_bias(backend, device, force_backend):
    """A [::2] (F,) gate, weight and bias are valid inputs on every backend."""
    force_backend(backend)
    F = 6
    x = torch.randn(20, F, dtype=torch.float64, device=device)
    labels = torch.randint(0, 3, (20,), device=device)
    params = {
        k: torch.randn(2 * F, dtype=torch.float64, device=device)[::2].requires_grad_(True)
        for k in ("gate", "weight", "bias")
    }
    assert not params["gate"].is_contiguous()
    for training in (True, False):
        kwargs = dict(
            training=training,
            num_classes=3,
            running_mean=torch.zeros(F, device=device, dtype=torch.float64),
            running_std=torch.ones(F, device=device, dtype=torch.float64),
        )
        y = fused_iwn(x, labels, **params, **kwargs)
        grads = torch.autograd.grad(y.square().sum(), list(params.values()))
        contiguous = {k: v.detach().contiguous().requires_grad_(True) for k, v in params.items()}
        y_ref = iwn_reference(x, labels, **contiguous, **kwargs)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), list(contiguous.values()))
        torch.testing.assert_close(y, y_ref)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_outlier_first_row_float32_moments(backend, device, force_backend):
    """The first row of a class far from the rest: float32 statistics stay as
    accurate as a two-pass computation (a shift by that row lost ~300x)."""
    force_backend(backend)
    g = torch.Generator().manual_seed(0)
    N, F = 512, 8
    x = torch.randn(N, F, generator=g, dtype=torch.float64) * 0.01 + 1.0
    x[0] = 1000.0  # the first row of class 0 is an outlier
    labels = torch.zeros(N, dtype=torch.long)
    labels[1::2] = 1
    fused = (
        fused_iwn(x.float().to(device), labels.to(device), training=True, num_classes=2)
        .double()
        .cpu()
    )
    # the same float32 input, reduced exactly (in float64): the error budget
    # of a stable float32 reduction of it
    exact = iwn_reference(x.float().double(), labels, training=True, num_classes=2)
    ref32 = iwn_reference(x.float(), labels, training=True, num_classes=2).double()
    err = (fused - exact).abs().max()
    ref_err = (ref32 - exact).abs().max()
    assert err <= 4 * ref_err + 1e-6 * exact.abs().max(), (err, ref_err)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
def test_float32_gradient_where_class_rows_nearly_coincide(
    backend, device, std_mode, force_backend
):
    """Two rows of a class 1e-3 apart at an offset of ~1: s_c is tiny, and the
    float32 rounding of the class mean is first-order in u - mean. The input
    gradient must stay as accurate as autograd through the eager reference
    (it was ~1e-4 relative before the mean residual, against ~1e-7)."""
    force_backend(backend)
    g = torch.Generator().manual_seed(61)
    x = (torch.randn(33, 16, generator=g, dtype=torch.float64) * 2 + 0.5).float()
    labels = torch.arange(33) % 10
    labels[labels == 3] = 4
    x[labels == 0, 7] = torch.tensor([1.142265796661377, 1.1413174867630005, 1.1417, 1.1419])
    dy = torch.randn(33, 16, generator=g, dtype=torch.float64).float()
    kwargs = dict(training=True, num_classes=10, std_mode=std_mode)

    def dx(fn, xx, dev):
        leaf = xx.to(dev).requires_grad_(True)
        y = fn(leaf, labels.to(dev), **kwargs)
        return torch.autograd.grad(y, leaf, dy.to(dev, xx.dtype))[0].double().cpu()

    truth = dx(iwn_reference, x.double(), "cpu")
    err = (dx(fused_iwn, x, device) - truth).abs().max()
    ref_err = (dx(iwn_reference, x, "cpu") - truth).abs().max()
    assert err <= 4 * ref_err + 1e-6 * truth.abs().max(), (err, ref_err)


@needs_extension
def test_device_keys_check_ranges_as_the_cpu_keys_do():
    """iwn_group_keys' kernel for CUDA (generic ATen code), run here on CPU
    tensors through the dispatcher: the same keys as the CPU kernel for good
    input, and the same ValueError, before any launch, for bad input."""
    op = torch.ops.surgellm._iwn_group_keys.default
    cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    labels, tasks = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0, 1, 1, 0, 1])
    for args in [(labels, tasks, 2, 3), (labels, None, 1, 3), (None, tasks, 2, 1)]:
        assert torch.equal(op.redispatch(cuda_kernel, *args), op(*args))
    for args, message in [
        ((labels + 1, tasks, 2, 3), r"labels must lie in \[0, 3\), got values in \[1, 3\]"),
        ((labels - 1, None, 1, 3), r"labels must lie in \[0, 3\), got values in \[-1, 1\]"),
        ((labels, tasks * 2, 2, 3), r"task_ids must lie in \[0, 2\), got values in \[0, 2\]"),
        ((None, tasks - 1, 2, 1), r"task_ids must lie in \[0, 2\), got values in \[-1, 0\]"),
    ]:
        for call in (op, lambda *a: op.redispatch(cuda_kernel, *a)):
            with pytest.raises(ValueError, match=message):
                call(*args)


@needs_extension
def test_direct_call_with_bad_keys_raises_on_cpu(force_backend):
    """torch.ops.surgellm.* check their keys on the CPU: never an out-of-bounds write."""
    force_backend("cpu")
    select_backend("iwn", torch.device("cpu"))  # the C++ kernels, not Triton's, for CPU
    x = torch.randn(4, 3)
    bad = torch.tensor([0, 1, 7, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"keys must lie in \[0, 2\), got 7"):
        torch.ops.surgellm._iwn_group_moments(x, bad, None, 2)
    negative = torch.tensor([0, -3, 1, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"keys must lie in \[0, 2\), got -3"):
        torch.ops.surgellm._iwn_group_moments(x, negative, None, 2)
    # the one bad key last, in the scan's scalar tail
    last = torch.zeros(37, dtype=torch.int32)
    last[-1] = 2
    with pytest.raises(RuntimeError, match=r"keys must lie in \[0, 2\), got 2"):
        torch.ops.surgellm._iwn_group_moments(torch.randn(37, 3), last, None, 2)
    mu, sigma = torch.zeros(1, 3), torch.ones(1, 3)
    with pytest.raises(RuntimeError, match=r"keys must lie in \[0, 1\)"):
        torch.ops.surgellm._iwn_apply(x, bad, None, None, None, mu, sigma, 1, 1e-5)
    with pytest.raises(RuntimeError, match=r"keys must have shape \[4\]"):
        torch.ops.surgellm._iwn_group_moments(x, bad[:3], None, 2)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.surgellm._iwn_group_moments(x.t(), None, None, 1)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_in_place_change_before_backward_raises(backend, device, force_backend):
    """x (and the gate) saved for backward share their version counters."""
    force_backend(backend)
    base = torch.randn(10, 4, device=device, requires_grad=True)
    labels = torch.randint(0, 2, (10,), device=device)
    for gate in (None, torch.randn(4, device=device, requires_grad=True)):
        x = base * 1
        y = fused_iwn(x, labels, gate=gate, training=True, num_classes=2)
        x.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_running_statistics_of_other_dtypes_and_layouts_are_updated(backend, device, force_backend):
    """Each running buffer is updated, whichever of them needs a temporary."""
    force_backend(backend)
    x = torch.randn(12, 5, dtype=torch.float64, device=device)
    labels = torch.randint(0, 3, (12,), device=device)
    for rm, rs in (
        (torch.zeros(5, device=device, dtype=torch.float64), torch.ones(10, device=device)[::2]),
        (torch.zeros(5, device=device), torch.ones(5, device=device, dtype=torch.float64)),
    ):
        rm_ref, rs_ref = rm.clone(), rs.clone()
        fused_iwn(x, labels, running_mean=rm, running_std=rs, training=True, num_classes=3)
        iwn_reference(
            x, labels, running_mean=rm_ref, running_std=rs_ref, training=True, num_classes=3
        )
        torch.testing.assert_close(rm, rm_ref)
        torch.testing.assert_close(rs, rs_ref)


@needs_extension
def test_direct_calls_with_bad_shapes_raise(force_backend):
    """torch.ops.surgellm.iwn checks its arguments as fused_iwn does (the
    checks are the op's), and its phases reject what would overrun a buffer,
    whichever backend's kernels are registered."""
    force_backend("cpu")
    select_backend("iwn", torch.device("cpu"))
    x, labels = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    tasks = torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match=r"task_ids were given but running_mean has shape"):
        torch.ops.surgellm.iwn(
            x,
            labels,
            running_mean=torch.zeros(4),
            running_std=torch.ones(4),
            task_ids=tasks,
            training=True,
        )
    with pytest.raises(RuntimeError, match=r"F > 0"):
        torch.ops.surgellm._iwn_group_moments(torch.randn(3, 0), None, None, 1)
    with pytest.raises(RuntimeError, match=r"num_tasks >= 1"):  # was a division by 0
        none = torch.zeros(0, 4)  # no tasks: mu, sigma, the groups' statistics
        sums = torch.zeros(2, 0, 4)
        coefficients = torch.ops.surgellm._iwn_coefficients
        coefficients(sums, None, None, torch.zeros(0), none, none, none, none, none, False, 1e-5)
    with pytest.raises(ValueError, match=r"gate must have shape \(4,\)"):
        torch.ops.surgellm.iwn(x, labels, torch.zeros(3), training=True)


@pytest.mark.skipif("triton" not in [b for b, _ in KERNEL_PAIRS], reason="Triton not runnable")
def test_triton_kernels_skip_invalid_keys(force_backend):
    """Keys outside their range (how CUDA marks out-of-range labels under graph
    capture, where they cannot be checked) are left out of the statistics and give NaN rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    force_backend("triton")
    fused_iwn(
        torch.randn(2, 3, device=device),
        torch.zeros(2, dtype=torch.long, device=device),
        training=True,
    )  # registers the Triton kernels for this device
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    keys = torch.tensor([0, 1, -1, 1, 5, 0], dtype=torch.int32, device=device)
    count, mean, m2, _ = torch.ops.surgellm._iwn_group_moments(x, keys, None, 2)
    valid = torch.tensor([0, 1, 3, 5], device=device)
    exp_count, exp_mean, exp_m2, _ = torch.ops.surgellm._iwn_group_moments(
        x[valid], keys[valid].contiguous(), None, 2
    )
    torch.testing.assert_close(count, exp_count)
    torch.testing.assert_close(mean, exp_mean)
    torch.testing.assert_close(m2, exp_m2)
    mu, sigma = torch.zeros(2, 3, dtype=torch.float64, device=device), torch.ones_like(mean)
    y = torch.ops.surgellm._iwn_apply(x, keys, None, None, None, mu, sigma, 1, 1e-5)
    assert torch.isnan(y[[2, 4]]).all() and torch.isfinite(y[valid]).all()


@needs_extension
def test_group_scratch_is_bounded_on_cpu():
    """300 groups x 2048 features over 8192 rows: the chunk partials stay within
    a fixed budget (they were chunks x groups x F, about 315 MB here)."""
    script = textwrap.dedent("""
        import torch
        from torch.profiler import ProfilerActivity, profile
        x = torch.randn(8192, 2048)
        keys = (torch.arange(8192) % 300).to(torch.int32)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            import surgellm_kernels
            torch.ops.surgellm._iwn_group_moments(x, keys, None, 300)
        live = peak = 0
        for _, nbytes in sorted((e.start_ns(), e.nbytes())
                                for e in prof.profiler.kineto_results.events() if e.nbytes()):
            live += nbytes
            peak = max(peak, live)
        print(peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_mb = int(out.stdout.split()[-1]) / 2**20
    outputs_mb = 3 * 300 * 2048 * 4 / 2**20  # mean, m2, mean_residual
    assert peak_mb < outputs_mb + 80, f"peak {peak_mb:.0f} MB"


# -- on CUDA only -------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", [b for b, d in KERNEL_PAIRS if d == "cuda"])
def test_cuda_backward_makes_no_host_sync(backend, force_backend):
    """Forward reads the label and task-id ranges back (its one sync); backward none."""
    force_backend(backend)
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    labels = torch.randint(0, 4, (64,), device="cuda")
    tasks = torch.randint(0, 2, (64,), device="cuda")
    rm, rs = torch.zeros(2, 32, device="cuda"), torch.ones(2, 32, device="cuda")
    kwargs = dict(task_ids=tasks, running_mean=rm, running_std=rs, training=True, num_classes=4)
    fused_iwn(x, labels, **kwargs).sum().backward()  # warm-up: first-call setup may sync
    y = fused_iwn(x, labels, **kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("backend", [b for b, d in KERNEL_PAIRS if d == "cuda"])
def test_cuda_out_of_range_labels_raise_before_launch(backend, force_backend):
    force_backend(backend)
    x = torch.randn(6, 3, device="cuda")
    rm, rs = torch.zeros(2, 3, device="cuda"), torch.ones(2, 3, device="cuda")
    before = rm.clone(), rs.clone()
    for labels, tasks, message in [
        ([0, 1, 9, 1, 0, 0], [0] * 6, r"labels must lie in \[0, 2\), got values in \[0, 9\]"),
        ([0, 1, 0, 1, -2, 0], [0] * 6, r"labels must lie in \[0, 2\), got values in \[-2, 1\]"),
        ([0] * 6, [0, 1, 3, 0, 0, 0], r"task_ids must lie in \[0, 2\), got values in \[0, 3\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            fused_iwn(
                x,
                torch.tensor(labels, device="cuda"),
                training=True,
                num_classes=2,
                task_ids=torch.tensor(tasks, device="cuda"),
                running_mean=rm,
                running_std=rs,
            )
        assert torch.equal(rm, before[0]) and torch.equal(rs, before[1])


@needs_cuda
@pytest.mark.parametrize("backend", [b for b, d in KERNEL_PAIRS if d == "cuda"])
def test_cuda_graph_capture_skips_the_range_check(backend, force_backend):
    """Captured in a CUDA graph (no host sync allowed), a training forward runs
    without the range check; out-of-range rows then get NaN outputs and stay
    out of the statistics."""
    force_backend(backend)
    x = torch.randn(6, 3, device="cuda")
    labels = torch.tensor([0, 1, 1, 1, 0, 0], device="cuda")
    rm, rs = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    kwargs = dict(training=True, num_classes=2, running_mean=rm, running_std=rs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as torch advises
        fused_iwn(x, labels, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_iwn(x, labels, **kwargs)
    labels.copy_(torch.tensor([0, 1, 9, 1, -2, 0], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    valid = torch.tensor([0, 1, 3, 5], device="cuda")
    assert torch.isnan(y[[2, 4]]).all()
    expected = iwn_reference(x[valid], labels[valid], training=True, num_classes=2)
    torch.testing.assert_close(y[valid], expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(rm).all() and torch.isfinite(rs).all()


@needs_cuda
def test_cuda_too_many_groups_is_a_clear_error(force_backend):
    if not backends("cuda", "iwn")["cuda"].available:
        pytest.skip("no CUDA C++ kernels")
    force_backend("cuda")
    x = torch.randn(4, 2, device="cuda")
    rm, rs = torch.zeros(2, device="cuda"), torch.ones(2, device="cuda")
    with pytest.raises(ValueError, match=r"num_classes: .*at most 12288 .task, class. groups"):
        fused_iwn(
            x,
            torch.zeros(4, dtype=torch.long, device="cuda"),
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=20000,
        )
    assert (rm == 0).all() and (rs == 1).all()  # a failed call changes nothing


@needs_cuda
def test_cuda_too_many_features_is_a_clear_error(force_backend):
    """Past 65535 blocks of 128 features the row kernels' grid failed to
    launch ("invalid configuration argument")."""
    if not backends("cuda", "iwn")["cuda"].available:
        pytest.skip("no CUDA C++ kernels")
    force_backend("cuda")
    F = 65535 * 128 + 1
    x = torch.randn(2, F, device="cuda")
    rm, rs = torch.zeros(F, device="cuda"), torch.ones(F, device="cuda")
    with pytest.raises(
        ValueError, match=r"x: the CUDA C\+\+ kernels take at most 8388480 features"
    ):
        fused_iwn(x, running_mean=rm, running_std=rs)
    with pytest.raises(ValueError, match=r"the CUDA C\+\+ kernels take at most 8388480"):
        fused_iwn(
            x,
            torch.zeros(2, dtype=torch.long, device="cuda"),
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=1,
        )
    assert (rm == 0).all() and (rs == 1).all()  # a failed call changes nothing


def test_triton_grid_past_cuda_limits_is_a_clear_error():
    """F past 65535 blocks of 64 features, or groups past 65535 tiles, failed
    to launch on a GPU ("invalid configuration argument"); the interpreter
    has no such limit."""
    triton_iwn = pytest.importorskip("surgellm_kernels.triton.iwn")
    F = triton_iwn.MAX_GRID_YZ * triton_iwn.BLOCK_F
    triton_iwn.check_grid((1, triton_iwn._fblocks(F), 65535), on_cuda=True)
    for grid in [(1, triton_iwn._fblocks(F + 1)), (1, 1, 65536)]:
        with pytest.raises(ValueError, match="x: too many features or .task, class. groups"):
            triton_iwn.check_grid(grid, on_cuda=True)
        triton_iwn.check_grid(grid, on_cuda=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", [b for b, d in KERNEL_PAIRS if d == "cuda"])
def test_kernels_run_on_the_inputs_device(backend, force_backend):
    """x on cuda:1 while cuda:0 is current: the launches go to cuda:1."""
    force_backend(backend)
    torch.cuda.set_device(0)
    x = torch.randn(50, 7, device="cuda:1", dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (50,), device="cuda:1")
    gate = torch.randn(7, device="cuda:1", dtype=torch.float64, requires_grad=True)
    y = fused_iwn(x, labels, gate=gate, training=True, num_classes=3)
    dx, dgate = torch.autograd.grad(y.square().sum(), (x, gate))
    assert y.device == dx.device == torch.device("cuda:1")
    xc, gc = x.detach().cpu().requires_grad_(True), gate.detach().cpu().requires_grad_(True)
    y_ref = iwn_reference(xc, labels.cpu(), gate=gc, training=True, num_classes=3)
    dx_ref, dgate_ref = torch.autograd.grad(y_ref.square().sum(), (xc, gc))
    for a, b in ((y, y_ref), (dx, dx_ref), (dgate, dgate_ref)):
        torch.testing.assert_close(
            a.cpu(), b, rtol=TOLERANCES[torch.float64], atol=TOLERANCES[torch.float64]
        )


def _combine_feature_by_feature(count, mean, m2, residual, T, pooled, momentum, rm, rs):
    """combine_at (csrc/iwn/iwn_math.h) in its own order of float32
    operations, feature-wise in torch (every division by a tensor of the same
    shape: a scalar divisor can become a multiplication by its reciprocal)."""
    C, F = count.numel() // T, mean.shape[1]
    mean, m2, residual = (t.view(T, C, F) for t in (mean, m2, residual))
    count = count.view(T, C)

    def full(v):
        return torch.full((F,), float(v), dtype=torch.float32)

    def safe_sqrt(v):
        # float32's correctly rounded sqrt (the kernels' std::sqrt and
        # vsqrtps), through float64: torch.sqrt of float32 is 1 ulp off on
        # some hosts (AMD EPYC, torch 2.13: sqrt(0.9107382) gave 0.95432609)
        root = v.double().sqrt().float()
        return torch.where(v > 0, root, torch.where(v == v, full(0), v))

    group_std = torch.zeros(T, C, F)
    mu, sigma = torch.zeros(T, F), torch.zeros(T, F)
    for t in range(T):
        present, first, sum_mean, sum_std = 0, full(0), full(0), full(0)
        for c in range(C):
            if count[t, c] > 0:
                rho = residual[t, c]
                group_std[t, c] = safe_sqrt(m2[t, c] / full(count[t, c]) - rho * rho)
                m = mean[t, c] + residual[t, c]
                first = m if present == 0 else first
                sum_mean = sum_mean + (m - first)
                sum_std = sum_std + group_std[t, c]
                present += 1
        if present:
            mu[t] = first + sum_mean / full(present)
            sigma[t] = sum_std / full(present)
            if pooled:
                spread = full(0)
                for c in range(C):
                    if count[t, c] > 0:
                        d = (mean[t, c] + residual[t, c]) - mu[t]
                        sd = group_std[t, c]
                        spread = spread + (sd * sd + d * d)
                sigma[t] = safe_sqrt(spread / full(present))
            for r, batch in ((rm, mu), (rs, sigma)):  # from the batch's end where m >= 1/2
                if momentum < 0.5:
                    r[t] = r[t] + full(momentum) * (batch[t] - r[t])
                else:
                    r[t] = batch[t] - (batch[t] - r[t]) * full(1 - momentum)
    return group_std.view(T * C, F), mu, sigma


@needs_extension
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("momentum", [0.1, 0.7, 1.0])
def test_combine_has_the_bits_of_one_feature_at_a_time(device, pooled, momentum):
    """The CPU kernels combine class moments a vector of features at a time
    and a CUDA thread one feature: both the same float32 operations in the
    same order, so the same bits (37 features: a partial vector; an absent
    class; rounding that leaves a variance below 0; NaN and infinite
    moments; -0)."""
    T, C, F = 2, 4, 37
    g = torch.Generator().manual_seed(7)
    count = torch.tensor([3.0, 0.0, 5.0, 1.0, 2.0, 7.0, 0.0, 4.0])
    mean = torch.randn(T * C, F, generator=g) * 3
    m2 = torch.rand(T * C, F, generator=g) * count.view(-1, 1)
    residual = torch.randn(T * C, F, generator=g) * 1e-7
    m2[0, 3], residual[0, 3] = 0.0, 1e-3  # M2 / n - rho^2 < 0: s_c = 0
    m2[2, 5], mean[3, 6], m2[4, 7] = float("nan"), float("inf"), float("inf")
    mean[5, 8], residual[5, 8] = -0.0, -0.0
    rm, rs = torch.randn(T, F, generator=g), torch.rand(T, F, generator=g)
    got_rm, got_rs = rm.clone().to(device), rs.clone().to(device)
    on = [t.to(device) for t in (count, mean, m2, residual)]
    got = torch.ops.surgellm._iwn_combine(*on, T, pooled, momentum, got_rm, got_rs)
    want = _combine_feature_by_feature(count, mean, m2, residual, T, pooled, momentum, rm, rs)
    for a, b in zip((*got, got_rm, got_rs), (*want, rm, rs)):
        assert torch.equal(a.cpu().view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_eps_0_with_a_task_absent_from_the_batch(backend, device, force_backend):
    """The absent task's sigma + eps is 0: its empty sums times 1 / 0 made
    the weight's and the gate's gradients NaN, every feature's. A NaN in the
    rows of a task present still reaches them, as in the reference."""
    force_backend(backend)
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 3, dtype=torch.float64, generator=g)
    with_nan = clean.clone()
    with_nan[2, 1] = float("nan")
    labels = torch.tensor([0, 1, 0, 1, 0, 1], device=device)
    task_ids = torch.ones(6, dtype=torch.long, device=device)  # task 0 absent
    params = [torch.randn(3, dtype=torch.float64, generator=g).to(device) for _ in range(3)]
    dy = torch.linspace(-1, 1, 18, dtype=torch.float64, device=device).view(6, 3)
    for x in (clean.to(device), with_nan.to(device)):
        grads = []
        for op in (fused_iwn, iwn_reference):
            leaves = [p.clone().requires_grad_() for p in params]
            gate, weight, bias = leaves
            y = op(x, labels, gate=gate, weight=weight, bias=bias, task_ids=task_ids,
                   training=True, eps=0.0, num_classes=2)  # fmt: skip
            y.backward(dy)
            grads.append([p.grad for p in leaves])
        for fused, reference in zip(*grads):
            torch.testing.assert_close(fused, reference, equal_nan=True)
            assert torch.equal(fused.isnan(), reference.isnan())


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("start", [1.0, 1e8])
def test_momentum_1_gives_the_batch_statistics(backend, device, start, force_backend):
    """r + (batch - r) rounded the batch away where r was far larger (a
    running mean of 1e8 gave 0, not 3), and momentum=None's first step (1)
    took a running std of 1 to 0 where the batch's was 2.5e-10."""
    force_backend(backend)
    a = torch.tensor(1e-9).item()  # as float32 holds it
    x = torch.tensor([[1.0, 0.0], [3.0, a], [2.0, 0.0], [6.0, 0.0]], device=device)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    rm, rs = torch.full((2,), start, device=device), torch.full((2,), start, device=device)
    fused_iwn(x, labels, running_mean=rm, running_std=rs, training=True, momentum=1.0,
              num_classes=2)  # fmt: skip
    # feature 1: class means a / 2 and 0, deviations a / 2 and 0
    truth_mean = torch.tensor([3.0, a / 4], dtype=torch.float64)
    truth_std = torch.tensor([1.5, a / 4], dtype=torch.float64)
    torch.testing.assert_close(rm.double().cpu(), truth_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rs.double().cpu(), truth_std, rtol=1e-6, atol=0)
