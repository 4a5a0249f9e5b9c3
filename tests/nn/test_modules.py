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
