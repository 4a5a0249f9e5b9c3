"""Bad input gets a clear error naming the argument, on every entry point."""
import pytest
import torch

from surgellm_kernels import InstanceWeightedNorm, fused_iwn, fused_surgical_gate
from surgellm_kernels.reference import iwn_reference

from _bad_inputs import (BAD_IWN_CALLS, BAD_SURGICAL_GATE_CALLS, H, LABELS, RM, RS,
                         SYNCED_BAD_IWN_CALLS, X)
from _helpers import cpu_backends



@pytest.fixture(params=cpu_backends() + ["reference"])
def iwn(request, force_backend):
    if request.param == "reference":
        return iwn_reference
    force_backend(request.param)
    return fused_iwn


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=LABELS.int()), TypeError, "labels must be an int64"),
    (dict(labels=LABELS.float()), TypeError, "labels must be an int64"),
    (dict(labels=LABELS[:5]), ValueError, r"labels must have shape \(6,\)"),
    (dict(labels=torch.tensor([0, 1, 0, 1, 2, 3]), num_classes=3), ValueError,
     r"labels must lie in \[0, 3\), got values in \[0, 3\]"),
    (dict(labels=torch.tensor([0, -1, 0, 1, 2, 2])), ValueError, r"labels must lie in"),
    (dict(labels=None), ValueError, "labels are required in training"),
    (dict(labels=LABELS, gate=torch.zeros(5)), ValueError, r"gate must have shape \(4,\)"),
    (dict(labels=LABELS, gate=torch.zeros(6, 4, dtype=torch.float64)), TypeError,
     "per-instance gate must have the dtype of x"),
    (dict(labels=LABELS, weight=torch.ones(3)), ValueError, r"weight must have shape \(4,\)"),
    (dict(labels=LABELS, bias=torch.ones(4, dtype=torch.int64)), TypeError, "bias must be a floating"),
    (dict(labels=LABELS, running_mean=RM), ValueError, "running_mean and running_std must be given together"),
    (dict(labels=LABELS, std_mode="median"), ValueError, "std_mode must be one of"),
    (dict(labels=LABELS, task_ids=torch.tensor([0, 1, 0, 1, 0, 5]),
          running_mean=torch.zeros(2, 4), running_std=torch.ones(2, 4)), ValueError,
     r"task_ids must lie in \[0, 2\)"),
    (dict(labels=LABELS, running_mean=torch.zeros(2, 4), running_std=torch.ones(2, 4)),
     ValueError, "task_ids .* are required"),
    (dict(labels=LABELS, momentum=1.5), ValueError, "momentum"),
])
def test_training_argument_errors(iwn, kwargs, error, match):
    with pytest.raises(error, match=match):
        iwn(X, training=True, **kwargs)


def test_eval_task_ids_out_of_range(iwn):
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 1\), got values in \[0, 5\]"):
        iwn(X, task_ids=torch.tensor([0, 0, 1, 0, 0, 5]), running_mean=torch.zeros(1, 4),
            running_std=torch.ones(1, 4))


def test_integer_x_and_scalar_x(iwn):
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        iwn(torch.ones(6, 4, dtype=torch.int64), LABELS, training=True)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        iwn(torch.tensor(1.0), training=False, running_mean=RM, running_std=RS)


def test_eval_needs_running_statistics(iwn):
    with pytest.raises(ValueError, match="running_mean and running_std are required"):
        iwn(X, training=False)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        iwn(X, running_mean=torch.zeros(5), running_std=torch.ones(5))


@pytest.mark.skipif(not hasattr(torch, "device"), reason="always runs")
def test_mixed_devices_are_named(iwn):
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="gate is on meta but x is on cpu"):
        iwn(X, LABELS, gate=meta, training=True)
    with pytest.raises(ValueError, match="labels is on meta"):
        iwn(X, LABELS.to("meta"), training=True)


def test_module_errors():
    norm = InstanceWeightedNorm(4, num_classes=3).train()
    with pytest.raises(ValueError, match="labels are required"):
        norm(X)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        InstanceWeightedNorm(4, num_classes=0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        norm.partial_fit(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_surgical_gate_errors():
    h = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"s must have the shape of h"):
        fused_surgical_gate(h, torch.randn(2, 3), h)
    with pytest.raises(TypeError, match="gate_logits must be a floating"):
        fused_surgical_gate(h, h, torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        fused_surgical_gate(h, h, h, weight=torch.ones(3))


# -- the eager call's C++ checks against the Python ones -------------------------------

def _iwn_args(x=X, labels=LABELS, gate=None, weight=None, bias=None, running_mean=RM,
              running_std=RS, task_ids=None, training=True, momentum=0.1, eps=1e-5,
              std_mode="class_mean", num_classes=None):
    """The 13 arguments in the order check_iwn_args and _C.fused_iwn take them."""
    return (x, labels, gate, weight, bias, running_mean, running_std, task_ids, training,
            momentum, eps, std_mode, num_classes)


def _raised(fn, args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", [*BAD_IWN_CALLS, *SYNCED_BAD_IWN_CALLS])
def test_cpp_checks_raise_what_the_python_checks_raise(case):
    from surgellm_kernels import _backend
    from surgellm_kernels._checks import check_iwn_args

    synced = case in SYNCED_BAD_IWN_CALLS
    args = _iwn_args(**(SYNCED_BAD_IWN_CALLS if synced else BAD_IWN_CALLS)[case])
    group = ("a group", 2) if synced else (None, 1)  # the checks fail before any collective
    assert (_raised(_backend.extension().fused_iwn, (*args, *group)) ==
            _raised(lambda *a: check_iwn_args(*a, synced=synced), args))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", BAD_SURGICAL_GATE_CALLS)
def test_cpp_surgical_gate_checks_raise_what_the_python_checks_raise(case):
    from surgellm_kernels import _backend
    from surgellm_kernels._checks import check_surgical_gate_args

    given = dict(dict(h=H, s=H, gate_logits=H, weight=None, bias=None, eps=1e-5),
                 **BAD_SURGICAL_GATE_CALLS[case])
    args = tuple(given[k] for k in ("h", "s", "gate_logits", "weight", "bias", "eps"))
    assert (_raised(_backend.extension().fused_surgical_gate, args) ==
            _raised(check_surgical_gate_args, args))


def test_readme_lists_every_bad_input_as_raised_today():
    """The README's table is what the calls raise now (regenerate it with
    `.venv/bin/python tests/_bad_inputs.py`)."""
    from pathlib import Path

    import _bad_inputs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme.split("<!-- bad-inputs -->\n")[1].split("\n<!-- /bad-inputs -->")[0]
    assert shown == _bad_inputs.table()
    assert shown.count("\n") - 1 >= 20
