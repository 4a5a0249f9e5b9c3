"""What each rank of tests/test_distributed.py runs, in its own process.

``launch`` spawns ``world_size`` processes joined in a gloo group (a file
store, so no port is taken) and runs the named cases on every rank, in
order; each rank writes which cases failed and why. A case compares its
rank's synchronized call with a single-process ``fused_iwn`` call on the
whole batch, which every rank computes itself from the same seed.
"""

import datetime
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from surgellm_kernels import InstanceWeightedNorm, fused_iwn
from surgellm_kernels.nn.distributed import (
    SyncInstanceWeightedNorm,
    SyncInstanceWeightedNorm1d,
    SyncInstanceWeightedNorm2d,
    convert_sync_iwn,
    sync_payload,
)

COLLECTIVE_TIMEOUT_S = 60  # a rank left waiting in a collective fails, not hangs
DEVICE = torch.device("cpu")  # where a rank's batches live (set by _rank_main)


# -- launching ---------------------------------------------------------------------------


def launch(world_size, cases, workdir, backend="cpu", device="cpu", timeout=300):
    """Run ``cases`` on ``world_size`` spawned ranks; {case: failure text or None}.
    A run that outlives ``timeout`` is killed and every case fails with that.
    On ``device`` "cuda" every rank uses the one GPU (gloo serves CUDA tensors)."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_rank_main, args=(rank, world_size, str(workdir), list(cases), backend, device)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = {name: None for name in cases}
    for rank, p in enumerate(procs):
        path = os.path.join(workdir, f"rank{rank}.json")
        reported = {}
        if os.path.exists(path):
            with open(path) as f:
                reported = json.load(f)
        for name in cases:
            if name in reported:
                error = reported[name]
            else:  # the cases this rank never finished
                error = (
                    f"still running after {timeout} s (killed)"
                    if rank in hung
                    else f"exited with code {p.exitcode} before finishing this case"
                )
            if error and not results[name]:
                results[name] = f"rank {rank}:\n{error}"
    return results


def _rank_main(rank, world_size, workdir, cases, backend, device):
    global DEVICE
    DEVICE = torch.device(device)
    os.environ["SURGELLM_BACKEND"] = backend
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    # Groups are created by every rank, in the same order, before any case.
    groups = {
        "world": dist.group.WORLD,
        "even": dist.new_group([r for r in range(world_size) if r % 2 == 0]),
        "cuda_only": dist.new_group(backend="cuda:gloo"),
    }
    results = {}
    for name in cases:
        try:
            CASES[name](rank, world_size, groups)
            results[name] = None
        except Exception:  # reported by the test that owns the case
            results[name] = traceback.format_exc()
        # Written after every case: if a later one kills the process (gloo
        # aborts on mismatched collectives), what ran before is still known.
        with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# -- one batch, split into shards --------------------------------------------------------


def _tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]


def assert_close(actual, expected, dtype, what):
    tol = _tolerance(dtype)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


class Batch:
    """A batch of ``sum(sizes)`` rows, shard r = rows of rank r (or of the
    group's r-th member)."""

    def __init__(
        self,
        sizes,
        F=5,
        C=3,
        T=1,
        dtype=torch.float64,
        labels=None,
        tasks=None,
        gate="vec",
        affine=True,
        rows_shape=(),
        seed=0,
    ):
        N = sum(sizes)
        g = torch.Generator().manual_seed(seed)
        self.sizes, self.F, self.C, self.T, self.dtype = sizes, F, C, T, dtype
        self.x = (torch.randn(N, *rows_shape, F, generator=g, dtype=torch.float64) * 2 + 0.5).to(
            dtype
        )
        self.labels = (
            torch.tensor(labels) if labels is not None else torch.randint(0, C, (N,), generator=g)
        )
        self.labels = (
            self.labels.view(N, *([1] * len(rows_shape))).expand(N, *rows_shape).contiguous()
            if rows_shape
            else self.labels
        )
        self.task_ids = None
        if T > 1:
            self.task_ids = (
                torch.tensor(tasks) if tasks is not None else torch.randint(0, T, (N,), generator=g)
            )
            if rows_shape:
                self.task_ids = (
                    self.task_ids.view(N, *([1] * len(rows_shape)))
                    .expand(N, *rows_shape)
                    .contiguous()
                )
        self.dy = torch.randn(self.x.shape, generator=g, dtype=torch.float64).to(dtype)
        self.gate = {
            "none": None,
            "vec": torch.randn(F, generator=g, dtype=torch.float64).to(dtype),
            "rows": torch.randn(self.x.shape, generator=g, dtype=torch.float64).to(dtype),
        }[gate]
        self.weight = self.bias = None
        if affine:
            self.weight = torch.randn(F, generator=g, dtype=torch.float64).to(dtype)
            self.bias = torch.randn(F, generator=g, dtype=torch.float64).to(dtype)
        for name in ("x", "labels", "task_ids", "dy", "gate", "weight", "bias"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(DEVICE))

    def shard(self, index):
        start = sum(self.sizes[:index])
        return slice(start, start + self.sizes[index])

    def run(
        self,
        rows=slice(None),
        process_group=None,
        requires_grad=True,
        std_mode="class_mean",
        training=True,
        running=None,
        untracked=False,
    ):
        """One call on ``rows``: y, the gradients (x, gate, weight, bias) and
        the running statistics (none where ``untracked``: the task count is
        then given as num_tasks)."""

        def leaf(t, per_row=False):
            if t is None:
                return None
            t = (t[rows] if per_row else t).clone()
            return t.requires_grad_(requires_grad)

        x, gate = leaf(self.x, True), leaf(self.gate, self.gate is not None and self.gate.dim() > 1)
        weight, bias = leaf(self.weight), leaf(self.bias)
        shape = (self.T, self.F) if self.T > 1 else (self.F,)
        rm, rs = (
            running
            if running is not None
            else (
                torch.full(shape, 0.25, dtype=self.dtype, device=DEVICE),
                torch.full(shape, 2.0, dtype=self.dtype, device=DEVICE),
            )
        )
        if untracked:
            rm = rs = None
        y = fused_iwn(
            x,
            self.labels[rows],
            gate=gate,
            weight=weight,
            bias=bias,
            running_mean=rm,
            running_std=rs,
            task_ids=None if self.task_ids is None else self.task_ids[rows],
            training=training,
            std_mode=std_mode,
            num_classes=self.C,
            num_tasks=self.T if untracked else None,
            process_group=process_group,
        )
        grads = [None] * 4
        if requires_grad:
            (y * self.dy[rows]).sum().backward()
            grads = [None if t is None else t.grad for t in (x, gate, weight, bias)]
        return y.detach(), grads, () if untracked else (rm, rs)


def summed(t, group):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def compare_with_one_process(batch, rank, group, members, **options):
    """This rank's synced call against the one-process call on the whole batch."""
    index = members.index(rank)
    rows = batch.shard(index)
    y_all, grads_all, running_all = batch.run(**options)
    y, grads, running = batch.run(rows, process_group=group, **options)
    # Every collective first, the checks after: a check failing on one rank
    # must not leave another waiting in a collective.
    every_rank = [[torch.empty_like(r) for _ in members] for r in running]
    for gathered, r in zip(every_rank, running):
        dist.all_gather(gathered, r, group=group)
    # Weight, bias and a (F) gate: each rank's share, which DDP adds up.
    totals = {
        i: summed(grads[i], group)
        for i in (1, 2, 3)
        if grads[i] is not None and grads[i].dim() == 1
    }

    assert y.shape == batch.x[rows].shape, (y.shape, batch.x[rows].shape)
    assert torch.isfinite(y).all() and all(torch.isfinite(r).all() for r in running)
    assert_close(y, y_all[rows], batch.dtype, "output")
    for name, r, r_all, gathered in zip(
        ("running_mean", "running_std"), running, running_all, every_rank
    ):
        assert_close(r, r_all, batch.dtype, name)
        assert all(torch.equal(e, r) for e in gathered), f"{name} differs between ranks"
    if not options.get("requires_grad", True):
        return
    assert_close(grads[0], grads_all[0][rows], batch.dtype, "x grad")
    if grads[1] is not None and grads[1].dim() > 1:  # per instance: this rank's rows
        assert_close(grads[1], grads_all[1][rows], batch.dtype, "per-instance gate grad")
    for i, total in totals.items():
        assert_close(
            total, grads_all[i], batch.dtype, f"summed {('gate', 'weight', 'bias')[i - 1]} grad"
        )


# -- the cases ---------------------------------------------------------------------------


def _sizes(world, two, three):
    return two if world == 2 else three


def _labels_by_shard(sizes, per_shard):
    """Labels shard by shard: per_shard(r, n) lists rank r's n labels."""
    return [c for r, n in enumerate(sizes) for c in per_shard(r, n)]


def _matrix_case(sizes_fn, dtype=torch.float64, options=None, **batch_args):
    def case(rank, world, groups):
        sizes = sizes_fn(world)
        batch = Batch(
            sizes,
            dtype=dtype,
            **{k: (v(sizes) if callable(v) else v) for k, v in batch_args.items()},
        )
        compare_with_one_process(
            batch, rank, groups["world"], list(range(world)), **(options or {})
        )

    return case


EQUAL = lambda world: [6] * world  # noqa: E731
UNEVEN = lambda world: _sizes(world, [7, 1], [7, 1, 4])  # noqa: E731
EMPTY = lambda world: _sizes(world, [9, 0], [5, 0, 4])  # noqa: E731

CASES = {
    "equal_shards": _matrix_case(EQUAL),
    "equal_shards_float32": _matrix_case(EQUAL, dtype=torch.float32),
    "empty_shard_float32": _matrix_case(EMPTY, dtype=torch.float32, gate="rows"),
    "uneven_shards": _matrix_case(UNEVEN),
    "empty_shard": _matrix_case(EMPTY),
    "empty_shard_pooled_tasks": _matrix_case(EMPTY, T=2, options={"std_mode": "pooled"}),
    # class 2 only in rank 0's rows
    "class_on_one_rank": _matrix_case(
        UNEVEN,
        labels=lambda s: _labels_by_shard(
            s, lambda r, n: [(i % 3) if r == 0 else (i % 2) for i in range(n)]
        ),
    ),
    # classes 0..2 of 4: class 3 nowhere
    "class_absent_everywhere": _matrix_case(
        EQUAL, C=4, labels=lambda s: _labels_by_shard(s, lambda r, n: [i % 3 for i in range(n)])
    ),
    # class 2 has one row on each of the first two ranks; class 1 one row in all
    "singleton_classes_split": _matrix_case(
        EQUAL,
        labels=lambda s: _labels_by_shard(
            s,
            lambda r, n: [
                2 if (i == 0 and r < 2) else (1 if (i == 1 and r == 0) else 0) for i in range(n)
            ],
        ),
    ),
    "pooled": _matrix_case(UNEVEN, options={"std_mode": "pooled"}),
    # three tasks, the third on no rank: its running statistics stay
    "tasks": _matrix_case(UNEVEN, T=3, tasks=lambda s: [i % 2 for i in range(sum(s))]),
    # the task count given, no running statistics
    "tasks_untracked": _matrix_case(
        UNEVEN, T=3, tasks=lambda s: [i % 2 for i in range(sum(s))], options={"untracked": True}
    ),
    "tasks_pooled_float32": _matrix_case(
        EQUAL, dtype=torch.float32, T=3, options={"std_mode": "pooled"}
    ),
    "ungated": _matrix_case(UNEVEN, gate="none", affine=False),
    "per_instance_gate": _matrix_case(UNEVEN, gate="rows"),
    "rows_3d": _matrix_case(UNEVEN, gate="rows", rows_shape=(3,)),
    "requires_grad_off": _matrix_case(UNEVEN, options={"requires_grad": False}),
}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def count_collectives(fn, payloads=None):
    """(collectives fn issued on gloo, fn's result); ``payloads`` collects
    how many values each functional collective was given."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        result = fn()
    for e in prof.events():
        if payloads is not None and e.name.startswith("_c10d_functional::all_"):
            numel = 1
            for d in e.input_shapes[0]:
                numel *= d
            payloads[e.name.split("::")[1]] = numel
    return sum(e.name.startswith("gloo:") for e in prof.events()), result


@case
def collective_count(rank, world, groups):
    batch = Batch(UNEVEN(world))
    rows, group = batch.shard(rank), groups["world"]
    x = batch.x[rows].clone().requires_grad_()
    rm, rs = (
        torch.zeros(batch.F, dtype=batch.dtype, device=DEVICE),
        torch.ones(batch.F, dtype=batch.dtype, device=DEVICE),
    )

    def call(training, process_group=group, inputs=x):
        return fused_iwn(
            inputs,
            batch.labels[rows],
            gate=batch.gate,
            weight=batch.weight,
            bias=batch.bias,
            running_mean=rm,
            running_std=rs,
            training=training,
            num_classes=batch.C,
            process_group=process_group,
        )

    payloads = {}
    n, y = count_collectives(lambda: call(True), payloads)
    assert n == 1, f"training forward issued {n} collectives, expected 1"
    n, _ = count_collectives(lambda: (y * batch.dy[rows]).sum().backward(), payloads)
    assert n == 1, f"backward issued {n} collectives, expected 1"
    expected = sync_payload(batch.F, batch.C, batch.T, batch.dtype)
    itemsize = batch.x.element_size()  # float64: the accumulation dtype too
    assert payloads == {
        "all_gather_into_tensor": expected.all_gather // itemsize,
        "all_reduce": expected.all_reduce // itemsize,
    }, (payloads, expected)
    n, y = count_collectives(lambda: call(False))
    assert n == 0, f"eval issued {n} collectives, expected 0"
    with torch.no_grad():
        n, _ = count_collectives(lambda: call(True, inputs=x.detach()))
    assert n == 1, f"a forward without gradients issued {n} collectives, expected 1"
    n, _ = count_collectives(lambda: call(True, process_group=None))
    assert n == 0, f"a call without a process group issued {n} collectives"


@case
def subgroup(rank, world, groups):
    members = [r for r in range(world) if r % 2 == 0]
    batch = Batch([7, 3])
    if rank in members:
        compare_with_one_process(batch, rank, groups["even"], members)
        return
    try:  # not a member: a clear error, and no collective
        batch.run(slice(0, 3), process_group=groups["even"])
    except ValueError as e:
        assert "not a member" in str(e), e
    else:
        raise AssertionError("a non-member rank's call did not raise")


@case
def bad_input(rank, world, groups):
    batch = Batch(UNEVEN(world))
    rows = batch.shard(rank)
    expectations = [
        (dict(process_group=groups["cuda_only"]), ValueError, "cannot communicate cpu tensors"),
        (dict(process_group=groups["world"], num_classes=None), ValueError, "num_classes"),
        (
            dict(
                process_group=groups["world"],
                task_ids=torch.zeros(len(batch.x[rows]), dtype=torch.long),
                running_mean=None,
                running_std=None,
            ),
            ValueError,
            "task count",
        ),
        (dict(process_group="world"), TypeError, "process_group must be"),
    ]
    rm, rs = torch.zeros(batch.F, dtype=batch.dtype), torch.ones(batch.F, dtype=batch.dtype)
    for overrides, error, words in expectations:
        args = dict(
            labels=batch.labels[rows],
            gate=batch.gate,
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=batch.C,
        )
        args.update(overrides)
        before = (rm.clone(), rs.clone())
        try:
            fused_iwn(batch.x[rows], **args)
        except error as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError(f"no {error.__name__} for {overrides}")
        assert torch.equal(rm, before[0]) and torch.equal(rs, before[1]), "state changed"
    # The eager reference computes one process's statistics: refused, not run unsynced.
    os.environ["SURGELLM_BACKEND"] = "eager"
    try:
        fused_iwn(
            batch.x[rows],
            batch.labels[rows],
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=batch.C,
            process_group=groups["world"],
        )
    except RuntimeError as e:
        assert "compiled kernels" in str(e), e
    else:
        raise AssertionError("the eager backend ran a synced call")
    finally:
        os.environ["SURGELLM_BACKEND"] = "cpu"


def _fit_data(world):
    sizes = _sizes(world, [9, 4], [9, 0, 4])
    return Batch(sizes, F=4, C=3, T=2, tasks=[i % 2 for i in range(sum(sizes))], gate="vec"), sizes


def _norm(batch, cls=InstanceWeightedNorm):
    norm = cls(batch.F, batch.C, num_tasks=batch.T, gate=True).double()
    with torch.no_grad():
        norm.gate_logits.copy_(batch.gate)
    return norm


@case
def distributed_fit(rank, world, groups):
    batch, sizes = _fit_data(world)
    whole = _norm(batch).fit(batch.x, batch.labels, batch.task_ids)
    rows = batch.shard(rank)
    streamed = _norm(batch)
    for part in (
        slice(rows.start, rows.start + sizes[rank] // 2),
        slice(rows.start + sizes[rank] // 2, rows.stop),
    ):
        if part.stop > part.start:  # a rank with no data streams nothing
            streamed.partial_fit(batch.x[part], batch.labels[part], batch.task_ids[part])
    streamed.fit(process_group=groups["world"])
    synced = _norm(batch, SyncInstanceWeightedNorm).fit(
        batch.x[rows], batch.labels[rows], batch.task_ids[rows], groups["world"]
    )
    for norm in (streamed, synced):
        assert norm._frozen
        assert_close(norm.running_mean, whole.running_mean, torch.float64, "fit mean")
        assert_close(norm.running_std, whole.running_std, torch.float64, "fit std")


@case
def class_balanced_batchnorm(rank, world, groups):
    """A CNN's BatchNorm2d made class-balanced (convert_to_iwn), then synced
    (convert_sync_iwn): each rank's samples against one process on all of
    them -- outputs, input and affine gradients, running statistics."""
    from surgellm_kernels import FusedInstanceWeightedNorm2d, convert_to_iwn
    from surgellm_kernels.nn.distributed import SyncInstanceWeightedNorm2d

    sizes = _sizes(world, [5, 3], [4, 0, 3])
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(sizes), 4, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    labels = torch.tensor(_labels_by_shard(sizes, lambda r, n: [(r + i) % 3 for i in range(n)]))
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    affine = torch.rand(2, 4, generator=g, dtype=torch.float64)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])

    def model():
        m = nn.Sequential(nn.BatchNorm2d(4)).double()
        with torch.no_grad():
            m[0].weight.copy_(affine[0] + 0.5)
            m[0].bias.copy_(affine[1])
        convert_to_iwn(m, num_classes=3)
        assert type(m[0]) is FusedInstanceWeightedNorm2d
        return m

    whole, synced = model(), convert_sync_iwn(model(), groups["world"])
    assert type(synced[0]) is SyncInstanceWeightedNorm2d
    outputs = []
    for m, inputs, grad in ((whole, x, dy), (synced, x[rows], dy[rows])):
        inputs = inputs.clone().requires_grad_()
        y = m[0](inputs, labels if m is whole else labels[rows])
        y.backward(grad)
        outputs.append((y, inputs.grad))
    (y_all, dx_all), (y, dx) = outputs
    assert_close(y, y_all[rows], torch.float64, "y")
    assert_close(dx, dx_all[rows], torch.float64, "dx")
    for name in ("weight", "bias"):
        got = summed(getattr(synced[0], name).grad, groups["world"])
        assert_close(got, getattr(whole[0], name).grad, torch.float64, f"{name} grad")
    for name in ("running_mean", "running_std"):
        assert_close(getattr(synced[0], name), getattr(whole[0], name), torch.float64, name)
    synced.eval()  # eval reads the running statistics: nothing to share, no rank waits
    if rank == 0:
        assert_close(synced[0](x[:2]), whole.eval()[0](x[:2]), torch.float64, "eval")


@case
def one_sample_on_a_rank(rank, world, groups):
    """A rank with one sample, one value per channel there but not in the
    global batch: the synced layer normalizes, as SyncBatchNorm does (the
    local check had that rank raise and the others wait in the collective)."""
    from surgellm_kernels import FusedInstanceWeightedNorm1d

    sizes = _sizes(world, [1, 5], [1, 1, 4])
    g = torch.Generator().manual_seed(12)
    x = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)
    labels = torch.tensor(_labels_by_shard(sizes, lambda r, n: [(r + i) % 2 for i in range(n)]))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    whole = FusedInstanceWeightedNorm1d(4, 2).double()
    synced = SyncInstanceWeightedNorm1d(4, 2, process_group=groups["world"]).double()
    assert_close(synced(x[rows], labels[rows]), whole(x, labels)[rows], torch.float64, "y")
    for name in ("running_mean", "running_std"):
        assert_close(getattr(synced, name), getattr(whole, name), torch.float64, name)


class TinyClassifier(nn.Module):
    def __init__(self, F=8, C=3):
        super().__init__()
        self.proj = nn.Linear(6, F)
        self.norm = InstanceWeightedNorm(F, C, affine=True, gate=True)
        self.head = nn.Linear(F, C)

    def forward(self, x, labels):
        return self.head(self.norm(torch.tanh(self.proj(x)), labels))


@case
def ddp_parity(rank, world, groups):
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(1)
    per_rank, steps = 5, 4
    x = torch.randn(steps, per_rank * world, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (steps, per_rank * world), generator=g)
    torch.manual_seed(0)
    single = TinyClassifier().double()
    torch.manual_seed(0)
    model = TinyClassifier().double()
    norm = model.norm
    params = list(norm.parameters())
    model = convert_sync_iwn(model)
    assert isinstance(model.norm, SyncInstanceWeightedNorm)
    assert all(a is b for a, b in zip(model.norm.parameters(), params)), "parameters replaced"
    ddp = DistributedDataParallel(model)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(steps):
        for net, optimizer, part in ((single, opt_single, slice(None)), (ddp, opt, rows)):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                net(x[step, part], labels[step, part]), labels[step, part]
            )
            loss.backward()
            optimizer.step()
    for (name, p_single), p in zip(single.named_parameters(), model.parameters()):
        assert_close(p.detach(), p_single.detach(), torch.float64, f"parameter {name}")
    for (name, b_single), b in zip(single.named_buffers(), model.buffers()):
        assert_close(b.double(), b_single.double(), torch.float64, f"buffer {name}")


@case
def compiled(rank, world, groups):
    """torch.compile(fullgraph=True) traces the synced call, collectives included."""
    batch = Batch(UNEVEN(world), gate="none")
    rows = batch.shard(rank)
    y_all, (dx_all, _, weight_all, bias_all), running_all = batch.run()
    rm, rs = (
        torch.full((batch.F,), 0.25, dtype=batch.dtype, device=DEVICE),
        torch.full((batch.F,), 2.0, dtype=batch.dtype, device=DEVICE),
    )
    x = batch.x[rows].clone().requires_grad_()
    weight, bias = batch.weight.clone().requires_grad_(), batch.bias.clone().requires_grad_()
    labels, group = batch.labels[rows], groups["world"]

    @torch.compile(fullgraph=True)
    def step(x, weight, bias):
        return fused_iwn(
            x,
            labels,
            weight=weight,
            bias=bias,
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=batch.C,
            process_group=group,
        )

    y = step(x, weight, bias)
    (y * batch.dy[rows]).sum().backward()
    weight_grad, bias_grad = summed(weight.grad, group), summed(bias.grad, group)
    assert_close(y.detach(), y_all[rows], batch.dtype, "compiled output")
    assert_close(x.grad, dx_all[rows], batch.dtype, "compiled x grad")
    assert_close(weight_grad, weight_all, batch.dtype, "compiled summed weight grad")
    assert_close(bias_grad, bias_all, batch.dtype, "compiled summed bias grad")
    assert_close(rm, running_all[0], batch.dtype, "compiled running_mean")


@case
def bad_labels_on_one_rank(rank, world, groups):
    """Labels out of range on the last rank: every rank raises (none waits in
    a collective), nothing is updated or fitted, and the group stays usable."""
    batch = Batch(UNEVEN(world))
    rows, bad = batch.shard(rank), world - 1
    labels = batch.labels[rows].clone()
    if rank == bad:
        labels[0] = batch.C
    rm, rs = (
        torch.zeros(batch.F, dtype=batch.dtype, device=DEVICE),
        torch.ones(batch.F, dtype=batch.dtype, device=DEVICE),
    )
    norm = _norm(batch)
    errors = []
    for call in (
        lambda: fused_iwn(
            batch.x[rows],
            labels,
            gate=batch.gate,
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=batch.C,
            process_group=groups["world"],
        ),
        lambda: norm.fit(batch.x[rows], labels, process_group=groups["world"]),
    ):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    # The group still works (run before any check here can fail).
    compare_with_one_process(batch, rank, groups["world"], list(range(world)))
    expected = "labels must lie in" if rank == bad else f"failed its checks on rank(s) [{bad}]"
    for what, error in zip(("fused_iwn", "fit"), errors):
        assert error is not None and expected in error, (what, expected, error)
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rs, torch.ones_like(rs))
    assert not norm._frozen and norm._fit_state is None


@case
def bad_arguments_on_one_rank(rank, world, groups):
    """Arguments the checks refuse, on the last rank only -- the op's checks
    (labels missing, of another dtype or length; a gate of the wrong shape)
    and the synced layers' own (x's width, channels, dimensions): every rank
    raises at once (none waits in the all-gather until its timeout), nothing
    is updated, and the next step pairs with the next step."""
    batch = Batch(UNEVEN(world))
    rows, bad = batch.shard(rank), world - 1
    x, labels = batch.x[rows], batch.labels[rows]
    rm, rs = (
        torch.zeros(batch.F, dtype=batch.dtype, device=DEVICE),
        torch.ones(batch.F, dtype=batch.dtype, device=DEVICE),
    )
    op_calls = {
        "labels missing": (dict(labels=None), "labels are required"),
        "int32 labels": (dict(labels=labels.int()), "labels must be"),
        "labels of another length": (dict(labels=labels[1:]), "labels must have shape"),
        "gate of another shape": (dict(gate=batch.gate[1:]), "gate must have shape"),
        "x of another width": (dict(x=torch.cat([x, x[:, :1]], 1)), "gate must have shape"),
        # not floating: the payload in running_mean's dtype (rank 0 waited to its timeout)
        "x of integers": (dict(x=x.long()), "x must be a floating"),
    }
    wide = torch.randn(len(x), batch.F + 1, dtype=batch.dtype, device=DEVICE)
    norm = SyncInstanceWeightedNorm(batch.F, batch.C).double().to(DEVICE)
    norm2d = SyncInstanceWeightedNorm2d(batch.F, batch.C).double().to(DEVICE)
    images = x.reshape(len(x), batch.F, 1, 1)
    layer_calls = {
        "width": (norm, x, wide, "x must have shape"),
        "channels": (norm2d, images, images.reshape(len(x), 1, batch.F, 1), "channels"),
        "dimensions": (norm2d, images, x, "4-D"),
        "integers": (norm, x, x.long(), "x must be a floating"),
    }
    started = time.monotonic()
    failures = []

    def expect(what, words, call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except (ValueError, TypeError) as e:
            expected = words if rank == bad else f"failed its checks on rank(s) [{bad}]"
            if expected not in str(e):
                failures.append(f"{what}: {expected!r} not in {str(e)!r}")
        else:
            failures.append(f"{what}: no error")

    for what, (overrides, words) in op_calls.items():
        args = dict(x=x, labels=labels, gate=batch.gate)
        if rank == bad:
            args.update(overrides)
        expect(
            what,
            words,
            fused_iwn,
            **args,
            running_mean=rm,
            running_std=rs,
            training=True,
            num_classes=batch.C,
            process_group=groups["world"],
        )
    for what, (layer, good, wrong, words) in layer_calls.items():
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        expect(what, words, layer, wrong if rank == bad else good, labels)
        for k, v in layer.state_dict().items():
            if not torch.equal(v, before[k]):
                failures.append(f"{what}: {k} changed")
    # two tasks and no running statistics: every rank sends the groups of the
    # given task count
    task_ids = torch.arange(len(x), device=DEVICE) % 2
    expect(
        "int32 labels, num_tasks=2",
        "labels must be",
        fused_iwn,
        x=x,
        labels=labels.int() if rank == bad else labels,
        gate=batch.gate,
        task_ids=task_ids,
        training=True,
        num_classes=batch.C,
        num_tasks=2,
        process_group=groups["world"],
    )
    untracked = SyncInstanceWeightedNorm1d(batch.F, batch.C, num_tasks=2, track_running_stats=False)
    expect(
        "width, num_tasks=2, untracked layer",
        "channels",
        untracked.double().to(DEVICE),
        wide if rank == bad else x,
        labels,
        task_ids,
    )
    assert not failures, failures
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rs, torch.ones_like(rs))
    # Far within the collective timeout: no rank waited for another to give up.
    assert time.monotonic() - started < COLLECTIVE_TIMEOUT_S / 2, time.monotonic() - started
    compare_with_one_process(batch, rank, groups["world"], list(range(world)))
