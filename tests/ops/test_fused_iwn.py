"""fused_iwn on every (backend, device) present against the reference,
forward and backward: on this CPU machine the C++ CPU kernels, the Triton
kernels through the interpreter and eager; on a GPU machine also the CUDA
C++ and compiled Triton kernels on CUDA tensors."""

import pytest
import torch

from surgellm_kernels import fused_iwn
from surgellm_kernels.ops._backend import select_backend
from surgellm_kernels.ops.reference import iwn_reference

from _helpers import (
    assert_as_accurate_as_reference,
    assert_close,
    assert_same_bits_across_threads,
    device_backends,
    on_device,
)

PAIRS = device_backends()
KERNEL_PAIRS = [(b, d) for b, d in PAIRS if b != "eager"]
# The Triton interpreter is slow: it gets the small shapes only.
SHAPES = {
    "small": [(1, 7), (2, 1), (33, 16), (5, 768), (3, 1023)],
    "large": [(33, 768), (4096, 16), (2048, 1023)],
}


def _shapes(backend, device):
    interpreted = backend == "triton" and device == "cpu"
    return SHAPES["small"] + ([] if interpreted else SHAPES["large"])


def _labels(n, num_classes=10, seed=0):
    """Labels over num_classes with classes 3 and 7 absent. Tiny batches pair
    rows up so that sigma > 0: with sigma = 0 the output is (u - mu) / eps and
    float32 round-off is amplified 1e5 times in both implementations."""
    if n < 20:
        return (torch.arange(n) // 2) % 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[labels == 3] = 4
    labels[labels == 7] = 8
    return labels


def _run(fn, x, params, dy, **kwargs):
    """Output and gradients for x and every parameter present."""
    leaves = [t for t in (x, *params.values()) if t is not None]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    it = iter(leaves[1:])
    call = {k: (next(it) if v is not None else None) for k, v in params.items()}
    y = fn(leaves[0], **call, **kwargs)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


def _compare(backend, device, force_backend, x, params, **kwargs):
    """fused_iwn on ``backend`` against the reference: outputs, every gradient
    and the running statistics.

    float64 is compared directly. Lower precisions are compared with the
    float64 truth on the same (rounded) inputs: the fused error must stay
    within a few times the reference's own error in that dtype, plus the
    dtype's tolerance. (Some gradients are cancellations: y is invariant to
    scaling u, so d gate is a small sum of large terms; a fixed tolerance on
    them would test luck, not the kernel.)"""
    x, params, kwargs = on_device(device, x, params, kwargs)
    torch.manual_seed(123)
    dy = torch.randn(x.shape, dtype=x.dtype).to(device)
    rm = kwargs.pop("running_mean", None)
    rs = kwargs.pop("running_std", None)

    def run(fn, cast=None):
        stats = {} if rm is None else {"running_mean": rm.clone(), "running_std": rs.clone()}
        cast_params = {
            k: (v if v is None or cast is None else v.to(cast)) for k, v in params.items()
        }
        xx = x if cast is None else x.to(cast)
        stats = {k: (v if cast is None else v.to(cast)) for k, v in stats.items()}
        y, grads = _run(fn, xx, cast_params, dy if cast is None else dy.to(cast), **stats, **kwargs)
        return [y, *grads, *stats.values()]

    force_backend(backend)
    fused = run(fused_iwn)
    ref = run(iwn_reference)
    assert fused[0].dtype == x.dtype and fused[0].shape == x.shape
    for a, r in zip(fused, ref):
        assert a.dtype == r.dtype and a.shape == r.shape and a.device == r.device
        assert torch.isfinite(a).all()
    if x.dtype == torch.float64:
        for a, r in zip(fused, ref):
            assert_close(a, r)
        return
    assert_as_accurate_as_reference(fused, ref, run(iwn_reference, torch.float64), x.dtype)


def _params(F, dtype, gate="vec", affine=True, n=None):
    g = torch.Generator().manual_seed(F)
    gate_t = None
    if gate == "vec":
        gate_t = torch.randn(F, generator=g, dtype=torch.float64).to(dtype)
    elif gate == "full":
        gate_t = torch.randn(n, F, generator=g, dtype=torch.float64).to(dtype)
    return {
        "gate": gate_t,
        "weight": torch.randn(F, generator=g, dtype=torch.float64).to(dtype) if affine else None,
        "bias": torch.randn(F, generator=g, dtype=torch.float64).to(dtype) if affine else None,
    }


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape_index", range(8))
def test_training_matches_reference_on_odd_sizes(
    backend, device, dtype, shape_index, force_backend
):
    shapes = _shapes(backend, device)
    if shape_index >= len(shapes):
        pytest.skip("shape not run on this backend")
    N, F = shapes[shape_index]
    x = torch.randn(N, F, dtype=torch.float64) * 2 + 0.5
    if N < 20:
        # Keep the rows of a class apart (sigma_c ~ 0.5): two nearly equal rows
        # make sigma_c -> 0, where both float32 implementations lose digits.
        x = torch.arange(N, dtype=torch.float64)[:, None] + 0.1 * x
    x = x.to(dtype)
    std_mode = "pooled" if shape_index % 2 else "class_mean"
    _compare(
        backend,
        device,
        force_backend,
        x,
        _params(F, dtype),
        labels=_labels(N),
        training=True,
        num_classes=10,
        std_mode=std_mode,
        running_mean=torch.zeros(F, dtype=dtype),
        running_std=torch.ones(F, dtype=dtype),
    )


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("gate", [None, "vec", "full"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
@pytest.mark.parametrize("training", [True, False])
def test_gate_affine_and_modes(backend, device, gate, affine, std_mode, training, force_backend):
    N, F = 21, 9
    x = torch.randn(N, F, dtype=torch.float64)
    kwargs = dict(training=training, std_mode=std_mode, num_classes=4)
    if training:
        kwargs["labels"] = torch.randint(0, 4, (N,))
    else:
        kwargs.update(
            running_mean=torch.randn(F, dtype=torch.float64),
            running_std=torch.rand(F, dtype=torch.float64) + 0.5,
        )
    _compare(
        backend, device, force_backend, x, _params(F, torch.float64, gate, affine, N), **kwargs
    )


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["vec", "full"])
def test_half_precision(backend, device, dtype, gate, force_backend):
    N, F = 40, 24
    x = torch.randn(N, F).to(dtype)
    _compare(
        backend,
        device,
        force_backend,
        x,
        _params(F, dtype, gate, True, N),
        labels=_labels(N),
        training=True,
        num_classes=10,
    )


@pytest.mark.parametrize("backend,device", PAIRS)
def test_three_d_and_non_contiguous_input(backend, device, force_backend):
    base = torch.randn(5, 9, 6, dtype=torch.float64)
    x3d = base.transpose(0, 1)  # (9, 5, 6), non-contiguous
    assert not x3d.is_contiguous()
    labels = torch.randint(0, 3, (9, 5))
    _compare(
        backend,
        device,
        force_backend,
        x3d,
        _params(6, torch.float64, None, True) | {"gate": torch.randn(9, 5, 6, dtype=torch.float64)},
        labels=labels,
        training=True,
        num_classes=3,
    )
    cols = torch.randn(12, 20, dtype=torch.float64)[:, ::2]  # strided features
    _compare(
        backend,
        device,
        force_backend,
        cols,
        _params(10, torch.float64),
        labels=_labels(12),
        training=True,
        num_classes=10,
    )


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("training", [True, False])
def test_per_task_statistics(backend, device, training, force_backend):
    N, F, T = 30, 5, 3
    x = torch.randn(N, F, dtype=torch.float64)
    tasks = torch.randint(0, 2, (N,))  # task 2 absent: its running row stays
    kwargs = dict(
        task_ids=tasks,
        training=training,
        num_classes=3,
        running_mean=torch.randn(T, F, dtype=torch.float64),
        running_std=torch.rand(T, F, dtype=torch.float64) + 0.5,
    )
    if training:
        kwargs["labels"] = torch.randint(0, 3, (N,))
    _compare(backend, device, force_backend, x, _params(F, torch.float64), **kwargs)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gate", ["vec", "full"])
def test_runs_of_one_task(backend, device, dtype, gate, force_backend):
    """Tasks in runs of 1 to 9 consecutive rows, as task-homogeneous batches
    put them, over several row chunks, with a feature count that leaves a
    partial vector: forward, gradients and per-task statistics."""
    interpreted = backend == "triton" and device == "cpu"
    N, F = (61, 19) if interpreted else (613, 37)
    T = 3
    runs = [1, 2, 3, 4, 5, 7, 9]
    tasks = torch.cat([torch.full((runs[i % 7],), i % T) for i in range(N)])[:N]
    x = torch.randn(N, F, dtype=torch.float64).to(dtype)
    _compare(
        backend,
        device,
        force_backend,
        x,
        _params(F, dtype, gate=gate, n=N),
        labels=_labels(N, seed=1),
        task_ids=tasks,
        training=True,
        num_classes=10,
    )


@pytest.mark.skipif(("cpu", "cpu") not in PAIRS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,H,W", [(24, 96, 96), (180, 27, 29)])
def test_planes_past_the_last_level_cache_give_the_same_bits(dtype, N, H, W, force_backend):
    """Channels-first planes moving more than the last-level cache (32 MiB on
    the CI host; bfloat16: an output larger than it, so twice the samples)
    are written with non-temporal stores, bfloat16 two vectors at
    a time: y and dx in eval are, bit for bit, those of the same planes
    computed one sample at a time (too small to be streamed), and the first
    sample's match the eager reference in float64. Planes of 27 x 29 values
    start at every offset within a cache line: each is written in ordinary
    stores up to its first line boundary, streamed from there."""
    force_backend("cpu")
    g = torch.Generator().manual_seed(0)
    C = 64
    N *= 2 if dtype == torch.bfloat16 else 1
    x = torch.randn(N, C, H, W, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(dtype)
    kwargs = dict(
        weight=torch.rand(C, generator=g) + 0.5,
        bias=torch.randn(C, generator=g),
        running_mean=torch.randn(C, generator=g),
        running_std=torch.rand(C, generator=g) + 0.5,
        feature_dim=1,
    )
    y = fused_iwn(x, **kwargs)
    (dx,) = torch.autograd.grad(y, x, dy)
    for i in range(0, x.shape[0], 5):
        xi = x[i : i + 1].detach().requires_grad_()
        yi = fused_iwn(xi, **kwargs)
        (dxi,) = torch.autograd.grad(yi, xi, dy[i : i + 1])
        assert torch.equal(yi, y[i : i + 1]) and torch.equal(dxi, dx[i : i + 1])
    x0 = x[:1].detach().double().requires_grad_()
    y0 = iwn_reference(
        x0, **{k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    )
    (dx0,) = torch.autograd.grad(y0, x0, dy[:1].double())
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:1].detach().double(), y0.detach(), **tol)
    torch.testing.assert_close(dx[:1].double(), dx0, **tol)


@pytest.mark.skipif(("cpu", "cpu") not in PAIRS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_planes_past_the_last_level_cache(dtype, force_backend):
    """Training over planes of 27 x 29 values moving more than the
    last-level cache: the input gradient streams dx from each plane's first
    line boundary, reading dy and x at the same offset; y and dx against
    the reference in float64."""
    force_backend("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(180, 16, 27, 29, generator=g).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    labels = torch.randint(0, 4, (180,), generator=g)
    kwargs = dict(training=True, num_classes=4, feature_dim=1)
    # 64 channels (bfloat16: 128), so that x, dy and dx exceed 32 MiB
    # (bfloat16: dx alone): copies of 16, each channel's statistics its own,
    # the reference run on the 16.
    copies = 8 if dtype == torch.bfloat16 else 4
    xs = torch.cat([x] * copies, 1).requires_grad_()
    y = fused_iwn(xs, labels, **kwargs)
    (dx,) = torch.autograd.grad(y, xs, torch.cat([dy] * copies, 1))
    x64 = x.double().requires_grad_()
    y64 = iwn_reference(x64, labels, **kwargs)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for c in range(copies):
        part = slice(16 * c, 16 * (c + 1))
        torch.testing.assert_close(y[:, part].detach().double(), y64.detach(), **tol)
        torch.testing.assert_close(dx[:, part].double(), dx64, **tol)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "rows gated", "planes"])
@pytest.mark.parametrize("training", [True, False])
def test_half_precision_per_feature_and_task(
    backend, device, dtype, layout, training, force_backend
):
    """Reduced types with every coefficient different per feature and task.
    37 features (rows) or positions (planes): with AVX2, two whole blocks of
    two vectors (read by the CPU kernels with their lanes in an order of
    their own for bfloat16, which must come back in order) and a tail. In
    eval, a NaN and an inf in x stay in their own outputs."""
    N, F, T = 24, 37, 2
    planes = layout == "planes"
    if planes and backend == "triton" and device == "cpu":
        pytest.skip("Triton on the CPU reads rows only; channels-first planes run on C++ kernels")
    g = torch.Generator().manual_seed(1)
    x = torch.randn((N, F, 37) if planes else (N, F), generator=g, dtype=torch.float64)
    kwargs = dict(
        task_ids=torch.arange(N) % T,
        training=training,
        num_classes=3,
        running_mean=torch.randn(T, F, generator=g, dtype=torch.float64).to(dtype),
        running_std=(torch.rand(T, F, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        feature_dim=1 if planes else -1,
    )
    if training:
        kwargs["labels"] = torch.randint(0, 3, (N,), generator=g)
    params = _params(F, dtype, "vec" if layout == "rows gated" else None)
    _compare(backend, device, force_backend, x.to(dtype), params, **kwargs)
    if training:
        return
    bad = x.to(dtype)
    bad[2, 20], bad[5, 36], bad[7, 3] = float("nan"), float("inf"), float("-inf")
    stats = {k: kwargs[k] for k in ("running_mean", "running_std", "task_ids", "feature_dim")}
    x_dev, params, stats = on_device(device, bad, params, stats)
    y = fused_iwn(x_dev, **params, **stats).cpu()
    assert torch.isnan(y[2, 20]).all() and torch.isinf(y[5, 36]).all()
    assert torch.isinf(y[7, 3]).all()
    assert torch.isfinite(y).sum() == y.numel() - (3 if not planes else 3 * 37)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_imbalance_singleton_and_constant_feature(backend, device, num_classes, force_backend):
    N, F = 52, 4
    x = torch.randn(N, F, dtype=torch.float64)
    x[:, 2] = 3.0  # a constant feature
    if num_classes == 2:
        labels = torch.tensor([0] * 51 + [1])  # 51:1, the minority a singleton
    else:
        labels = torch.tensor([0] * 50 + [1, 2])  # 1:50, two singletons, class 3 absent
    for std_mode in ("class_mean", "pooled"):
        _compare(
            backend,
            device,
            force_backend,
            x,
            _params(F, torch.float64),
            labels=labels,
            training=True,
            num_classes=num_classes,
            std_mode=std_mode,
        )


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
@pytest.mark.parametrize("value", [-2.0, 3.0])
def test_constant_feature_gives_the_bias_exactly(
    backend, device, dtype, std_mode, value, force_backend
):
    """Found by tests/test_properties.py: with a constant feature sigma is
    (about) 0, so y = (u - mu) / (sigma + eps) and the rounding of the class
    mean (15 equal rows of u = x * sigmoid(gate) do not sum exactly) came
    out as |y| ~ 0.02 in float32, and as a gate gradient of the same size.
    The class means are now taken exact (mean + residual), so y is the bias
    and the gate gets no gradient, exactly."""
    force_backend(backend)
    x = torch.full((3, 5, 1), value, dtype=dtype, device=device)
    gate = torch.tensor([-0.0877], dtype=dtype, device=device, requires_grad=True)
    bias = torch.tensor([0.25], dtype=dtype, device=device)
    labels = torch.zeros(3, 5, dtype=torch.long, device=device)
    y = fused_iwn(
        x,
        labels,
        gate=gate,
        weight=torch.ones(1, dtype=dtype, device=device),
        bias=bias,
        training=True,
        num_classes=1,
        std_mode=std_mode,
        eps=1e-5,
    )
    assert torch.equal(y, torch.full_like(y, 0.25))
    (dgate,) = torch.autograd.grad(y, gate, torch.randn(y.shape).to(y))
    assert torch.equal(dgate, torch.zeros_like(dgate))


# Enough rows for several row chunks on every kernel backend: the CPU
# kernels into 4 chunks here (of 250 rows), the Triton kernels into up to
# 128 chunks (of 8 rows here), the CUDA kernels by 32 rows or more.
MANY_ROWS = 1000


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
@pytest.mark.parametrize("rows_of_a_class", ["scattered", "in runs"])
def test_large_constant_feature_over_many_chunks(
    backend, device, std_mode, rows_of_a_class, force_backend
):
    """float32 constant features at large non-dyadic values, 1000 rows in 3
    classes: the rows' sums round, so every chunk's mean m_ch differs from
    the value, and from the merged mean M. Merged without the cross term
    2 (m_ch - M) R_ch, M2 kept that rounding: the CPU kernels gave 1234.567
    and -9876.543 class deviations of 3.6e-4 and 2.9e-3 (36 and 290 times
    eps) instead of 0, so dx came out ~30 times too small. And the plain
    mean of 3 equal class means 6543.21 is an ulp (4.9e-4) below it in
    float32: y was off by 0.2-1 (the ulp over a deviation of its size), and
    with the deviation 0 would be off by 49 (the ulp over eps). Now sigma
    is 0, mu the value, y the bias exactly, and dx what sigma = 0 gives:
    (dy_i - sum dy / (C' n_c)) w / eps (the term through sigma is 0: s2 = 0)."""
    force_backend(backend)
    N, C, K = MANY_ROWS, 3, 3
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([1234.567, -9876.543, 6543.21])
    x = torch.cat([values.expand(N, K), torch.randn(N, 1, generator=g)], 1)
    row = torch.arange(N)
    labels = row % C if rows_of_a_class == "scattered" else (row // 50) % C
    weight, bias = torch.tensor([1.5, -0.5, 2.0, 1.0]), torch.tensor([0.25, -3.0, 0.1, 0.0])
    dy = torch.randn(N, K + 1, generator=g)
    x, labels, weight, bias, dy = on_device(device, x, labels, weight, bias, dy)
    x.requires_grad_(True)
    running_mean = torch.zeros(K + 1, device=device)
    running_std = torch.zeros(K + 1, device=device)
    y = fused_iwn(
        x,
        labels,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_std=running_std,
        training=True,
        momentum=1.0,
        num_classes=C,
        std_mode=std_mode,
        eps=1e-5,
    )
    (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(running_mean[:K], values.to(device))
    assert running_std[:K].abs().max() <= 1e-8  # class_mean: the mean of the s_c (all >= 0)
    assert torch.equal(y[:, :K], bias[:K].expand(N, K))
    d = dy[:, :K].double()
    per_row = C * torch.bincount(labels, minlength=C)[labels].double().unsqueeze(1)  # C' n_c
    exact = (d - d.sum(0) / per_row) * weight[:K].double() / 1e-5
    torch.testing.assert_close(
        dx[:, :K].double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item()
    )


def group_moments_truth_check(x, keys, G, m2_rtol=1e-5, residual_atol=1e-8):
    """_iwn_group_moments of float32 rows x against float64 sums over the
    same float32 values: M2 is sum (u - M)^2 about the mean M it returns,
    the residual is mean(u - M), and the class deviation sqrt(M2 / n -
    residual^2) is that about the exact mean."""
    count, mean, m2, residual = torch.ops.surgellm._iwn_group_moments(x, keys, None, G)
    group_std, _mu, _sigma = torch.ops.surgellm._iwn_combine(
        count, mean, m2, residual, 1, False, 0.1, None, None
    )
    u, keys = x.double().cpu(), keys.cpu()
    for k in range(G):
        rows = u[keys == k]
        dev = rows - mean[k].double().cpu()
        assert count[k].item() == rows.shape[0]
        torch.testing.assert_close(m2[k].double().cpu(), (dev * dev).sum(0), rtol=m2_rtol, atol=0)
        torch.testing.assert_close(
            residual[k].double().cpu(), dev.mean(0), rtol=0, atol=residual_atol
        )
        torch.testing.assert_close(
            group_std[k].double().cpu(), rows.std(0, correction=0), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("rows_of_a_class", ["scattered", "in runs"])
def test_merged_m2_is_the_sum_of_squares_about_the_merged_mean(
    backend, device, rows_of_a_class, force_backend
):
    """iwn_group_moments over many row chunks, float32 rows 1e4 + N(0,
    0.01^2): a chunk's mean rounds by up to 5e-4 (half an ulp of 1e4, a
    twentieth of the deviation); without the cross term the deviations were
    0.6-0.9% off (CPU and Triton kernels). The CPU kernels take one pass
    about a shift, the rows sorted by class: in runs they stay in memory
    order, scattered they jump."""
    force_backend(backend)
    select_backend("iwn", torch.device(device))  # the phase ops run that backend's kernels
    N, F, G = 3000, 5, 3
    g = torch.Generator().manual_seed(1)
    x = (1e4 + 0.01 * torch.randn(N, F, generator=g, dtype=torch.float64)).float().to(device)
    row = torch.arange(N)
    keys = row % G if rows_of_a_class == "scattered" else (row // 16) % G
    group_moments_truth_check(x, keys.to(torch.int32).to(device), G)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("rows_of_a_class", ["scattered", "in runs"])
def test_moments_whose_first_rows_are_outliers(backend, device, rows_of_a_class, force_backend):
    """The CPU kernels' one pass takes each class's shift from its first 8
    rows in a row chunk (256 rows here: N / 64). Here the chunk's first 8
    rows (in runs: 8 of one class; scattered: 4 of each) are far from the
    rest in one feature (1e3 + i, the rest N(0, 1)), a lane inside a middle
    vector of 35 features: about such a shift, M2 = S2 - d (S1 + R) cancels,
    so the class takes the two passes instead, M2 within 2.5e-7 (relative)
    and the residual 1.4e-7 of float64 sums. Without that, M2 was 2.8e-6 off
    and the residual 3.5e-5 (in runs)."""
    force_backend(backend)
    select_backend("iwn", torch.device(device))
    N, F, G = 16384, 35, 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, F, generator=g)
    row = torch.arange(N)
    keys = row % G if rows_of_a_class == "scattered" else (row // 2048) % G
    for start in range(0, N, 256):
        x[start : start + 8, 20] = 1e3 + torch.arange(8.0)
    x, keys = x.to(device), keys.to(torch.int32).to(device)
    group_moments_truth_check(x, keys, G, m2_rtol=1e-6, residual_atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("gate", [None, "vec", "full"])
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
def test_gradcheck(backend, device, gate, std_mode, force_backend):
    force_backend(backend)
    N, F = 9, 3
    x = torch.randn(N, F, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 4], device=device)  # 3 absent, 4 singleton
    params = on_device(device, _params(F, torch.float64, gate, True, N))
    leaves = [x] + [p.requires_grad_(True) for p in params.values() if p is not None]
    names = [k for k, v in params.items() if v is not None]

    def fn(xx, *ps):
        return fused_iwn(
            xx, labels, training=True, num_classes=5, std_mode=std_mode, **dict(zip(names, ps))
        )

    # fast_mode (random projections) keeps the Triton interpreter's runs short
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=fast)

    def fn_eval(xx, *ps):
        return fused_iwn(
            xx,
            running_mean=torch.ones(F, dtype=torch.float64, device=device),
            running_std=torch.full((F,), 2.0, dtype=torch.float64, device=device),
            **dict(zip(names, ps)),
        )

    assert torch.autograd.gradcheck(fn_eval, tuple(leaves), fast_mode=fast)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_bitwise_deterministic_across_runs_and_threads(backend, device, force_backend):
    force_backend(backend)
    N, F = (300, 40) if backend == "triton" and device == "cpu" else (5000, 77)
    x = torch.randn(N, F, device=device, requires_grad=True)
    gate = torch.randn(F, device=device, requires_grad=True)
    labels = _labels(N).to(device)
    dy = torch.randn(N, F, device=device)

    def run():
        y = fused_iwn(x, labels, gate=gate, training=True, num_classes=10)
        return (y, *torch.autograd.grad(y, (x, gate), dy))

    assert_same_bits_across_threads(run)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_empty_batch_in_eval(backend, device, force_backend):
    force_backend(backend)
    y = fused_iwn(
        torch.randn(0, 4, device=device),
        running_mean=torch.zeros(4, device=device),
        running_std=torch.ones(4, device=device),
    )
    assert y.shape == (0, 4)
