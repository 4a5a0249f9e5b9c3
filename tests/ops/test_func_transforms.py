"""torch.func: vmap runs the ops (fused and reference) once per sample, each
sample a batch of its own, as a Python loop over the samples does; the
fused ops' C++ autograd cannot run under torch.func's gradient transforms,
which are refused naming the op (the reference functions run there)."""

import warnings

import pytest
import torch
from torch.func import grad, vjp, vmap

from surgellm_kernels import InstanceWeightedNorm, fused_iwn, fused_surgical_gate
from surgellm_kernels.ops.reference import iwn_reference, surgical_gate_reference

from _helpers import cpu_backends

pytestmark = pytest.mark.skipif(
    "cpu" not in cpu_backends(), reason="the ops' vmap rules come with the C++ extension"
)

B, N, F, C = 4, 13, 7, 3


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, F, generator=g, dtype=torch.float64) * 2 + 1
    labels = torch.randint(0, C, (B, N), generator=g)
    labels[:, :C] = torch.arange(C)  # every class in every sample
    gate = torch.randn(F, generator=g, dtype=torch.float64)
    return x, labels, gate


@pytest.fixture(params=cpu_backends())
def backend(request, force_backend):
    force_backend(request.param)
    return request.param


@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_of_fused_iwn_is_the_loop_over_samples(backend, in_dim):
    x, labels, gate = _data()
    expected = torch.stack(
        [iwn_reference(x[b], labels[b], gate=gate, training=True, num_classes=C) for b in range(B)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback's performance warning
        got = vmap(
            lambda xb, lb: fused_iwn(xb, lb, gate=gate, training=True, num_classes=C),
            in_dims=(in_dim, in_dim),
        )(x.movedim(0, in_dim), labels.movedim(0, in_dim))
    torch.testing.assert_close(got, expected)


def test_vmap_of_the_reference_and_its_module_is_the_loop_over_samples():
    """The reference runs the op's checks (a C++ op): vmap needs their rule."""
    x, labels, gate = _data(1)
    got = vmap(lambda xb, lb: iwn_reference(xb, lb, gate=gate, training=True, num_classes=C))(
        x, labels
    )
    expected = torch.stack(
        [iwn_reference(x[b], labels[b], gate=gate, training=True, num_classes=C) for b in range(B)]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    norm = InstanceWeightedNorm(F, num_classes=C).double().eval()
    norm.running_mean.uniform_(-1, 1)
    torch.testing.assert_close(vmap(norm)(x), torch.stack([norm(x[b]) for b in range(B)]))
    h = x[:, :, :5]
    got = vmap(lambda hb: surgical_gate_reference(hb, hb * 2, hb.sin()))(h)
    expected = torch.stack([surgical_gate_reference(hb, hb * 2, hb.sin()) for hb in h])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_vmap_of_fused_surgical_gate_is_the_loop_over_samples(backend):
    x, _, _ = _data(2)
    w, b = torch.rand(F, dtype=torch.float64), torch.randn(F, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda h: fused_surgical_gate(h, h.cos(), h * 3, w, b))(x)
    expected = torch.stack([surgical_gate_reference(h, h.cos(), h * 3, w, b) for h in x])
    torch.testing.assert_close(got, expected)


def test_vmap_with_batched_running_statistics_updates_each_samples_own(backend):
    """An ensemble (torch.func.stack_module_state): each model its buffers."""
    x, labels, _ = _data(3)
    mean, std = torch.zeros(B, F, dtype=torch.float64), torch.ones(B, F, dtype=torch.float64)
    ref_mean, ref_std = mean.clone(), std.clone()
    vmap(
        lambda xb, lb, m, s: fused_iwn(
            xb, lb, running_mean=m, running_std=s, training=True, num_classes=C, momentum=0.3
        )
    )(x, labels, mean, std)
    for b in range(B):
        iwn_reference(
            x[b],
            labels[b],
            running_mean=ref_mean[b],
            running_std=ref_std[b],
            training=True,
            num_classes=C,
            momentum=0.3,
        )
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std, ref_std)
    assert not torch.equal(mean, torch.zeros_like(mean))


def test_vmap_eval_reads_shared_running_statistics(backend):
    x, _, _ = _data(4)
    mean, std = torch.randn(F, dtype=torch.float64), torch.rand(F, dtype=torch.float64) + 0.5
    got = vmap(lambda xb: fused_iwn(xb, running_mean=mean, running_std=std))(x)
    expected = torch.stack([iwn_reference(xb, running_mean=mean, running_std=std) for xb in x])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("iwn", [fused_iwn, iwn_reference], ids=["fused", "reference"])
def test_vmap_training_with_shared_running_statistics_is_refused_unchanged(backend, iwn):
    """Each sample would update the one buffer in turn: refused, as vmap
    refuses BatchNorm's, before any update."""
    x, labels, _ = _data(5)
    mean, std = torch.zeros(F, dtype=torch.float64), torch.ones(F, dtype=torch.float64)
    with pytest.raises(ValueError, match="running_mean / running_std .* not batched"):
        vmap(
            lambda xb, lb: iwn(
                xb, lb, running_mean=mean, running_std=std, training=True, num_classes=C
            )
        )(x, labels)
    assert torch.equal(mean, torch.zeros(F, dtype=torch.float64))
    assert torch.equal(std, torch.ones(F, dtype=torch.float64))


@pytest.mark.parametrize("iwn", [fused_iwn, iwn_reference], ids=["fused", "reference"])
def test_vmap_checks_each_sample(backend, iwn):
    x, labels, _ = _data(6)
    labels[2, 4] = C + 4
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        vmap(lambda xb, lb: iwn(xb, lb, training=True, num_classes=C))(x, labels)


def test_vmap_over_no_samples_gives_an_empty_batch_checked_and_differentiable(backend):
    x, labels, _ = _data(7)
    x = x[:0].clone().requires_grad_()
    got = vmap(lambda xb, lb: fused_iwn(xb, lb, training=True, num_classes=C))(x, labels[:0])
    assert got.shape == (0, N, F)
    got.sum().backward()  # as F.layer_norm's under vmap: a gradient of no rows
    assert x.grad.shape == x.shape
    assert vmap(lambda h: fused_surgical_gate(h, h, h))(x).shape == (0, N, F)
    with pytest.raises(ValueError, match=r"gate must have shape \(7,\)"):
        vmap(lambda xb: fused_iwn(xb, labels[0], gate=torch.zeros(3), training=True))(x)


def test_vmap_with_a_process_group_is_refused():
    """Each sample's call would be a collective: ranks vmapping other batch
    sizes would wait on each other. Refused before any collective (no
    process group needs to exist)."""
    x, labels, _ = _data(11)
    with pytest.raises(ValueError, match="process group"):
        vmap(
            lambda xb, lb: torch.ops.surgellm.iwn(
                xb, lb, training=True, num_classes=C, group_name="a group", group_size=2
            )
        )(x, labels)


def test_backward_through_vmap_of_fused_iwn(backend):
    """vmap of the forward, then ordinary autograd: the per-sample calls'
    backward, as the loop's."""
    x, labels, gate = _data(8)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    gates = [gate.clone().requires_grad_() for _ in range(2)]
    weight = torch.randn(B, N, F, dtype=torch.float64)
    y = vmap(lambda xb, lb: fused_iwn(xb, lb, gate=gates[0], training=True, num_classes=C))(
        xs[0], labels
    )
    (y * weight).sum().backward()
    y = torch.stack(
        [
            iwn_reference(xs[1][b], labels[b], gate=gates[1], training=True, num_classes=C)
            for b in range(B)
        ]
    )
    (y * weight).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(gates[0].grad, gates[1].grad)


def _gradient_transforms():
    x, labels, _ = _data(9)

    def iwn_loss(xb, lb):
        return fused_iwn(xb, lb, training=True, num_classes=C).pow(3).sum()

    def gate_loss(h):
        return fused_surgical_gate(h, h * 2, h).pow(3).sum()

    return [
        ("iwn grad", "fused_iwn", lambda: grad(iwn_loss)(x[0], labels[0])),
        ("iwn vjp", "fused_iwn", lambda: vjp(lambda a: iwn_loss(a, labels[0]), x[0])),
        ("iwn vmap of grad", "fused_iwn", lambda: vmap(grad(iwn_loss))(x, labels)),
        (
            "iwn grad of vmap",
            "fused_iwn",
            lambda: grad(lambda a: vmap(iwn_loss)(a, labels).sum())(x),
        ),
        ("gate grad", "fused_surgical_gate", lambda: grad(gate_loss)(x[0])),
        ("gate jacrev", "fused_surgical_gate", lambda: torch.func.jacrev(gate_loss)(x[0])),
    ]


@pytest.mark.parametrize("case", _gradient_transforms(), ids=lambda c: c[0])
def test_gradient_transforms_of_the_fused_ops_are_refused_naming_the_op(case, backend):
    _, op, call = case
    with pytest.raises(
        NotImplementedError, match=rf"{op}: torch.func transforms of its gradient .* reference"
    ):
        call()


def test_the_reference_takes_gradient_transforms():
    """What the refusal points to: grad of the reference, against autograd."""
    x, labels, gate = _data(10)

    def loss(a):
        return iwn_reference(a, labels[0], gate=gate, training=True, num_classes=C).pow(3).sum()

    a = x[0].clone().requires_grad_()
    loss(a).backward()
    torch.testing.assert_close(grad(loss)(x[0]), a.grad)


def test_the_reference_takes_gradient_transforms_with_running_statistics():
    """In training, the running statistics it updates (the checks read their
    memory for overlaps, which torch.func's wrappers hide: checked below them)."""
    x, labels, gate = _data(14)
    stats = [(torch.zeros(F), torch.ones(F)) for _ in range(2)]

    def loss(a, stats):
        return (
            iwn_reference(
                a,
                labels[0],
                running_mean=stats[0],
                running_std=stats[1],
                training=True,
                num_classes=C,
            )
            .pow(3)
            .sum()
        )

    a = x[0].clone().requires_grad_()
    loss(a, stats[0]).backward()
    torch.testing.assert_close(grad(loss)(x[0], stats[1]), a.grad)
    torch.testing.assert_close(stats[1][0], stats[0][0])  # updated once, alike


def test_the_references_gradient_per_sample_under_vmap():
    """Per-sample gradients, vmap(grad(...)), of the reference: its class
    sums read no key on the host (F.one_hot's range check did, which vmap
    refuses); against the loop over the samples."""
    x, labels, gate = _data(12)

    def loss(a, lb):
        return iwn_reference(a, lb, gate=gate, training=True, num_classes=C).pow(3).sum()

    got = vmap(grad(loss))(x, labels)
    torch.testing.assert_close(got, torch.stack([grad(loss)(x[b], labels[b]) for b in range(B)]))


def test_vmap_of_the_reference_over_no_samples():
    """Flattening the rows infers no -1 (ambiguous over zero samples)."""
    x, labels, gate = _data(13)
    got = vmap(lambda xb, lb: iwn_reference(xb, lb, gate=gate, training=True, num_classes=C))(
        x[:0], labels[:0]
    )
    assert got.shape == (0, N, F)
    gates = gate.expand(B, N, F)[:0]  # a gate per row, batched too
    got = vmap(lambda xb, lb, g: iwn_reference(xb, lb, gate=g, training=True, num_classes=C))(
        x[:0], labels[:0], gates
    )
    assert got.shape == (0, N, F)


@pytest.mark.parametrize("iwn", [fused_iwn, iwn_reference], ids=["fused", "reference"])
def test_vmap_with_task_ids_takes_the_given_task_count(backend, iwn):
    """With num_tasks, training over tasks needs no running statistics under
    vmap (the count is not read from the task ids), and per-sample gradients
    of the reference work so too."""
    x, labels, gate = _data(13)
    tasks = torch.arange(N).remainder(2).expand(B, N)

    def call(a, lb, tb):
        return iwn(a, lb, gate=gate, task_ids=tb, training=True, num_classes=C, num_tasks=2)

    expected = torch.stack([call(x[b], labels[b], tasks[b]) for b in range(B)])
    torch.testing.assert_close(vmap(call)(x, labels, tasks), expected)
    if iwn is iwn_reference:
        per_sample = vmap(grad(lambda a, lb, tb: call(a, lb, tb).pow(3).sum()))(x, labels, tasks)
        assert per_sample.shape == x.shape
