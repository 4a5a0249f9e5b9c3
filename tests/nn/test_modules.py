"""The fused modules are drop-in twins of the reference modules."""

import pytest
import torch

from surgellm_kernels import (
    FusedInstanceWeightedNorm,
    FusedSurgicalGate,
    InstanceWeightedNorm,
    SurgicalGate,
)

from _helpers import assert_close, device_backends


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("std_mode", ["class_mean", "pooled"])
def test_iwn_module_training_steps_match_reference(backend, device, std_mode, force_backend):
    force_backend(backend)
    torch.manual_seed(0)
    F, C, T = 12, 5, 2
    kwargs = dict(num_tasks=T, affine=True, gate=True, std_mode=std_mode)
    ref = InstanceWeightedNorm(F, C, **kwargs).double().to(device)
    fused = FusedInstanceWeightedNorm(F, C, **kwargs).double().to(device)
    with torch.no_grad():
        ref.gate_logits.normal_()
        ref.weight.normal_()
    assert ref.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    for step in range(4):
        x = (torch.randn(3, 10, F, dtype=torch.float64) * (step + 1)).to(device)
        labels = torch.randint(0, C, (3, 10)).to(device)
        tasks = torch.randint(0, T, (3, 10)).to(device)
        outs = []
        for module, opt in ((ref, opt_ref), (fused, opt_fused)):
            opt.zero_grad()
            y = module(x, labels, tasks)
            (
                y * torch.linspace(-1, 1, F, dtype=torch.float64, device=device)
            ).square().sum().backward()
            outs.append((y.detach(), [p.grad.clone() for p in module.parameters()]))
            opt.step()
        assert_close(outs[1][0], outs[0][0])
        for g_fused, g_ref in zip(outs[1][1], outs[0][1]):
            assert_close(g_fused, g_ref)
    for name, value in ref.state_dict().items():
        assert_close(fused.state_dict()[name].double(), value.double())
    # eval uses the running statistics the steps produced
    ref.eval()
    fused.eval()
    x = torch.randn(7, F, dtype=torch.float64).to(device)
    tasks = torch.randint(0, T, (7,)).to(device)
    assert_close(fused(x, task_ids=tasks), ref(x, task_ids=tasks))


@pytest.mark.parametrize("backend,device", device_backends())
def test_fitted_statistics_load_into_fused_module(backend, device, force_backend):
    force_backend(backend)
    x = torch.randn(200, 16).to(device)
    labels = torch.randint(0, 3, (200,)).to(device)
    ref = InstanceWeightedNorm(16, 3).to(device).fit(x, labels)
    fused = FusedInstanceWeightedNorm(16, 3).to(device)
    fused.load_state_dict(ref.state_dict())
    assert bool(fused.statistics_frozen)
    fused.train()
    ref.train()
    assert_close(fused(x[:20], labels[:20]), ref(x[:20], labels[:20]))


def test_surgical_gate_twin():
    torch.manual_seed(1)
    ref = SurgicalGate(32, num_features=16, num_tasks=3)
    fused = FusedSurgicalGate(32, num_features=16, num_tasks=3)
    fused.load_state_dict(ref.state_dict())
    h, s = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    tasks = torch.randint(0, 3, (2, 5))
    z_ref, z_fused = ref(h, s, tasks), fused(h, s, tasks)
    assert_close(z_fused, z_ref)
    z_ref.sum().backward()
    z_fused.sum().backward()
    for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
        assert_close(p_fused.grad, p_ref.grad)


def fitted_and_a_batch(cls):
    """A module fitted on data far from 0 and 1, a training batch, and what
    the fitted statistics make of it."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(100, 3, generator=g, dtype=torch.float64) * 4 + 10
    fitted = cls(3, num_classes=2).double().fit(data, torch.arange(100) % 2)
    x, labels = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1] * 3)
    return fitted, x, labels, (x - fitted.running_mean) / (fitted.running_std + 1e-5)


@pytest.mark.parametrize("cls", [InstanceWeightedNorm, FusedInstanceWeightedNorm])
def test_the_frozen_flag_decides_however_the_buffers_were_written(cls):
    # fit, load_state_dict, a copy into the buffers (as DistributedDataParallel's
    # buffer sync makes), torch.func.functional_call: the statistics_frozen
    # buffer says whether training mode uses the fitted statistics.
    fitted, x, labels, expected = fitted_and_a_batch(cls)
    copied = cls(3, num_classes=2).double()
    copied(x, labels)  # a call before the copy: batch statistics
    with torch.no_grad():
        for mine, theirs in zip(copied.buffers(), fitted.buffers()):
            mine.copy_(theirs)
    assert_close(copied(x, labels), expected)
    fresh = cls(3, num_classes=2).double()
    state = {k: v.clone() for k, v in fitted.state_dict().items()}
    assert_close(torch.func.functional_call(fresh, state, (x, labels)), expected)
    unfitted = cls(3, num_classes=2).double().state_dict()
    batch = torch.func.functional_call(fitted, unfitted, (x, labels))
    assert not torch.allclose(batch, expected)  # the unfitted state's flag: batch statistics
    assert_close(fitted(x, labels), expected)  # and the module's own again
    with torch.no_grad():
        copied.statistics_frozen.fill_(False)
    assert not torch.allclose(copied(x, labels), expected)


def test_the_frozen_flag_off_the_cpu_is_read_when_it_changes(monkeypatch):
    # As on a GPU (reading the flag is a host sync there): read again when
    # the buffer is another tensor or its version moved, not on every call.
    monkeypatch.setattr(InstanceWeightedNorm, "_read_on_every_call", staticmethod(lambda f: False))
    fitted, x, labels, expected = fitted_and_a_batch(InstanceWeightedNorm)
    module = InstanceWeightedNorm(3, num_classes=2).double()
    module.running_mean.copy_(fitted.running_mean)
    module.running_std.copy_(fitted.running_std)
    module(x, labels)
    module.statistics_frozen.data.fill_(True)  # no version change: not seen
    assert not torch.allclose(module(x, labels), expected)
    module.running_mean.copy_(fitted.running_mean)
    module.running_std.copy_(fitted.running_std)
    module.statistics_frozen.copy_(torch.tensor(True))  # a tensor op: seen
    assert_close(module(x, labels), expected)
    fresh = InstanceWeightedNorm(3, num_classes=2).double()
    state = {k: v.clone() for k, v in fitted.state_dict().items()}
    assert_close(torch.func.functional_call(fresh, state, (x, labels)), expected)


def test_built_and_loaded_in_inference_mode():
    with torch.inference_mode():
        module = FusedInstanceWeightedNorm(3, num_classes=2)
        data = torch.randn(20, 3)
        module.load_state_dict(
            InstanceWeightedNorm(3, 2).fit(data, torch.arange(20) % 2).state_dict()
        )
        x = torch.randn(4, 3)
        assert_close(module.train()(x, torch.tensor([0, 1, 0, 1])), module.eval()(x))


@pytest.mark.parametrize("cls", [InstanceWeightedNorm, SurgicalGate])
def test_device_and_dtype_as_torch_nn_layers_take_them(cls):
    module = cls(8, 3, dtype=torch.float64, device="meta")
    assert {(t.dtype, t.device.type) for t in module.parameters()} | {
        (t.dtype, t.device.type) for t in module.buffers() if t.is_floating_point()
    } == {(torch.float64, "meta")}


@pytest.mark.parametrize(
    "sizes,named",
    [((0, 4), "d_model"), ((8, 0), "num_features"), ((8, 4, 0), "num_tasks"), ((8, 2.0), "num")],
)
def test_surgical_gate_sizes_are_checked_when_built(sizes, named):
    """num_tasks=0 failed at the first call, in index_select, naming nothing."""
    with pytest.raises(ValueError, match=f"{named}.* must be a positive int"):
        SurgicalGate(*sizes)


def test_sizes_of_numpy_integers_as_torch_nn_layers_take_them():
    """num_classes = labels.max() + 1 of a numpy array is a numpy integer:
    nn.BatchNorm2d and nn.Linear take it, and so do these modules (kept as
    Python ints); floats and bools are still refused."""
    import numpy as np

    from surgellm_kernels import FusedInstanceWeightedNorm2d, convert_to_iwn

    norm = FusedInstanceWeightedNorm2d(np.int64(3), np.int64(2))
    gate = SurgicalGate(np.int32(8), np.int64(4))
    iwn = InstanceWeightedNorm(np.int16(4), np.int64(2))
    sizes = (norm.num_features, norm.num_classes, gate.d_model, gate.num_features, iwn.num_features)
    assert sizes == (3, 2, 8, 4, 4) and all(type(v) is int for v in sizes)
    y = norm(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]))
    assert y.shape == (4, 3, 2, 2)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(np.int64(3)))
    model.append(torch.nn.BatchNorm2d(3))
    convert_to_iwn(model, num_classes=np.int64(2))
    assert type(model[1].num_classes) is int
    for bad in (np.float64(2.0), np.bool_(True), True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            InstanceWeightedNorm(4, bad)


@pytest.mark.parametrize("cls", [InstanceWeightedNorm, FusedInstanceWeightedNorm])
def test_meta_and_fake_tensors_as_batchnorm_takes_them(cls):
    """Training forward on the meta device and under FakeTensorMode, and a
    module built on meta loading a fitted state, read the flag's data: they
    raised (BatchNorm1d runs all three)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, labels = torch.randn(32, 8), torch.arange(32) % 3
    assert cls(8, 3).to("meta")(x.to("meta"), labels.to("meta")).shape == (32, 8)
    layer = cls(8, 3)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert layer(mode.from_tensor(x), mode.from_tensor(labels)).shape == (32, 8)
    fitted = InstanceWeightedNorm(8, 3).fit(x, labels)
    with torch.device("meta"):
        built = cls(8, 3)
    built.load_state_dict(fitted.state_dict())
    built = built.to_empty(device="cpu")
    built.load_state_dict(fitted.state_dict())
    # fitted statistics in training too
    assert_close(built(x, labels), fitted.eval()(x))


@pytest.mark.parametrize("cls", [SurgicalGate, FusedSurgicalGate])
def test_surgical_gate_on_meta_and_fake_tensors(cls):
    """The task ids' range check read their values: it raised on both."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, s, task_ids = torch.randn(3, 8), torch.randn(3, 4), torch.tensor([0, 1, 1])
    meta = [t.to("meta") for t in (h, s, task_ids)]
    assert cls(8, 4, num_tasks=2).to("meta")(*meta).shape == (3, 8)
    gate = cls(8, 4, num_tasks=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert gate(*(mode.from_tensor(t) for t in (h, s, task_ids))).shape == (3, 8)


def test_vmap_over_stacked_states_uses_the_flag_last_read():
    import copy

    from torch.func import functional_call, stack_module_state

    fitted = (
        InstanceWeightedNorm(3, 2)
        .double()
        .fit(torch.randn(50, 3, dtype=torch.float64), torch.arange(50) % 2)
    )
    params, buffers = stack_module_state([copy.deepcopy(fitted) for _ in range(2)])
    base = copy.deepcopy(fitted).to("meta")
    x, labels = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])

    def call(p, b, x):
        return functional_call(base, (p, b), (x, labels))

    y = torch.vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    assert_close(y[0], fitted(x, labels))


@pytest.mark.parametrize("gate_class", [SurgicalGate, FusedSurgicalGate])
def test_vmap_over_samples_of_a_multi_task_gate(gate_class):
    """Each sample's task ids batched by vmap: the range check cannot read a
    batched id; the outputs, and the reference's per-sample gradients
    (vmap(grad(...))), are those of a loop over samples."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    gate = gate_class(6, 4, num_tasks=2).double()
    h, s = torch.randn(5, 3, 6, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    task_ids = torch.randint(0, 2, (5, 3))
    with torch.no_grad():
        z = torch.vmap(gate)(h, s, task_ids)
        for i in range(5):
            assert_close(z[i], gate(h[i], s[i], task_ids[i]), name=f"sample {i}")
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        gate(h[0], s[0], torch.tensor([0, 2, 1]))  # unbatched: still checked

    params = {k: v.detach() for k, v in gate.named_parameters()}

    def loss(p, h, s, t):
        return functional_call(gate, p, (h, s, t)).square().sum()

    per_sample = torch.func.vmap(grad(loss), in_dims=(None, 0, 0, 0))
    if gate_class is FusedSurgicalGate:  # the fused op refuses torch.func's grad, clearly
        with pytest.raises(NotImplementedError, match="torch.func transforms"):
            per_sample(params, h, s, task_ids)
        return
    grads = per_sample(params, h, s, task_ids)
    for i in range(5):
        want = grad(loss)(params, h[i], s[i], task_ids[i])
        for name in params:
            assert_close(grads[name][i], want[name], name=f"{name}, sample {i}")
