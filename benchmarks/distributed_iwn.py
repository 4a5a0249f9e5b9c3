"""Cost of synchronizing IWN's statistics across ranks: 2 gloo ranks on this machine.

    python benchmarks/distributed_iwn.py [--rows 4096] [--features 768] [--json]

Each rank times a training forward + backward of ``fused_iwn`` on its own
(rows, features) float32 shard, with ``process_group`` (synced), without
(each rank's own statistics), and without but with a barrier after forward
and after backward (the synced step's waits for the other rank, without its
payload or merge), alternating the three so that all see the same machine
state; a barrier (not timed) starts every step on both ranks at once. Rank 0
reports the medians, their ratio and the bytes each rank puts into the
collectives per step (``sync_payload``). One thread per rank.
benchmarks/test_distributed_iwn.py runs it as part of the benchmark suite.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, world, store, options, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from surgellm_kernels import cpu_kernel_build, fused_iwn
    from surgellm_kernels.nn.distributed import sync_payload
    from surgellm_kernels.ops._backend import planned_backend

    rows, F, C = options["rows"], options["features"], options["classes"]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows, F, generator=g).requires_grad_()
    labels = torch.randint(0, C, (rows,), generator=g)
    dy = torch.randn(rows, F, generator=g)
    gate, weight, bias = (torch.randn(F).requires_grad_() for _ in range(3))
    running = (torch.zeros(F), torch.ones(F))

    def step(group, barriers=False):
        for t in (x, gate, weight, bias):
            t.grad = None
        y = fused_iwn(
            x,
            labels,
            gate=gate,
            weight=weight,
            bias=bias,
            running_mean=running[0],
            running_std=running[1],
            training=True,
            num_classes=C,
            process_group=group,
        )
        if barriers:
            dist.barrier()
        y.backward(dy)
        if barriers:
            dist.barrier()

    # "unsynced + 2 barriers" waits for the other rank as often as the synced
    # step does, with no payload and no merge: the difference between the two
    # is what the synchronization itself costs, the rest is waiting for the
    # slower rank.
    modes = {
        "synced": (dist.group.WORLD, False),
        "unsynced": (None, False),
        "unsynced + 2 barriers": (None, True),
    }
    times = {name: [] for name in modes}
    for i in range(options["warmup"] + options["steps"]):
        for name, (group, barriers) in modes.items():
            dist.barrier()
            start = time.perf_counter()
            step(group, barriers)
            if i >= options["warmup"]:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        payload = sync_payload(F, C)
        result = dict(
            options,
            world=world,
            backend=planned_backend("iwn", "cpu"),
            synced_ms=ms["synced"],
            unsynced_ms=ms["unsynced"],
            barriers_ms=ms["unsynced + 2 barriers"],
            overhead=ms["synced"] / ms["unsynced"],
            overhead_vs_barriers=ms["synced"] / ms["unsynced + 2 barriers"],
            all_gather_bytes=payload.all_gather,
            all_reduce_bytes=payload.all_reduce,
            cpu_build=cpu_kernel_build(),
        )
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def measure(rows=4096, features=768, classes=4, steps=20, warmup=3, world=2, timeout=600):
    """Run the ranks; the dict rank 0 reports. Raises when the ranks fail or
    outlive ``timeout`` seconds (then they are killed)."""
    from surgellm_kernels.ops._backend import planned_backend

    if planned_backend("iwn", "cpu") == "eager":
        raise RuntimeError(
            "no compiled CPU kernels (the eager reference cannot sync): build the extension first"
        )
    options = dict(rows=rows, features=features, classes=classes, steps=steps, warmup=warmup)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        context = mp.start_processes(
            _rank,
            args=(world, os.path.join(tmp, "store"), options, out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                raise TimeoutError(f"the {world} ranks ran past {timeout} s and were killed")
        with open(out) as f:
            return json.load(f)


def describe(r):
    return (
        f"{r['world']} gloo ranks on this machine, one thread each, ({r['rows']}, "
        f"{r['features']}) float32 per rank, {r['classes']} classes, gate + affine, "
        f"backend {r['backend']}: training forward + backward "
        f"synced {r['synced_ms']:.2f} ms vs unsynced {r['unsynced_ms']:.2f} ms "
        f"(medians of {r['steps']} alternated steps): overhead {r['overhead']:.3f}x; "
        f"vs unsynced with a barrier after forward and after backward "
        f"({r['barriers_ms']:.2f} ms): {r['overhead_vs_barriers']:.3f}x; "
        f"per step each rank sends {r['all_gather_bytes']:,} bytes to one all-gather "
        f"(receives {r['world']}x) and {r['all_reduce_bytes']:,} bytes to one all-reduce"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="rows per rank")
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = measure(args.rows, args.features, args.classes, args.steps)
    print(json.dumps(result) if args.json else describe(result))


if __name__ == "__main__":
    sys.exit(main())
