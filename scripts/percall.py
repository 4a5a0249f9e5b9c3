"""Per-call cost of fused_iwn at the paper's small shapes, against F.batch_norm
in the same process, so that the ratios come from one run on a noisy machine.

    .venv/bin/python scripts/percall.py                     # this tree vs F.batch_norm
    .venv/bin/python scripts/percall.py --baseline c39bf28  # ... and that commit's

With --baseline, the commit is checked out into a temporary folder, its
extension built in place (a few minutes), and the same measurement run on it
in a process of its own (two builds of the extension cannot share one
process: both register the surgellm ops); each is reported as a ratio to
F.batch_norm measured in its own process.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baseline_tree(rev: str, workdir: str) -> str:
    """A checkout of commit ``rev`` with its extension built in place."""
    tree = os.path.join(workdir, "tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, check=True,
                   capture_output=True)
    return tree


def calls(fused_iwn, N, Fd, num_classes=10):
    """Closures timing one eval and one forward + backward call of fused_iwn
    and of F.batch_norm on (N, Fd) float32 rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, Fd, generator=g).requires_grad_(True)
    labels = torch.randint(0, num_classes, (N,), generator=g)
    p = dict(gate=torch.zeros(Fd, requires_grad=True), weight=torch.ones(Fd, requires_grad=True),
             bias=torch.zeros(Fd, requires_grad=True))
    rm, rs, rv = torch.zeros(Fd), torch.ones(Fd), torch.ones(Fd)
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
        return fused_iwn(x, labels if training else None, **p, running_mean=rm, running_std=rs,
                         training=training, num_classes=num_classes)

    fns = {"fused_iwn eval": eval_call(iwn), "fused_iwn fwd+bwd": train_call(iwn)}

    def bn(training):
        return F.batch_norm(x, rm, rv, p["weight"], p["bias"], training)
    fns["F.batch_norm eval"], fns["F.batch_norm fwd+bwd"] = eval_call(bn), train_call(bn)
    return fns


def measure(label: str, rounds: int) -> None:
    from surgellm_kernels import fused_iwn
    for shape in ((32, 16), (32, 768)):
        fns = calls(fused_iwn, *shape)
        times = {k: [] for k in fns}
        for fn in fns.values():
            for _ in range(300):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(100):
                    fn()
                times[name].append((time.perf_counter() - t0) / 100 * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{label}: {shape[0]} x {shape[1]}, float32, median of {rounds} rounds of 100 "
              f"calls:")
        for mode in ("eval", "fwd+bwd"):
            bn = med[f"F.batch_norm {mode}"]
            for name in ("fused_iwn", "F.batch_norm"):
                t = med[f"{name} {mode}"]
                print(f"  {mode:8s} {name:14s} {t:8.1f} us  ({t / bn:.2f}x F.batch_norm)")
        sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a commit to measure too")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--label", default="this tree")
    args = parser.parse_args()
    measure(args.label, args.rounds)
    if args.baseline:
        with tempfile.TemporaryDirectory() as workdir:
            tree = baseline_tree(args.baseline, workdir)
            try:
                env = dict(os.environ, PYTHONPATH=tree)
                subprocess.run([sys.executable, os.path.abspath(__file__), "--rounds",
                                str(args.rounds), "--label", args.baseline], env=env, cwd=tree,
                               check=True)
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree],
                               check=False)


if __name__ == "__main__":
    main()
