"""The reference modules against hand-computed cases (the paper's Eq.3-11)."""

import math

import pytest
import torch

from surgellm_kernels import InstanceWeightedNorm, SurgicalGate
from surgellm_kernels.ops.reference import class_balanced_statistics, iwn_reference

EPS = 1e-5


def _two_class_batch():
    # class 0: values 0 and 2 -> mean 1, population std 1
    # class 1: value 10      -> mean 10, std 0
    x = torch.tensor([[0.0], [2.0], [10.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    return x, labels


def test_class_mean_and_pooled_by_hand():
    x, labels = _two_class_batch()
    mu, sigma, _ = class_balanced_statistics(x, labels, 2, std_mode="class_mean")
    assert mu.item() == pytest.approx(5.5)  # (1 + 10) / 2, not 12 / 3
    assert sigma.item() == pytest.approx(0.5)  # (1 + 0) / 2
    _, pooled, _ = class_balanced_statistics(x, labels, 2, std_mode="pooled")
    # sqrt(((1 + 4.5^2) + (0 + 4.5^2)) / 2)
    assert pooled.item() == pytest.approx(math.sqrt(20.75))
    assert pooled.item() != pytest.approx(sigma.item())


@pytest.mark.parametrize("std_mode,sigma", [("class_mean", 0.5), ("pooled", math.sqrt(20.75))])
def test_module_training_forward_by_hand(std_mode, sigma):
    x, labels = _two_class_batch()
    norm = InstanceWeightedNorm(1, num_classes=2, std_mode=std_mode).double().train()
    y = norm(x, labels)
    expected = (x - 5.5) / (sigma + EPS)
    torch.testing.assert_close(y, expected)
    # running statistics moved 10% of the way from (0, 1)
    torch.testing.assert_close(norm.running_mean, torch.tensor([[0.55]], dtype=torch.float64))
    torch.testing.assert_close(
        norm.running_std, torch.tensor([[0.9 + 0.1 * sigma]], dtype=torch.float64)
    )


def test_eval_uses_running_statistics_and_affine_gate():
    norm = InstanceWeightedNorm(2, num_classes=3, affine=True, gate=True).double().eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([[1.0, -1.0]]))
        norm.running_std.copy_(torch.tensor([[2.0, 0.5]]))
        norm.weight.copy_(torch.tensor([3.0, 4.0]))
        norm.bias.copy_(torch.tensor([0.5, -0.5]))
        norm.gate_logits.copy_(torch.tensor([0.0, 100.0]))  # gates 0.5 and ~1
    x = torch.tensor([[4.0, 3.0]], dtype=torch.float64)
    y = norm(x)
    expected = torch.tensor(
        [[(2.0 - 1.0) / (2.0 + EPS) * 3.0 + 0.5, (3.0 + 1.0) / (0.5 + EPS) * 4.0 - 0.5]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(y, expected)


def test_one_to_fifty_imbalance_weights_classes_equally():
    torch.manual_seed(0)
    majority = torch.randn(50, 3, dtype=torch.float64)
    minority = torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64)
    x = torch.cat([majority, minority])
    labels = torch.tensor([0] * 50 + [1])
    mu, sigma, _ = class_balanced_statistics(x, labels, 2)
    expected_mu = (majority.mean(0) + minority[0]) / 2
    expected_sigma = (majority.std(0, unbiased=False) + 0) / 2
    torch.testing.assert_close(mu[0], expected_mu)
    torch.testing.assert_close(sigma[0], expected_sigma)
    # the instance-count-weighted mean would be very different
    assert not torch.allclose(mu[0], x.mean(0))


@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
def test_singleton_and_absent_classes_give_no_nan(std_mode):
    torch.manual_seed(1)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 3])  # class 1 absent, class 3 singleton
    gate = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = iwn_reference(x, labels, gate=gate, training=True, num_classes=5, std_mode=std_mode)
    y.pow(2).sum().backward()
    for t in (y, x.grad, gate.grad):
        assert torch.isfinite(t).all()
    # absent classes are skipped: same as the batch relabelled without them
    relabelled = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    y2 = iwn_reference(
        x.detach(),
        relabelled,
        gate=gate.detach(),
        training=True,
        num_classes=3,
        std_mode=std_mode,
    )
    torch.testing.assert_close(y.detach(), y2)


def test_constant_feature_gives_zero_sigma_gradient_not_nan():
    x = torch.tensor(
        [[1.0, 0.0], [1.0, 1.0], [1.0, 3.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True
    )
    labels = torch.tensor([0, 0, 1, 1])
    y = iwn_reference(x, labels, training=True, num_classes=2)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_per_task_statistics_equal_separate_calls():
    torch.manual_seed(2)
    x = torch.randn(30, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,))
    tasks = torch.randint(0, 2, (30,))
    rm, rs = torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
    y = iwn_reference(
        x, labels, running_mean=rm, running_std=rs, task_ids=tasks, training=True, num_classes=3
    )
    for t in (0, 1):
        rows = tasks == t
        alone = iwn_reference(x[rows], labels[rows], training=True, num_classes=3)
        torch.testing.assert_close(y[rows], alone)
        mu, sigma, _ = class_balanced_statistics(x[rows], labels[rows], 3)
        torch.testing.assert_close(rm[t], 0.1 * mu[0])
        torch.testing.assert_close(rs[t], 0.9 + 0.1 * sigma[0])
    # task 2 had no rows: untouched
    assert torch.equal(rm[2], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(rs[2], torch.ones(5, dtype=torch.float64))


def _paper_statistics(x, labels, num_classes):
    """Eq.10-11 written out with a loop over classes, in numpy."""
    xs, ls = x.numpy(), labels.numpy()
    means = [xs[ls == c].mean(0) for c in range(num_classes) if (ls == c).any()]
    stds = [xs[ls == c].std(0, ddof=0) for c in range(num_classes) if (ls == c).any()]
    return sum(means) / len(means), sum(stds) / len(stds)


def test_fit_matches_paper_and_streamed_fit_matches_whole():
    torch.manual_seed(3)
    x = torch.randn(200, 6, dtype=torch.float64) * 3 + 7
    labels = torch.randint(0, 4, (200,))
    labels[:60] = 0  # imbalance
    whole = InstanceWeightedNorm(6, num_classes=4).double().fit(x, labels)
    mu, sigma = _paper_statistics(x, labels, 4)
    torch.testing.assert_close(whole.running_mean[0], torch.from_numpy(mu))
    torch.testing.assert_close(whole.running_std[0], torch.from_numpy(sigma))
    streamed = InstanceWeightedNorm(6, num_classes=4).double()
    for start in range(0, 200, 7):
        streamed.partial_fit(x[start : start + 7], labels[start : start + 7])
    streamed.fit()
    torch.testing.assert_close(streamed.running_mean, whole.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed.running_std, whole.running_std, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_fit_continues_after_the_module_moves():
    """The accumulated moments stayed on the first device: the next batch on
    the new one failed to merge with them."""
    x, labels = torch.randn(40, 6, dtype=torch.float64), torch.arange(40) % 3
    whole = InstanceWeightedNorm(6, num_classes=3).double().fit(x, labels)
    moved = InstanceWeightedNorm(6, num_classes=3).double()
    moved.partial_fit(x[:20], labels[:20])
    moved.cuda().partial_fit(x[20:].cuda(), labels[20:].cuda())
    moved.fit()
    torch.testing.assert_close(moved.running_mean.cpu(), whole.running_mean)
    torch.testing.assert_close(moved.running_std.cpu(), whole.running_std)


def test_fit_per_task_and_freeze():
    torch.manual_seed(4)
    x = torch.randn(100, 3)
    labels = torch.randint(0, 2, (100,))
    tasks = torch.randint(0, 2, (100,))
    norm = InstanceWeightedNorm(3, num_classes=2, num_tasks=2).fit(x, labels, tasks)
    for t in (0, 1):
        rows = tasks == t
        mu, sigma = _paper_statistics(x[rows].double(), labels[rows], 2)
        torch.testing.assert_close(norm.running_mean[t], torch.from_numpy(mu).float())
        torch.testing.assert_close(norm.running_std[t], torch.from_numpy(sigma).float())
    # frozen: training mode uses the fitted statistics and leaves them alone
    norm.train()
    before = norm.running_mean.clone()
    y = norm(x, labels, tasks)
    expected = (x - norm.running_mean[tasks]) / (norm.running_std[tasks] + EPS)
    torch.testing.assert_close(y, expected)
    assert torch.equal(norm.running_mean, before)
    # and an explicit call returns to batch statistics
    norm.use_batch_statistics()
    y_batch = norm(x[:20], labels[:20], tasks[:20])  # batch statistics of 20 rows
    assert not torch.allclose(y_batch, expected[:20])
    assert not torch.equal(norm.running_mean, before)


def test_fit_errors():
    norm = InstanceWeightedNorm(3, num_classes=2)
    with pytest.raises(RuntimeError, match="nothing to fit"):
        norm.fit()
    with pytest.raises(ValueError, match="labels"):
        norm.fit(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_surgical_gate_equations_by_hand():
    torch.manual_seed(5)
    d, nf, T = 8, 16, 3
    gate = SurgicalGate(d, num_features=nf, num_tasks=T, alpha=0.1).double()
    h = torch.randn(4, d, dtype=torch.float64)
    s = torch.randn(4, nf, dtype=torch.float64)
    tasks = torch.tensor([0, 2, 1, 2])
    z = gate(h, s, tasks)
    h_t = h + 0.1 * gate.task_embedding.weight[tasks]  # Eq.3
    s_p = torch.relu(s @ gate.feature_projection.weight.T + gate.feature_projection.bias)  # Eq.5
    g = torch.sigmoid(torch.cat([h_t, s_p], -1) @ gate.gate.weight.T + gate.gate.bias)  # Eq.6
    fused = g * h_t + (1 - g) * s_p  # Eq.7
    mean = fused.mean(-1, keepdim=True)
    var = fused.var(-1, unbiased=False, keepdim=True)
    expected = (fused - mean) / torch.sqrt(var + 1e-5) * gate.norm.weight + gate.norm.bias
    torch.testing.assert_close(z, expected)


# -- the eager backend (the reference functionals) against formulas written out ----------


def _iwn_by_loops(x, labels, task_ids, gate, weight, bias, std_mode, eps):
    """Eq.10-11 per task with Python loops over the classes present:
    independent of the reference's one-hot reductions."""
    u = x * torch.sigmoid(gate)
    y = torch.empty_like(u)
    for t in task_ids.unique():
        rows = task_ids == t
        classes = [u[rows & (labels == c)] for c in labels[rows].unique()]
        means = torch.stack([c.mean(0) for c in classes])
        stds = torch.stack([c.std(0, unbiased=False) for c in classes])
        mu = means.mean(0)
        if std_mode == "class_mean":
            sigma = stds.mean(0)
        else:
            sigma = (stds**2 + (means - mu) ** 2).mean(0).sqrt()
        y[rows] = (u[rows] - mu) / (sigma + eps)
    return y * weight + bias


@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
def test_eager_backend_matches_the_equations_written_out(std_mode, force_backend):
    from surgellm_kernels import fused_iwn

    force_backend("eager")
    g = torch.Generator().manual_seed(5)
    N, F, T, C = 40, 6, 2, 4
    x = torch.randn(N, F, generator=g, dtype=torch.float64) * 3 + 1
    labels = torch.arange(N) % C  # every class twice or more per task
    task_ids = (torch.arange(N) // 2) % T
    gate, weight, bias = (torch.randn(F, generator=g, dtype=torch.float64) for _ in range(3))
    rm, rs = torch.zeros(T, F, dtype=torch.float64), torch.ones(T, F, dtype=torch.float64)
    y = fused_iwn(
        x,
        labels,
        gate=gate,
        weight=weight,
        bias=bias,
        running_mean=rm,
        running_std=rs,
        task_ids=task_ids,
        training=True,
        std_mode=std_mode,
        num_classes=C,
    )
    torch.testing.assert_close(
        y, _iwn_by_loops(x, labels, task_ids, gate, weight, bias, std_mode, EPS)
    )


@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
def test_reference_gradients_against_finite_differences(std_mode):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(12) % 3
    gate, weight, bias = (
        torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3)
    )
    torch.autograd.gradcheck(
        lambda x, gate, weight, bias: iwn_reference(
            x, labels, gate=gate, weight=weight, bias=bias, training=True, std_mode=std_mode
        ),
        (x, gate, weight, bias),
    )


def test_surgical_gate_reference_against_the_equations_written_out():
    from surgellm_kernels.ops.reference import surgical_gate_reference

    g = torch.Generator().manual_seed(7)
    h, s, logits = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    weight, bias = (
        torch.randn(8, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64),
    )
    gate = 1 / (1 + torch.exp(-logits))
    v = gate * h + (1 - gate) * s
    mean = v.sum(-1, keepdim=True) / 8
    var = ((v - mean) ** 2).sum(-1, keepdim=True) / 8
    expected = (v - mean) / torch.sqrt(var + EPS) * weight + bias
    torch.testing.assert_close(surgical_gate_reference(h, s, logits, weight, bias, EPS), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_accumulate_in_float32_under_autocast(dtype):
    """Under torch.autocast the reference's class sums (matrix products,
    which autocast would run in bfloat16 / float16) stay in float32: its
    output and running statistics match float64 as the fused op's do, for x
    far from 0 where a low-precision sum would be off by 1e-2."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64) + 10
    labels = torch.randint(0, 3, (64,))
    truth = InstanceWeightedNorm(8, 3)
    truth.to(torch.float64).train()
    expected = truth(x, labels)
    module = InstanceWeightedNorm(8, 3).train()
    with torch.autocast("cpu", dtype=dtype):
        y = module(x.float(), labels)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        module.running_mean.double(), truth.running_mean, atol=1e-6, rtol=1e-6
    )
