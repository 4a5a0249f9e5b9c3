"""A model using the fused op compiles with fullgraph=True (no graph break)."""

import pytest
import torch

from surgellm_kernels import FusedInstanceWeightedNorm

from _helpers import assert_close, cpu_backends


class Classifier(torch.nn.Module):
    def __init__(self, F=16, C=4):
        super().__init__()
        self.proj = torch.nn.Linear(F, F)
        self.iwn = FusedInstanceWeightedNorm(F, C, num_tasks=2, affine=True, gate=True)
        self.head = torch.nn.Linear(F, C)

    def forward(self, x, labels, tasks):
        return self.head(self.iwn(self.proj(x), labels, tasks))


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_compile_fullgraph_forward_backward(backend, force_backend):
    force_backend(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Classifier()
    compiled_model = Classifier()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(24, 16)
        labels = torch.randint(0, 4, (24,))
        tasks = torch.randint(0, 2, (24,))
        out_e, out_c = eager(x, labels, tasks), compiled(x, labels, tasks)
        assert_close(out_c, out_e)
        torch.nn.functional.cross_entropy(out_e, labels).backward()
        torch.nn.functional.cross_entropy(out_c, labels).backward()
    for p_e, p_c in zip(eager.parameters(), compiled_model.parameters()):
        assert_close(p_c.grad, p_e.grad)
    assert_close(compiled_model.iwn.running_mean, eager.iwn.running_mean)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
def test_fake_tensor_shapes_of_the_ops():
    """The op and each of its phases run on fake tensors (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.surgellm
    with FakeTensorMode():
        x = torch.empty(2, 5, 6)
        labels = torch.zeros(2, 5, dtype=torch.long)
        rm, rs = torch.zeros(6), torch.ones(6)
        assert ops.iwn(
            x, labels, running_mean=rm, running_std=rs, training=True, num_classes=3
        ).shape == (2, 5, 6)
        x2 = x.reshape(10, 6)
        keys = ops._iwn_group_keys(labels.reshape(-1), None, 1, 3)
        count, mean, m2, residual = ops._iwn_group_moments(x2, keys, None, 3)
        merged = ops._iwn_merge_moments(
            count.expand(4, 3), mean.expand(4, 3, 6), m2.expand(4, 3, 6), residual.expand(4, 3, 6)
        )
        group_std, mu, sigma = ops._iwn_combine(
            count, mean, m2, residual, 1, False, 0.1, None, None
        )
        assert [tuple(t.shape) for t in (keys, count, mean, residual, group_std, mu, sigma)] == [
            (10,),
            (3,),
            (3, 6),
            (3, 6),
            (3, 6),
            (1, 6),
            (1, 6),
        ]
        assert [tuple(t.shape) for t in merged] == [(3,), (3, 6), (3, 6), (3, 6)]
        sums = ops._iwn_task_sums(x2, x2, keys, None, mu, 3)
        coefs = ops._iwn_coefficients(
            sums, None, None, count, mean, group_std, residual, mu, sigma, False, 1e-5
        )
        assert [tuple(t.shape) for t in coefs] == [(1, 6), (3, 6), (3, 6), (3, 6), (6,), (6,), (6,)]
        dx, dgate = ops._iwn_input_grad(x2, x2, keys, None, *coefs[:4], coefs[6], 3, True)
        assert dx.shape == (10, 6) and dgate.shape == (0,)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_compile_with_changing_batch_size(backend, force_backend):
    """A recompile with dynamic shapes traces the op with symbolic sizes."""
    force_backend(backend)
    torch._dynamo.reset()
    eager, model = Classifier(), Classifier()
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for n in (24, 31):
        x, labels, tasks = torch.randn(n, 16), torch.randint(0, 4, (n,)), torch.randint(0, 2, (n,))
        assert_close(compiled(x, labels, tasks), eager(x, labels, tasks))


def test_compile_before_any_eager_call():
    """A fresh process whose first call is traced by torch.compile: backend
    discovery must not import anything while tracing, nor leave a guard
    that compiles the second call again (the backend cache filled by the
    trace did)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from surgellm_kernels import FusedInstanceWeightedNorm, InstanceWeightedNorm
        fused, ref = FusedInstanceWeightedNorm(8, 3), InstanceWeightedNorm(8, 3)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        x, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
        for _ in range(2):
            assert torch.allclose(compiled(x, labels), ref(x, labels), atol=1e-5)
        assert torch.allclose(fused.running_mean, ref.running_mean)
        assert torch.allclose(fused.running_std, ref.running_std)
        from torch._dynamo.utils import counters
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_reference_module_keeps_the_range_checks(compiler):
    """The reference modules check label and task-id ranges with the op's own
    check, an op that returns nothing, which compiled graphs dropped: a label
    past task 0's classes then keyed task 1's class 0, silently."""
    from surgellm_kernels import InstanceWeightedNorm

    x, tasks = torch.randn(8, 4), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    bad_labels, bad_tasks = labels.clone(), tasks.clone()
    bad_labels[0], bad_tasks[1] = 3, 2
    cases = [((x, bad_labels, tasks), "labels must lie in"), ((x, labels, bad_tasks), "task_ids")]
    # a graph compiled before the check was kept may sit in the disk cache
    with torch._inductor.config.patch(force_disable_caches=True):
        for args, message in cases:
            torch._dynamo.reset()
            norm = InstanceWeightedNorm(4, 3, num_tasks=2)
            compiled = torch.compile(norm, fullgraph=True, backend=compiler)
            compiled(x, labels, tasks)
            before = norm.running_mean.clone(), norm.running_std.clone()
            with pytest.raises(ValueError, match=message):
                compiled(*args)
            assert torch.equal(norm.running_mean, before[0])  # a failed call changes nothing
            assert torch.equal(norm.running_std, before[1])


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
def test_compiled_reference_module_raises_its_argument_errors_as_the_fused_one(caplog):
    """Argument errors are raised while tracing, with no failed-kernel error
    logged by the fake-tensor mode first (as the fused module's)."""
    import logging

    from surgellm_kernels import InstanceWeightedNorm

    x, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for cls in (InstanceWeightedNorm, FusedInstanceWeightedNorm):
        torch._dynamo.reset()
        compiled = torch.compile(cls(4, 3, num_tasks=2), fullgraph=True, backend="aot_eager")
        caplog.clear()
        with caplog.at_level(logging.ERROR), pytest.raises(Exception, match="task_ids must have"):
            compiled(x, labels, torch.zeros(5, dtype=torch.long))
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], cls.__name__


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_compile_training_with_task_ids_and_no_running_statistics(backend, force_backend):
    """The task count, given as num_tasks, need not be read from the task ids:
    the functional and a layer that tracks no running statistics compile
    whole, and give what they give eagerly."""
    from surgellm_kernels import FusedInstanceWeightedNorm1d, fused_iwn

    force_backend(backend)
    torch._dynamo.reset()
    x, labels = torch.randn(12, 5, 3), torch.randint(0, 3, (12,))
    tasks = torch.tensor([0, 1] * 6)

    def call(x, labels, tasks):
        return fused_iwn(
            x.transpose(1, 2),
            labels.view(12, 1).expand(12, 3),
            task_ids=tasks.view(12, 1).expand(12, 3),
            training=True,
            num_classes=3,
            num_tasks=2,
        )

    assert_close(torch.compile(call, fullgraph=True)(x, labels, tasks), call(x, labels, tasks))
    layer = FusedInstanceWeightedNorm1d(5, 3, num_tasks=2, track_running_stats=False)
    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(x, labels, tasks), layer(x, labels, tasks))
    with pytest.raises(Exception, match=r"task_ids must lie in \[0, 2\)"):
        compiled(x, labels, tasks + 1)
