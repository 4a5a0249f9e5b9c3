"""Data-parallel IWN on gloo: spawned ranks against one process on the whole batch.

Each world size (and backend) is one spawned run of every case
(tests/_distributed_ranks.py); each case is reported by its own test here.
A run that hangs is killed after its timeout and fails every case.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from surgellm_kernels import (
    FusedInstanceWeightedNorm,
    InstanceWeightedNorm,
    InstanceWeightedNorm2d,
    fused_iwn,
)
from surgellm_kernels.nn.distributed import (
    SyncInstanceWeightedNorm,
    SyncInstanceWeightedNorm1d,
    convert_sync_iwn,
)

import _distributed_ranks as ranks
from _helpers import device_backends

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

ROOT = Path(__file__).resolve().parents[2]
OTHERS = (
    "class_balanced_batchnorm",
    "one_sample_on_a_rank",
    "collective_count",
    "subgroup",
    "bad_input",
    "bad_labels_on_one_rank",
    "bad_arguments_on_one_rank",
    "distributed_fit",
    "ddp_parity",
    "compiled",
)
MATRIX = [name for name in ranks.CASES if name not in OTHERS]
# The kernels' side, per backend: the phases with no rows and several tasks;
# the collectives themselves are the same C++ code on every backend.
KERNEL_CASES = ["equal_shards", "empty_shard_pooled_tasks", "per_instance_gate", "collective_count"]
RUNS = {  # (world size, backend, device): cases
    (2, "cpu", "cpu"): [
        *MATRIX,
        "class_balanced_batchnorm",
        "one_sample_on_a_rank",
        "collective_count",
        "bad_input",
        "bad_labels_on_one_rank",
        "bad_arguments_on_one_rank",
        "distributed_fit",
        "ddp_parity",
        "compiled",
    ],
    (3, "cpu", "cpu"): [
        *MATRIX,
        "class_balanced_batchnorm",
        "one_sample_on_a_rank",
        "collective_count",
        "subgroup",
        "bad_labels_on_one_rank",
        "bad_arguments_on_one_rank",
        "distributed_fit",
        "ddp_parity",
    ],
    (2, "triton", "cpu"): KERNEL_CASES,  # interpreted here; compiled on a GPU machine
    (2, "triton", "cuda"): KERNEL_CASES,
    (2, "cuda", "cuda"): KERNEL_CASES,
}
RUNNABLE = set(device_backends())


@pytest.fixture(scope="module")
def run_results(tmp_path_factory):
    cache = {}

    def results(world, backend, device):
        if (backend, device) not in RUNNABLE:
            pytest.skip(f"backend {backend} cannot run {device} tensors here")
        key = (world, backend, device)
        if key not in cache:
            workdir = tmp_path_factory.mktemp(f"world{world}_{backend}_{device}")
            cache[key] = ranks.launch(world, RUNS[key], workdir, backend, device)
        return cache[key]

    return results


# Three ranks are the slow (many-rank) runs; two cover every case by default.
@pytest.mark.parametrize(
    "world, backend, device, case",
    [
        pytest.param(*key, case, marks=[pytest.mark.slow] if key[0] > 2 else [])
        for key, cases in RUNS.items()
        for case in cases
    ],
)
def test_ranks_match_one_process(run_results, world, backend, device, case):
    error = run_results(world, backend, device)[case]
    if error:
        pytest.fail(
            f"world size {world}, backend {backend} on {device}, case {case}:\n{error}",
            pytrace=False,
        )


# -- in this process ----------------------------------------------------------------------


def test_without_an_initialized_group_nothing_is_synced():
    """A group of one rank, or no group: the plain call, no collective."""
    x, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    norm = SyncInstanceWeightedNorm(4, 3, affine=True).double().train()
    assert norm._group() is None
    expected = fused_iwn(
        x, labels, weight=norm.weight, bias=norm.bias, training=True, num_classes=3
    )
    torch.testing.assert_close(norm(x, labels), expected, rtol=0, atol=0)


def test_one_sample_in_a_batch_of_one_rank_is_refused_as_batchnorm_does():
    """No group (or a group of one): the batch is this rank's, and one value
    per channel is refused, as SyncBatchNorm refuses it in a world of one."""
    norm = SyncInstanceWeightedNorm1d(4, 2).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        norm(torch.randn(1, 4), torch.tensor([0]))


def test_a_bad_group_with_one_sample_gets_the_group_error():
    norm = SyncInstanceWeightedNorm1d(4, 2, process_group="world").train()
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        norm(torch.randn(1, 4), torch.tensor([0]))


def test_process_group_type_is_checked():
    x, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        fused_iwn(x, labels, training=True, num_classes=2, process_group="world")
    with pytest.raises(ValueError, match="not a member"):
        fused_iwn(
            x, labels, training=True, num_classes=2, process_group=dist.GroupMember.NON_GROUP_MEMBER
        )


def test_convert_sync_iwn_keeps_parameters_and_buffers():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4),
        InstanceWeightedNorm(4, 3, num_tasks=2, affine=True, gate=True),
        torch.nn.Sequential(FusedInstanceWeightedNorm(4, 2, std_mode="pooled").eval()),
    )
    model[1].fit(torch.randn(10, 4), torch.randint(0, 3, (10,)), torch.randint(0, 2, (10,)))
    before = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    group = object()  # stored as given; only a call uses it
    converted = convert_sync_iwn(model, group)
    assert converted is model
    for norm in (model[1], model[2][0]):
        assert type(norm) is SyncInstanceWeightedNorm and norm.process_group is group
    assert (model[1].num_tasks, model[1].gated, model[1]._frozen) == (2, True, True)
    assert (model[2][0].std_mode, model[2][0].training) == ("pooled", False)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before), "a Parameter or buffer was replaced"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    single = convert_sync_iwn(InstanceWeightedNorm(4, 2))
    assert type(single) is SyncInstanceWeightedNorm and single.process_group is None


def test_convert_sync_iwn_again_takes_the_new_group():
    """As a second convert_sync_batchnorm does: the layers sync over the group
    of the last call, the same modules (and Parameters) kept."""
    model = torch.nn.Sequential(InstanceWeightedNorm(4, 2), InstanceWeightedNorm2d(3, 2))
    first, second = object(), object()
    convert_sync_iwn(model, first)
    norms = list(model)
    assert convert_sync_iwn(model, second) is model
    assert all(a is b for a, b in zip(norms, model))
    assert all(norm.process_group is second for norm in model)


def test_ddp_example_runs_with_torchrun():
    """examples/ddp_iwn.py under torchrun: two gloo ranks, the statistics of a
    single-process run."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun) if torchrun.exists() else sys.executable,
        *([] if torchrun.exists() else ["-m", "torch.distributed.run"]),
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "examples" / "ddp_iwn.py"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "match a single-process run" in done.stdout, done.stdout
