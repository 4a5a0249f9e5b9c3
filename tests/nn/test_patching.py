"""patch_model on arbitrary modules: the swap shares Parameters and buffers,
is idempotent, reports what it did and why it skipped, and reverts exactly."""

import warnings

import pytest
import torch
from torch import nn

from surgellm_kernels import (
    FusedInstanceWeightedNorm,
    FusedSurgicalGate,
    InstanceWeightedNorm,
    SurgicalGate,
    backends,
    patch_model,
)

from _helpers import assert_close


class Toy(nn.Module):
    """References nested at several depths, in a Sequential, a ModuleList and
    a ModuleDict, one of them registered twice."""

    def __init__(self):
        super().__init__()
        self.norm = InstanceWeightedNorm(16, num_classes=3, num_tasks=2, affine=True, gate=True)
        self.blocks = nn.Sequential(nn.Linear(8, 8), SurgicalGate(8, num_features=16, num_tasks=2))
        self.more = nn.ModuleList([SurgicalGate(8, num_features=16, num_tasks=2)])
        self.by_name = nn.ModuleDict({"again": self.more[0]})
        self.head = nn.Linear(8, 2)

    def forward(self, h, s, labels, task_ids):
        s = self.norm(s, labels, task_ids)
        z = self.blocks[1](self.blocks[0](h), s, task_ids) + self.more[0](h, s, task_ids)
        return self.head(z)


def inputs(n=24):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, 8, generator=g),
        torch.randn(n, 16, generator=g),
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 2, (n,), generator=g),
    )


def test_swaps_share_parameters_and_buffers():
    torch.manual_seed(0)
    model = Toy()
    before = {k: (v, v.data_ptr(), v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before patching
    expected = Toy.forward(model, *inputs())

    report = patch_model(model)
    assert isinstance(model.norm, FusedInstanceWeightedNorm)
    assert isinstance(model.blocks[1], FusedSurgicalGate)
    assert isinstance(model.more[0], FusedSurgicalGate)
    assert model.by_name["again"] is model.more[0]  # one twin for the shared module
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for key, (tensor, ptr, shape) in before.items():
        assert after[key] is tensor and after[key].data_ptr() == ptr and after[key].shape == shape

    # the module registered twice is listed under both names
    assert sorted(report.backends) == ["blocks.1", "by_name.again", "more.0", "norm"]
    if backends("cpu")["cpu"].available:
        assert not report.eager
        assert all(v.startswith("cpu (") for v in report.backends.values())
    table = str(report)
    for text in (
        "module",
        "blocks.1",
        "more.0, by_name.again",
        "InstanceWeightedNorm",
        "FusedSurgicalGate",
        "3 swapped, 0 skipped",
    ):
        assert text in table

    # the same numbers, and the optimizer built before patching trains the patched model
    out = model(*inputs())
    assert_close(out, expected)
    out.square().mean().backward()
    weight = model.norm.gate_logits.detach().clone()
    optimizer.step()
    assert not torch.equal(model.norm.gate_logits, weight)


def test_idempotent_and_skips_with_reasons():
    model = Toy()
    patch_model(model)
    again = patch_model(model)
    assert not again.swaps
    assert {(k.name, k.reason) for k in again.skipped} == {
        ("norm", "already fused"),
        ("blocks.1", "already fused"),
        ("more.0", "already fused"),
    }

    class MyNorm(InstanceWeightedNorm):
        def forward(self, x, labels=None, task_ids=None):
            return super().forward(x, labels, task_ids) * 2

    holder = nn.Sequential(MyNorm(4, 2), InstanceWeightedNorm(4, 2))
    report = patch_model(holder)
    assert type(holder[0]) is MyNorm and isinstance(holder[1], FusedInstanceWeightedNorm)
    assert [(k.name, k.cls) for k in report.skipped] == [("0", "MyNorm")]
    assert "subclass of InstanceWeightedNorm" in report.skipped[0].reason
    assert "skipped: subclass" in str(report)

    class Tagged(InstanceWeightedNorm):  # no code of its own: still not swapped
        pass

    report = patch_model(nn.Sequential(Tagged(4, 2)))
    assert report.skipped[0].reason == (
        "subclass of InstanceWeightedNorm (swapping it would lose its class)"
    )

    root = InstanceWeightedNorm(4, 2)
    report = patch_model(root)
    assert not report.swaps and report.skipped[0].name == "(root)"
    assert "no InstanceWeightedNorm" in str(patch_model(nn.Linear(2, 2)))


def test_skip_reasons_name_the_synced_and_the_parametrized():
    """Both were called a subclass "with its own code"."""
    from torch.nn.utils import parametrize

    from surgellm_kernels.nn import SyncInstanceWeightedNorm

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrized = InstanceWeightedNorm(4, 2, affine=True)
    parametrize.register_parametrization(parametrized, "weight", Doubled())
    report = patch_model(nn.Sequential(SyncInstanceWeightedNorm(4, 2), parametrized))
    assert [k.reason for k in report.skipped] == [
        "already fused",
        "a parametrized InstanceWeightedNorm (torch.nn.utils.parametrize)",
    ]


def test_revert_restores_the_originals():
    model = Toy()
    originals = (model.norm, model.blocks[1], model.more[0])
    report = patch_model(model)
    model.eval()  # state changed while patched ...
    model.norm.fit(torch.randn(30, 16), torch.randint(0, 3, (30,)), torch.randint(0, 2, (30,)))
    report.revert()
    assert (model.norm, model.blocks[1], model.more[0]) == originals
    assert model.by_name["again"] is originals[2]
    assert type(model.norm) is InstanceWeightedNorm
    assert not model.norm.training and model.norm._frozen  # ... is carried back
    assert "(reverted)" in str(report)
    report.revert()  # twice is a no-op
    # a slot changed after patching: revert refuses, changing nothing
    report = patch_model(model)
    model.blocks[1] = nn.Identity()
    with pytest.raises(RuntimeError, match="cannot revert blocks.1"):
        report.revert()
    assert isinstance(model.norm, FusedInstanceWeightedNorm)


def test_backend_argument_and_failures_change_nothing(monkeypatch):
    model = Toy()
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(model, backend="fast")
    available = backends("cpu")
    wanted = "eager" if available["cpu"].available else "cpu"
    with pytest.raises(ValueError, match=f"backend='{wanted}' was asked for"):
        patch_model(model, backend=wanted)
    assert type(model.norm) is InstanceWeightedNorm  # nothing patched
    if available["cpu"].available:
        assert patch_model(model, backend="cpu").swaps
        model = Toy()
    monkeypatch.setenv("SURGELLM_BACKEND", "eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patch_model(model, backend="eager")
    assert sorted(report.eager) == ["blocks.1", "more.0", "norm"]
    # chosen, not missing: the report and the warning say which
    assert set(report.backends.values()) == {"eager (reference; SURGELLM_BACKEND=eager)"}
    assert any("SURGELLM_BACKEND=eager chooses it" in str(w.message) for w in caught)
    with pytest.raises(TypeError, match="nn.Module"):
        patch_model("model")


def test_compiled_model_is_refused():
    model = nn.Sequential(torch.compile(nn.Sequential(InstanceWeightedNorm(4, 2))))
    with pytest.raises(ValueError, match="patch before torch.compile"):
        patch_model(model)
    assert type(model[0]._orig_mod[0]) is InstanceWeightedNorm
    in_place = nn.Sequential(InstanceWeightedNorm(4, 2))
    in_place[0].compile()
    with pytest.raises(ValueError, match="patch before torch.compile"):
        patch_model(in_place)


def test_revert_refuses_a_module_changed_in_ways_it_cannot_carry_back():
    """A parametrization or weight_norm on a patched or converted module, or
    an in-place compile of it, made revert half-apply (a TypeError after
    other modules were put back; then never revertible), restore a broken
    original, or leave the fused forward running. Revert refuses, changing
    nothing, and works once the change is undone."""
    from torch.nn.utils import parametrize

    from surgellm_kernels import convert_to_iwn

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    def parametrized(module):
        parametrize.register_parametrization(module, "weight", Doubled())
        return lambda: parametrize.remove_parametrizations(module, "weight")

    def weight_normed(module):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old hook-based form
            nn.utils.weight_norm(module, dim=None)
        return lambda: nn.utils.remove_weight_norm(module)

    def compiled(module):
        module.compile()

        def undo():
            module._compiled_call_impl = None

        return undo

    def patched():
        model = nn.Sequential(InstanceWeightedNorm(4, 2, affine=True), SurgicalGate(8, 4))
        return model, patch_model(model), model[0]

    def converted():
        model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4))
        return model, convert_to_iwn(model, num_classes=2), model[1]

    cases = [
        (patched, parametrized, "its class changed"),
        (patched, compiled, "compiled in place"),
        (converted, parametrized, "its class changed"),
        (converted, weight_normed, "weight is no longer a Parameter"),
    ]
    for build, change, match in cases:
        model, report, module = build()
        undo = change(module)
        slots = list(model)
        with pytest.raises(RuntimeError, match=match):
            report.revert()
        assert list(model) == slots and not report.reverted
        undo()
        report.revert()
        assert report.reverted and all(type(m) is type(s.old) for m, s in zip(model, report.swaps))
        x = torch.randn(6, 4)
        if build is converted:
            model.train()(x)  # BatchNorms again, with their Parameters
        else:
            model[0].train()(x, torch.tensor([0, 1] * 3))


def test_revert_carries_back_a_pruned_twin():
    """A twin goes back by its attributes, which carry a weight computed by
    a hook (pruning): revert takes it (refusing it was a false alarm)."""
    from torch.nn.utils import prune

    model = nn.Sequential(InstanceWeightedNorm(4, 2, affine=True))
    report = patch_model(model)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    x, labels = torch.randn(6, 4), torch.tensor([0, 1] * 3)
    expected = model[0](x, labels)
    report.revert()
    assert type(model[0]) is InstanceWeightedNorm
    assert_close(model[0].train()(x, labels), expected)


def test_convert_to_reference_layers_says_it_was_asked_for():
    """fused=False: the report named a missing kernel (or SURGELLM_BACKEND)."""
    from surgellm_kernels import convert_to_iwn

    report = convert_to_iwn(nn.Sequential(nn.BatchNorm1d(4)), num_classes=2, fused=False)
    assert report.backends == {"0": "eager (reference layers: fused=False)"}
