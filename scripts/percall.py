"""Per-call cost of fused_iwn and fused_surgical_gate at the paper's small
shapes, as ratios to F.batch_norm (F.layer_norm for the gate) timed in the
same process, so that the ratios come from one run on a noisy machine.

    .venv/bin/python scripts/percall.py                     # this tree
    .venv/bin/python scripts/percall.py --baseline 2b819f7  # ... against that commit

With --baseline, the commit is checked out into a temporary folder (or
--baseline-tree, a checkout whose extension is built in place), its
extension built in place (a few minutes), and both trees run in worker
processes of their own (two builds of the extension cannot share one
process: both register the surgellm ops). The workers take turns, one batch
of calls each (A B A B ...), so that both see the same machine; the report
gives each tree's median per call and the new/old ratio of the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((32, 16), (32, 768))


def baseline_tree(rev: str, workdir: str) -> str:
    """A checkout of commit ``rev`` with its extension built in place."""
    tree = os.path.join(workdir, "tree")
    subprocess.run(
        ["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    return tree


def calls(N, Fd, num_classes=10):
    """name -> closure timing one call: fused_iwn eval and forward + backward,
    fused_surgical_gate forward, and the ATen norms they are compared to, on
    (N, Fd) float32 rows."""
    import torch
    import torch.nn.functional as F

    from surgellm_kernels import fused_iwn, fused_surgical_gate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, Fd, generator=g).requires_grad_(True)
    labels = torch.randint(0, num_classes, (N,), generator=g)
    p = dict(
        gate=torch.zeros(Fd, requires_grad=True),
        weight=torch.ones(Fd, requires_grad=True),
        bias=torch.zeros(Fd, requires_grad=True),
    )
    rm, rs, rv = torch.zeros(Fd), torch.ones(Fd), torch.ones(Fd)
    h, s, logits = (torch.randn(N, Fd, generator=g) for _ in range(3))
    dy = torch.randn(N, Fd, generator=g)
    leaves = [x, *p.values()]

    def eval_call(fn):
        def run():
            with torch.no_grad():
                fn(False)

        return run

    def train_call(fn):
        def run():
            for t in leaves:
                t.grad = None
            fn(True).backward(dy)

        return run

    def iwn(training):
        return fused_iwn(
            x,
            labels if training else None,
            **p,
            running_mean=rm,
            running_std=rs,
            training=training,
            num_classes=num_classes,
        )

    def bn(training):
        return F.batch_norm(x, rm, rv, p["weight"], p["bias"], training)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    w, b = p["weight"].detach(), p["bias"].detach()
    return {
        "fused_iwn eval": eval_call(iwn),
        "fused_iwn fwd+bwd": train_call(iwn),
        "F.batch_norm eval": eval_call(bn),
        "F.batch_norm fwd+bwd": train_call(bn),
        "fused_surgical_gate fwd": no_grad(lambda: fused_surgical_gate(h, s, logits, w, b)),
        "F.layer_norm fwd": no_grad(lambda: F.layer_norm(h, (Fd,), w, b)),
    }


def worker() -> None:
    """Times batches of calls on request: reads "<shape index> <batch>" lines,
    answers with a JSON object of microseconds per call, one per case."""
    import torch

    torch.set_num_threads(int(os.environ.get("PERCALL_THREADS", torch.get_num_threads())))
    cases = [calls(*shape) for shape in SHAPES]
    for fns in cases:  # warm up
        for fn in fns.values():
            for _ in range(300):
                fn()
    try:
        from surgellm_kernels.ops._backend import planned_backend
    except ImportError:  # a baseline older than planned_backend
        running = {}
    else:
        running = {op: planned_backend(op, "cpu") for op in ("iwn", "surgical_gate")}
    print("ready " + json.dumps(running), flush=True)
    for line in sys.stdin:
        index, batch = map(int, line.split())
        result = {}
        for name, fn in cases[index].items():
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            result[name] = (time.perf_counter() - t0) / batch * 1e6
        print(json.dumps(result), flush=True)


def start_worker(tree: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "percall.py"), "--worker"],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = proc.stdout.readline().split(maxsplit=1)
    assert ready and ready[0] == "ready", f"worker for {tree} did not start"
    running = json.loads(ready[1]) if len(ready) > 1 else {}
    print(f"{tree}: backends " + (", ".join(f"{op} {n}" for op, n in running.items()) or "unknown"))
    if running and set(running.values()) != {"cpu"}:
        print("  (not the CPU kernels: its fused rows measure what runs instead)")
    return proc


def measure(trees: dict, rounds: int, batch: int) -> None:
    """trees: label -> checkout. Prints each case's median per call (and
    its ratio to the ATen norm of the same process), per tree."""
    workers = {label: start_worker(tree) for label, tree in trees.items()}
    try:
        for index, shape in enumerate(SHAPES):
            times = {label: [] for label in trees}
            for _ in range(rounds):
                for label, proc in workers.items():  # A B A B ...
                    proc.stdin.write(f"{index} {batch}\n")
                    proc.stdin.flush()
                    times[label].append(json.loads(proc.stdout.readline()))
            print(
                f"{shape[0]} x {shape[1]}, float32: median of {rounds} interleaved batches "
                f"of {batch} calls, microseconds per call (time / the ATen norm's time)"
            )
            medians = {
                label: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                for label, runs in times.items()
            }
            for case, norm in (
                ("fused_iwn eval", "F.batch_norm eval"),
                ("fused_iwn fwd+bwd", "F.batch_norm fwd+bwd"),
                ("fused_surgical_gate fwd", "F.layer_norm fwd"),
            ):
                row = "  ".join(
                    f"{label}: {m[case]:7.1f} ({m[case] / m[norm]:.2f}x)"
                    for label, m in medians.items()
                )
                print(f"  {case:24s} {row}")
                if len(medians) == 2:
                    (_, new), (_, old) = medians.items()
                    print(f"  {'':24s} new / old: {new[case] / old[case]:.3f}")
            sys.stdout.flush()
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", help="a commit to measure too (built in a temporary checkout)"
    )
    parser.add_argument("--baseline-tree", help="a checkout with its extension built in place")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    if args.baseline_tree:
        return measure({"this tree": ROOT, "baseline": args.baseline_tree}, args.rounds, args.batch)
    if not args.baseline:
        return measure({"this tree": ROOT}, args.rounds, args.batch)
    with tempfile.TemporaryDirectory() as workdir:
        tree = baseline_tree(args.baseline, workdir)
        try:
            measure({"this tree": ROOT, args.baseline: tree}, args.rounds, args.batch)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)


if __name__ == "__main__":
    main()
