"""Bad input gets a clear error naming the argument, on every entry point:
the fused ops on every backend that checks (the compiled ones: the checks
are the op's, in C++), direct torch.ops calls and torch.compile's trace."""

import pytest
import torch

from surgellm_kernels import (
    InstanceWeightedNorm,
    InstanceWeightedNorm2d,
    fused_iwn,
    fused_surgical_gate,
)
from surgellm_kernels.ops.reference import iwn_reference, surgical_gate_reference

from _bad_inputs import (
    BAD_IWN_CALLS,
    BAD_SURGICAL_GATE_CALLS,
    DATA_BAD_IWN_CALLS,
    LABELS,
    RM,
    RS,
    SYNCED_BAD_IWN_CALLS,
    H,
    X,
    iwn_call,
)
from _helpers import assert_close, cpu_backends


@pytest.fixture(params=cpu_backends() + ["reference"])
def iwn(request, force_backend):
    """fused_iwn on each kernel backend, and the reference (which runs the
    op's own checks)."""
    if request.param == "reference":
        return iwn_reference
    force_backend(request.param)
    return fused_iwn


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(labels=LABELS.int()), TypeError, "labels must be an int64"),
        (dict(labels=LABELS.float()), TypeError, "labels must be an int64"),
        (dict(labels=LABELS[:5]), ValueError, r"labels must have shape \(6,\)"),
        (
            dict(labels=torch.tensor([0, 1, 0, 1, 2, 3]), num_classes=3),
            ValueError,
            r"labels must lie in \[0, 3\), got values in \[0, 3\]",
        ),
        (dict(labels=torch.tensor([0, -1, 0, 1, 2, 2])), ValueError, r"labels must lie in"),
        (dict(labels=None), ValueError, "labels are required in training"),
        (dict(labels=LABELS, gate=torch.zeros(5)), ValueError, r"gate must have shape \(4,\)"),
        (
            dict(labels=LABELS, gate=torch.zeros(6, 4, dtype=torch.float64)),
            TypeError,
            "per-instance gate must have the dtype of x",
        ),
        (dict(labels=LABELS, weight=torch.ones(3)), ValueError, r"weight must have shape \(4,\)"),
        (
            dict(labels=LABELS, bias=torch.ones(4, dtype=torch.int64)),
            TypeError,
            "bias must be a floating",
        ),
        (
            dict(labels=LABELS, running_mean=RM),
            ValueError,
            "running_mean and running_std must be given together",
        ),
        (dict(labels=LABELS, std_mode="median"), ValueError, "std_mode must be one of"),
        (
            dict(
                labels=LABELS,
                task_ids=torch.tensor([0, 1, 0, 1, 0, 5]),
                running_mean=torch.zeros(2, 4),
                running_std=torch.ones(2, 4),
            ),
            ValueError,
            r"task_ids must lie in \[0, 2\)",
        ),
        (
            dict(labels=LABELS, running_mean=torch.zeros(2, 4), running_std=torch.ones(2, 4)),
            ValueError,
            "task_ids .* are required",
        ),
        (dict(labels=LABELS, momentum=1.5), ValueError, "momentum"),
    ],
)
def test_training_argument_errors(iwn, kwargs, error, match):
    with pytest.raises(error, match=match):
        iwn(X, training=True, **kwargs)


def test_eval_task_ids_out_of_range(iwn):
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 1\), got values in \[0, 5\]"):
        iwn(
            X,
            task_ids=torch.tensor([0, 0, 1, 0, 0, 5]),
            running_mean=torch.zeros(1, 4),
            running_std=torch.ones(1, 4),
        )


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
    # BatchNorm's momentum=None (a cumulative average over batches) is the
    # channels-first layers', with one task: one batch count for several
    # tasks would average a task missing from a batch as if it were there
    with pytest.raises(ValueError, match="momentum must be a number in"):
        InstanceWeightedNorm(4, num_classes=3, momentum=None)
    with pytest.raises(ValueError, match="momentum=None .* needs num_tasks=1"):
        InstanceWeightedNorm2d(4, num_classes=3, num_tasks=2, momentum=None)
    assert InstanceWeightedNorm2d(4, num_classes=3, momentum=None).momentum is None
    with pytest.raises(ValueError, match="num_classes must be a positive int, got True"):
        InstanceWeightedNorm2d(4, num_classes=True)


def test_surgical_gate_errors():
    h = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"s must have the shape of h"):
        fused_surgical_gate(h, torch.randn(2, 3), h)
    with pytest.raises(TypeError, match="gate_logits must be a floating"):
        fused_surgical_gate(h, h, torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        fused_surgical_gate(h, h, h, weight=torch.ones(3))


# -- every bad input: one check (in C++), the same error on every path -----------------

# The argument each bad call is about, where the case's first word is not it.
_NAMED = {
    "running shapes differ": "running_std",
    "running 3-d": "running_mean",
    "eval without statistics": "running_mean",
    "synced: no rows, num_classes missing": "num_classes",
    "num_classes from negative labels": "labels",
}
# Python values the schema cannot convert: the dispatcher's own message names
# the argument and the type it expects.
_NOT_CONVERTIBLE = {
    "x not a tensor",
    "std_mode not a str",
    "eps a str",
    "momentum None",
    "gate not a tensor",
    "weight not a tensor",
    "labels not a tensor",
    "num_classes float",
    "h not a tensor",
    "bias not a tensor",
}


def _argument(case):
    name = _NAMED.get(case, case.removeprefix("synced: ").split()[0])
    return name


def _raised(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


def _assert_names_the_argument(case, error):
    if case in _NOT_CONVERTIBLE:
        assert isinstance(error, RuntimeError)
        assert f"for argument '{_argument(case)}'" in str(error), str(error)
    else:
        assert type(error) in (ValueError, TypeError), repr(error)
        assert _argument(case) in str(error), str(error)


def _synced_op_call(kwargs):
    """torch.ops.surgellm.iwn with a group of two ranks: its checks fail
    before any collective, so no process group needs to exist."""
    call = iwn_call(**kwargs)
    return lambda: torch.ops.surgellm.iwn(**call, group_name="a group", group_size=2)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", [*BAD_IWN_CALLS, *SYNCED_BAD_IWN_CALLS])
def test_each_bad_iwn_call_names_its_argument(case):
    if case in SYNCED_BAD_IWN_CALLS:
        error = _raised(_synced_op_call(SYNCED_BAD_IWN_CALLS[case]))
    else:
        error = _raised(lambda: fused_iwn(**iwn_call(**BAD_IWN_CALLS[case])))
    _assert_names_the_argument(case, error)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", DATA_BAD_IWN_CALLS)
def test_each_bad_value_in_the_data_names_its_argument(case):
    error = _raised(lambda: fused_iwn(**iwn_call(**DATA_BAD_IWN_CALLS[case])))
    assert type(error) is ValueError, repr(error)
    _assert_names_the_argument(case, error)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", BAD_SURGICAL_GATE_CALLS)
def test_each_bad_surgical_gate_call_names_its_argument(case):
    given = dict(dict(h=H, s=H, gate_logits=H), **BAD_SURGICAL_GATE_CALLS[case])
    _assert_names_the_argument(case, _raised(lambda: fused_surgical_gate(**given)))


def _fake(value):
    """value with its tensors as fake tensors (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    convert = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return mode, {k: convert(v) for k, v in value.items()}


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize(
    "case",
    [
        c
        for c in BAD_IWN_CALLS
        if c not in _NOT_CONVERTIBLE
        and "device" not in c
        and c != "num_classes from negative labels"
    ],
)  # data
def test_the_trace_raises_what_the_eager_call_raises(case, force_backend):
    """Under fake tensors (torch.compile's tracing) the op runs the same
    check: the same error and message as eagerly, not a copy's."""
    force_backend("cpu")
    call = iwn_call(**BAD_IWN_CALLS[case])
    eager = _raised(lambda: torch.ops.surgellm.iwn(**call))
    mode, fake_call = _fake(call)
    if call["num_classes"] is None and call["training"] and call["labels"] is not None:
        fake_call["num_classes"] = 3  # a trace cannot read it from the labels
    with mode:
        traced = _raised(lambda: torch.ops.surgellm.iwn(**fake_call))
    assert (type(traced), str(traced)) == (type(eager), str(eager))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
def test_tracing_without_num_classes_says_to_pass_it():
    mode, call = _fake(iwn_call())
    with (
        mode,
        pytest.raises(
            ValueError,
            match=r"num_classes cannot be read from the data of a traced or meta tensor "
            r"\(torch.compile, a torch.func transform, the meta device\): pass it",
        ),
    ):
        torch.ops.surgellm.iwn(**call)
    tasks = dict(call, num_classes=3, task_ids=call["labels"], running_mean=None, running_std=None)
    with mode, pytest.raises(ValueError, match="num_tasks cannot be read from the data"):
        torch.ops.surgellm.iwn(**tasks)
    with mode:  # given, it is not read
        torch.ops.surgellm.iwn(**tasks, num_tasks=3)
    # torch.func's transforms (which the forward-mode AD error points to, with
    # the reference) leave labels they do not transform as data: read as in eager
    read, given = (
        torch.func.jacrev(lambda x, n=n: iwn_reference(x, LABELS, training=True, **n))(X)
        for n in ({}, {"num_classes": 3})
    )
    torch.testing.assert_close(read, given, rtol=0, atol=0)


@pytest.mark.parametrize("expanded", ["running_mean", "running_std"])
def test_running_statistics_sharing_memory_are_refused_before_any_update(iwn, expanded):
    """Before the check, the other statistic was updated in place and then
    the in-place update of the expanded one failed, naming no argument."""
    stats = {"running_mean": torch.zeros(4), "running_std": torch.ones(4)}
    stats[expanded] = torch.full((1,), 0.5).expand(4)
    before = {k: v.clone() for k, v in stats.items()}
    with pytest.raises(ValueError, match=f"{expanded} has elements that share memory"):
        iwn(X, LABELS, **stats, training=True)
    for k, v in stats.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("shared_with", ["x", "x column", "weight", "bias"])
@pytest.mark.parametrize("statistic", ["running_mean", "running_std"])
def test_running_statistics_sharing_an_input_are_refused_before_any_update(
    iwn, statistic, shared_with
):
    """running_mean = x[0] changed x before the normalization read it: row 0's
    output was wrong, silently (F.batch_norm's too); x[:, 0] of a (4, 4) x
    (a strided view) the same."""
    x = torch.randn(4, 4) if shared_with == "x column" else torch.randn(6, 4)
    inputs = {"x": x, "weight": torch.rand(4) + 0.5, "bias": torch.randn(4)}
    stats = {"running_mean": torch.zeros(4), "running_std": torch.ones(4)}
    stats[statistic] = {"x": x[0], "x column": x[:, 0]}.get(shared_with, inputs.get(shared_with))
    before = {k: v.clone() for k, v in {**inputs, **stats}.items()}
    name = shared_with.split()[0]
    with pytest.raises(ValueError, match=f"{statistic} overlaps {name} .or may"):
        iwn(inputs.pop("x"), LABELS[: len(x)], **inputs, **stats, training=True)
    for k, v in {**inputs, **stats}.items():
        assert torch.equal(v, before[k]), k


def test_running_statistics_in_one_buffer_with_an_input_that_they_do_not_overlap():
    """Disjoint views of one storage are taken: the rows of one buffer."""
    buffer = torch.randn(8, 4)
    x, running_mean, running_std = buffer[:6], buffer[6].zero_(), buffer[7].fill_(1.0)
    y = fused_iwn(x, LABELS, running_mean=running_mean, running_std=running_std, training=True)
    expected_mean, expected_std = torch.zeros(4), torch.ones(4)
    expected = iwn_reference(
        x.clone(), LABELS, running_mean=expected_mean, running_std=expected_std, training=True
    )
    assert_close(y, expected)
    assert_close(running_mean, expected_mean)
    assert_close(running_std, expected_std)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("made_in_inference", ["x", "weight"])
def test_inference_tensors_are_refused_before_the_running_update(made_in_inference, force_backend):
    """Autograd refused to save the inference tensor only after the forward
    had run: the call raised with the running statistics already updated."""
    force_backend("cpu")
    with torch.inference_mode():
        inference = {"x": torch.randn(6, 4), "weight": torch.ones(4)}[made_in_inference]
    call = {"x": torch.randn(6, 4, requires_grad=True), "weight": torch.ones(4, requires_grad=True)}
    call[made_in_inference] = inference
    rm, rs = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match=f"{made_in_inference} is an inference tensor"):
        fused_iwn(call.pop("x"), LABELS, **call, running_mean=rm, running_std=rs, training=True)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rs, torch.ones(4))
    with torch.inference_mode():  # where it was made, the call runs
        fused_iwn(inference if made_in_inference == "x" else X, LABELS, training=True)


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
def test_inference_tensors_that_autograd_does_not_save_are_taken(force_backend):
    """A transposed x is read through a copy, and the copy is saved: the call
    runs, as it did before inference tensors were refused."""
    force_backend("cpu")
    with torch.inference_mode():
        x_t = torch.randn(4, 6).t()  # (6, 4), not contiguous
        gate_t = torch.randn(1, 4).expand(6, 4)  # per-instance, read through a copy
    w = torch.ones(4, requires_grad=True)
    y = fused_iwn(x_t, LABELS, gate=gate_t, weight=w, training=True)
    (weight_grad,) = torch.autograd.grad(y.square().sum(), w)
    expected = iwn_reference(x_t.clone(), LABELS, gate=gate_t.clone(), weight=w, training=True)
    assert_close(y, expected)
    assert_close(weight_grad, torch.autograd.grad(expected.square().sum(), w)[0])
    with torch.inference_mode():
        h_t = torch.randn(4, 2).t()
    s = torch.randn(2, 4, requires_grad=True)
    z, z_reference = fused_surgical_gate(h_t, s, s), surgical_gate_reference(h_t.clone(), s, s)
    assert_close(z, z_reference)
    grads = [torch.autograd.grad(out.square().sum(), s)[0] for out in (z, z_reference)]
    assert_close(*grads)


def _forward_ad_calls():
    """(name, call) for each way a tangent reaches each op: torch.func.jvp
    and jacfwd, and forward_ad's dual tensors, through every tensor input
    the output depends on."""
    import torch.autograd.forward_ad as fwAD

    labels = LABELS
    iwn_eval = dict(running_mean=RM, running_std=RS)

    def dual(t):
        return fwAD.make_dual(t, torch.ones_like(t))

    def in_dual_level(f):
        def call():
            with fwAD.dual_level():
                return f()

        return call

    return [
        ("iwn jvp eval", lambda: torch.func.jvp(lambda a: fused_iwn(a, **iwn_eval), (X,), (X,))),
        (
            "iwn jvp train",
            lambda: torch.func.jvp(
                lambda a: fused_iwn(a, labels, training=True, num_classes=3), (X,), (X,)
            ),
        ),
        ("iwn jacfwd", lambda: torch.func.jacfwd(lambda a: fused_iwn(a, **iwn_eval))(X[0])),
        ("iwn dual x", in_dual_level(lambda: fused_iwn(dual(X), **iwn_eval))),
        (
            "iwn dual gate",
            in_dual_level(lambda: fused_iwn(X, gate=dual(torch.zeros(X.shape[1])), **iwn_eval)),
        ),
        (
            "iwn dual running_mean",
            in_dual_level(lambda: fused_iwn(X, running_mean=dual(RM.clone()), running_std=RS)),
        ),
        ("gate jvp", lambda: torch.func.jvp(lambda a: fused_surgical_gate(a, H, H), (H,), (H,))),
        ("gate dual logits", in_dual_level(lambda: fused_surgical_gate(H, H, dual(H)))),
    ]


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", _forward_ad_calls(), ids=lambda c: c[0])
def test_forward_mode_ad_is_refused_not_silently_zero(case, force_backend):
    """Without the refusal each call returned a zero (or no) tangent: the
    op's output read as a constant."""
    force_backend("cpu")
    with pytest.raises(NotImplementedError, match=r"fused_\w+: forward-mode AD .* not supported"):
        case[1]()


def test_readme_lists_every_bad_input_as_raised_today():
    """docs/reliability.md shows what the calls raise now (regenerate it with
    `.venv/bin/python tests/_bad_inputs.py`)."""
    from pathlib import Path

    import _bad_inputs

    readme = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    shown = readme.split("<!-- bad-inputs -->\n")[1].split("\n<!-- /bad-inputs -->")[0]
    assert shown == _bad_inputs.table()
    assert shown.count("\n") - 1 >= 20


@pytest.mark.parametrize("iwn", [fused_iwn, iwn_reference], ids=["fused", "reference"])
def test_arguments_after_labels_are_keyword_only(iwn):
    """In F.batch_norm's order the running statistics were taken for the gate
    and the weight, and never updated: a silent wrong answer."""
    mean, std = RM.clone(), RS.clone()
    with pytest.raises(TypeError, match="positional argument"):
        iwn(X, LABELS, mean, std, training=True, num_classes=3)
    assert torch.equal(mean, RM) and torch.equal(std, RS)
