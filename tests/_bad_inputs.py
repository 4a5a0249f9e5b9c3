"""The bad inputs the tests try, in one catalogue, and the table of them in
docs/reliability.md.

tests/ops/test_validation.py runs every entry (each names its argument, on the
eager, direct and traced paths); ``table()`` calls each one through the public
API and writes the table (between the ``bad-inputs`` markers of
docs/reliability.md); test_validation checks that the document shows what the
calls raise today. Regenerate with ``.venv/bin/python tests/_bad_inputs.py``.
"""

import torch

X = torch.randn(6, 4)
LABELS = torch.tensor([0, 1, 0, 1, 2, 2])
RM, RS = torch.zeros(4), torch.ones(4)

META = torch.zeros(4, device="meta")
_SHARED = torch.ones(4)  # passed as both running statistics
_X_SHARED = torch.randn(6, 4)  # x, its first row the running mean
_W_SHARED = torch.ones(4)  # the weight and the running deviation
BAD_IWN_CALLS = {
    "x not a tensor": dict(x=[[1.0]]),
    "x integer": dict(x=torch.ones(6, 4, dtype=torch.int64)),
    "x scalar": dict(x=torch.tensor(1.0)),
    "x no features": dict(x=torch.zeros(6, 0)),
    "std_mode": dict(std_mode="median"),
    "std_mode not a str": dict(std_mode=None),
    "eps negative": dict(eps=-1.0),
    "eps a str": dict(eps="0.1"),
    "eps below float32's normal range": dict(eps=1e-300),
    "momentum above 1": dict(momentum=1.5),
    "momentum None": dict(momentum=None),
    "gate not a tensor": dict(gate=[0.0] * 4),
    "gate integer": dict(gate=torch.zeros(4, dtype=torch.int32)),
    "gate device": dict(gate=META),
    "gate shape": dict(gate=torch.zeros(5)),
    "gate per-instance dtype": dict(gate=torch.zeros(6, 4, dtype=torch.float64)),
    "weight shape": dict(weight=torch.ones(3)),
    "weight device": dict(weight=META),
    "weight not a tensor": dict(weight=1.0),
    "bias dtype": dict(bias=torch.ones(4, dtype=torch.int64)),
    "running_mean alone": dict(running_std=None),
    "running_mean shape": dict(running_mean=torch.zeros(5), running_std=torch.ones(5)),
    "running_std dtype": dict(running_std=torch.ones(4, dtype=torch.int32)),
    "running shapes differ": dict(running_std=torch.ones(1, 4)),
    "running 3-d": dict(running_mean=torch.zeros(1, 1, 4), running_std=torch.ones(1, 1, 4)),
    "running_std expanded": dict(running_std=torch.ones(1).expand(4)),
    "running statistics one tensor": dict(running_mean=_SHARED, running_std=_SHARED),
    "running_mean sharing x": dict(x=_X_SHARED, running_mean=_X_SHARED[0]),
    "running_std sharing weight": dict(weight=_W_SHARED, running_std=_W_SHARED),
    "running_mean of no tasks": dict(running_mean=torch.zeros(0, 4), running_std=torch.ones(0, 4)),
    # in eval the kernels give the running statistics no gradient (a silent None)
    "running_std requiring grad": dict(
        running_std=torch.ones(4, requires_grad=True), training=False, labels=None
    ),
    "task_ids with (F,) statistics": dict(task_ids=torch.zeros(6, dtype=torch.long)),
    "task_ids missing": dict(running_mean=torch.zeros(2, 4), running_std=torch.ones(2, 4)),
    "task_ids int32": dict(
        task_ids=torch.zeros(6, dtype=torch.int32),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
    ),
    "task_ids shape": dict(
        task_ids=torch.zeros(5, dtype=torch.long),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
    ),
    "task_ids device": dict(
        task_ids=torch.zeros(6, dtype=torch.long, device="meta"),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
    ),
    "labels missing": dict(labels=None),
    "labels not a tensor": dict(labels=[0] * 6),
    "labels int32": dict(labels=LABELS.int()),
    "labels shape": dict(labels=LABELS[:5]),
    "labels device": dict(labels=LABELS.to("meta")),
    "num_classes zero": dict(num_classes=0),
    "num_classes float": dict(num_classes=2.5),
    "num_classes from negative labels": dict(labels=torch.full((6,), -3)),
    "num_classes past 32-bit keys": dict(num_classes=2**31 + 1),
    "num_classes times features past the statistics' bound": dict(num_classes=2**25),
    "num_classes times tasks past 32-bit keys": dict(
        num_classes=2**30,
        task_ids=torch.tensor([0, 1, 2, 3, 0, 1]),
        running_mean=torch.zeros(4, 4),
        running_std=torch.ones(4, 4),
    ),
    "eval without statistics": dict(training=False, running_mean=None, running_std=None),
    "num_tasks zero": dict(
        num_tasks=0, task_ids=torch.zeros(6, dtype=torch.long), running_mean=None, running_std=None
    ),
    "num_tasks not the running statistics' tasks": dict(
        num_tasks=3,
        task_ids=torch.zeros(6, dtype=torch.long),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
    ),
    "num_tasks without task_ids": dict(num_tasks=2, running_mean=None, running_std=None),
    "feature_dim out of range": dict(feature_dim=2),
    "gate with features before positions": dict(
        x=torch.randn(6, 4, 3), gate=torch.zeros(4), feature_dim=1
    ),
    "labels per position": dict(
        x=torch.randn(6, 4, 3), labels=LABELS.view(6, 1).expand(6, 3), feature_dim=1
    ),
}


# With a process group (synced=True in Python, a group name for C++): what
# differs -- fixed class and task counts; no rows is allowed.
SYNCED_BAD_IWN_CALLS = {
    "synced: num_classes missing": dict(num_classes=None),
    "synced: no rows, num_classes missing": dict(
        x=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)
    ),
    "synced: task_ids without running statistics": dict(
        task_ids=torch.zeros(6, dtype=torch.long),
        running_mean=None,
        running_std=None,
        num_classes=2,
    ),
    "synced: labels missing": dict(labels=None, num_classes=2),
}


H = torch.randn(2, 4)
BAD_SURGICAL_GATE_CALLS = {
    "h not a tensor": dict(h=[[0.0] * 4] * 2),
    "h integer": dict(h=torch.ones(2, 4, dtype=torch.int64)),
    "h scalar": dict(h=torch.tensor(1.0)),
    "h no features": dict(h=torch.zeros(2, 0)),
    "s not a tensor": dict(s=None),
    "s shape": dict(s=torch.randn(2, 3)),
    "s dtype": dict(s=H.double()),
    "s device": dict(s=torch.zeros(2, 4, device="meta")),
    "gate_logits integer": dict(gate_logits=torch.ones(2, 4, dtype=torch.int32)),
    "weight shape": dict(weight=torch.ones(3)),
    "weight device": dict(weight=META),
    "bias dtype": dict(bias=torch.ones(4, dtype=torch.int64)),
    "bias not a tensor": dict(bias=0.0),
    "eps zero": dict(eps=0.0),
    "eps below float32's normal range": dict(eps=1e-40),
    "eps a str": dict(eps="1e-5"),
}


# Found in the data (checked in C++ before any kernel runs).
DATA_BAD_IWN_CALLS = {
    "labels out of range": dict(labels=torch.tensor([0, 1, 0, 1, 2, 3]), num_classes=3),
    "labels negative": dict(labels=torch.tensor([0, -1, 0, 1, 2, 2])),
    "task_ids out of range": dict(
        task_ids=torch.tensor([0, 1, 0, 1, 0, 5]),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
    ),
    # a key past int64 if formed in signed arithmetic (the sanitizer run's check)
    "task_ids far out of range": dict(
        task_ids=torch.tensor([0, 1, 0, 1, 0, 2**62]),
        running_mean=torch.zeros(2, 4),
        running_std=torch.ones(2, 4),
    ),
    # the task count from the data (no running statistics), num_classes from
    # the labels: one more than the largest value
    "task_ids negative": dict(task_ids=torch.full((6,), -1), running_mean=None, running_std=None),
    "task_ids past 32-bit keys": dict(
        task_ids=torch.full((6,), 2**63 - 1), running_mean=None, running_std=None
    ),
    "task_ids past num_tasks": dict(
        task_ids=torch.tensor([0, 1, 0, 1, 0, 2]), num_tasks=2, running_mean=None, running_std=None
    ),
    "labels past 32-bit keys": dict(labels=torch.tensor([0, 1, 0, 1, 2, 2**31])),
    "labels at int64's largest": dict(labels=torch.tensor([0, 1, 0, 1, 2, 2**63 - 1])),
}


def iwn_call(
    x=X,
    labels=LABELS,
    gate=None,
    weight=None,
    bias=None,
    running_mean=RM,
    running_std=RS,
    task_ids=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    std_mode="class_mean",
    num_classes=None,
    **extra,
):
    """fused_iwn's keyword arguments: a valid training call, changed by the given ones."""
    return dict(
        x=x,
        labels=labels,
        gate=gate,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_std=running_std,
        task_ids=task_ids,
        training=training,
        momentum=momentum,
        eps=eps,
        std_mode=std_mode,
        num_classes=num_classes,
        **extra,
    )


def _module_calls():
    from torch import nn

    from surgellm_kernels import (
        FusedInstanceWeightedNorm,
        FusedInstanceWeightedNorm2d,
        FusedSurgicalGate,
        convert_to_iwn,
    )

    def norm():
        return FusedInstanceWeightedNorm(4, 3, num_tasks=2)

    return {
        "InstanceWeightedNorm: num_classes zero": lambda: FusedInstanceWeightedNorm(4, 0),
        "InstanceWeightedNorm: std_mode": lambda: FusedInstanceWeightedNorm(4, 3, std_mode="x"),
        "InstanceWeightedNorm: momentum None": lambda: FusedInstanceWeightedNorm(
            4, 3, momentum=None
        ),
        "InstanceWeightedNorm: x width": lambda: norm().train()(
            torch.randn(6, 5), LABELS, LABELS % 2
        ),
        "InstanceWeightedNorm: task_ids missing": lambda: norm().partial_fit(X, LABELS),
        "InstanceWeightedNorm: fit without data": lambda: norm().fit(),
        "InstanceWeightedNorm: fit on no rows": lambda: norm().fit(
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        ),
        "InstanceWeightedNorm2d: channels": lambda: FusedInstanceWeightedNorm2d(4, 3)(
            torch.randn(6, 5, 2, 2), LABELS
        ),
        "InstanceWeightedNorm2d: 3-D input": lambda: FusedInstanceWeightedNorm2d(4, 3)(
            torch.randn(6, 4, 2), LABELS
        ),
        "InstanceWeightedNorm2d: labels per position": lambda: FusedInstanceWeightedNorm2d(4, 3)(
            torch.randn(6, 4, 2, 2), LABELS.view(6, 1, 1).expand(6, 2, 2)
        ),
        "InstanceWeightedNorm2d: labels missing": lambda: FusedInstanceWeightedNorm2d(4, 3)(
            torch.randn(6, 4, 2, 2)
        ),
        "InstanceWeightedNorm2d: labels missing, no running statistics, eval": lambda: (
            FusedInstanceWeightedNorm2d(4, 3, track_running_stats=False).eval()(
                torch.randn(6, 4, 2, 2)
            )
        ),
        "InstanceWeightedNorm2d: num_classes a bool": lambda: FusedInstanceWeightedNorm2d(4, True),
        "InstanceWeightedNorm2d: momentum None with tasks": lambda: FusedInstanceWeightedNorm2d(
            4, 3, num_tasks=2, momentum=None
        ),
        "convert_to_iwn: num_classes": lambda: convert_to_iwn(nn.Sequential(), 0),
        "SurgicalGate: h width": lambda: FusedSurgicalGate(8, 4)(
            torch.randn(2, 6), torch.randn(2, 4)
        ),
        "SurgicalGate: s shape": lambda: FusedSurgicalGate(8, 4)(
            torch.randn(2, 8), torch.randn(2, 5)
        ),
        "SurgicalGate: s missing": lambda: FusedSurgicalGate(8, 4)(torch.randn(2, 8), None),
        "SurgicalGate: s integer": lambda: FusedSurgicalGate(8, 4)(
            torch.randn(2, 8), torch.ones(2, 4, dtype=torch.long)
        ),
        "SurgicalGate: task_ids missing": lambda: FusedSurgicalGate(8, 4, num_tasks=2)(
            torch.randn(2, 8), torch.randn(2, 4)
        ),
        "SurgicalGate: h scalar": lambda: FusedSurgicalGate(8, 4)(
            torch.tensor(1.0), torch.randn(2, 4)
        ),
        "SurgicalGate: task_ids out of range": lambda: FusedSurgicalGate(8, 4, num_tasks=2)(
            torch.randn(2, 8), torch.randn(2, 4), torch.tensor([0, 2])
        ),
        "SurgicalGate: task_ids float": lambda: FusedSurgicalGate(8, 4, num_tasks=2)(
            torch.randn(2, 8), torch.randn(2, 4), torch.tensor([0.0, 1.0])
        ),
    }


def every_bad_call():
    """{name: zero-argument call that raises}: every kind the table lists."""
    from surgellm_kernels import fused_iwn, fused_surgical_gate

    calls = {}
    for name, kwargs in {**BAD_IWN_CALLS, **DATA_BAD_IWN_CALLS}.items():
        calls[f"fused_iwn: {name}"] = (lambda kw: lambda: fused_iwn(**iwn_call(**kw)))(kwargs)
    calls["fused_iwn: process_group not a group"] = lambda: fused_iwn(
        **iwn_call(num_classes=3, process_group="world")
    )
    calls["fused_iwn: process_group without this rank"] = lambda: fused_iwn(
        **iwn_call(num_classes=3, process_group=torch.distributed.GroupMember.NON_GROUP_MEMBER)
    )
    for name, kwargs in BAD_SURGICAL_GATE_CALLS.items():
        given = dict(dict(h=H, s=H, gate_logits=H), **kwargs)
        calls[f"fused_surgical_gate: {name}"] = (lambda kw: lambda: fused_surgical_gate(**kw))(
            given
        )
    # Forward-mode AD: the ops define no forward derivative (a dual input's
    # tangent would otherwise be dropped, the output's read as zero).
    calls["fused_iwn: forward-mode AD"] = lambda: torch.func.jvp(
        lambda x: fused_iwn(x, running_mean=RM, running_std=RS), (X,), (torch.ones_like(X),)
    )
    calls["fused_surgical_gate: forward-mode AD"] = lambda: torch.func.jvp(
        lambda h: fused_surgical_gate(h, H, H), (H,), (torch.ones_like(H),)
    )
    # Autograd cannot save an inference tensor for backward (refused before
    # the training call updates its running statistics).
    with torch.inference_mode():
        made_in_inference = torch.randn(6, 4)
    calls["fused_iwn: x an inference tensor"] = lambda: fused_iwn(
        **iwn_call(x=made_in_inference, weight=torch.ones(4, requires_grad=True))
    )
    calls["fused_surgical_gate: h an inference tensor"] = lambda: fused_surgical_gate(
        made_in_inference, made_in_inference, made_in_inference, torch.ones(4, requires_grad=True)
    )
    # torch.func's gradient transforms cannot run the ops' C++ autograd.
    calls["fused_iwn: torch.func.grad"] = lambda: torch.func.grad(
        lambda x: fused_iwn(x, LABELS, training=True, num_classes=3).sum()
    )(X)
    calls["fused_surgical_gate: torch.func.grad"] = lambda: torch.func.grad(
        lambda h: fused_surgical_gate(h, H, H).sum()
    )(H)
    calls.update(_module_calls())
    return calls


def table():
    """The markdown table: each bad input and the error users get."""
    rows = ["| bad input | error | message |", "|---|---|---|"]
    for name, call in every_bad_call().items():
        try:
            call()
        except Exception as e:  # what the user sees
            message = str(e).splitlines()[0].replace("|", "\\|")
            rows.append(f"| {name} | `{type(e).__name__}` | {message} |")
        else:
            raise AssertionError(f"{name}: no error")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
