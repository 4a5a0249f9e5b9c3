"""Per-call cost of fused_iwn at the paper's small shapes, against F.batch_norm
and, optionally, against the build of an earlier commit -- interleaved in one
process, so that the ratios come from one run on a noisy machine.

    .venv/bin/python scripts/percall.py                     # this tree vs F.batch_norm
    .venv/bin/python scripts/percall.py --baseline b76c71a  # ... and vs that commit

With --baseline, the commit is checked out into a temporary folder, its
extension built in place (a few minutes), and its package imported under the
name surgellm_kernels_baseline next to this tree's.
"""
import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baseline_package(rev: str, workdir: str):
    """The package of commit ``rev``, built and importable as surgellm_kernels_baseline."""
    tree = os.path.join(workdir, "tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev], check=True,
                   capture_output=True)
    try:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                       check=True, capture_output=True)
        pkg = os.path.join(workdir, "pkgs", "surgellm_kernels_baseline")
        shutil.copytree(os.path.join(tree, "surgellm_kernels"), pkg)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
    backend_py = os.path.join(pkg, "_backend.py")
    with open(backend_py) as f:
        text = f.read().replace('"surgellm_kernels._C"', '"surgellm_kernels_baseline._C"')
    with open(backend_py, "w") as f:
        f.write(text)
    sys.path.insert(0, os.path.dirname(pkg))
    return importlib.import_module("surgellm_kernels_baseline")


def calls(impls, N, Fd, num_classes=10):
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

    fns = {}
    for name, module in impls.items():
        def iwn(training, module=module):
            return module.fused_iwn(x, labels if training else None, **p, running_mean=rm,
                                    running_std=rs, training=training, num_classes=num_classes)
        fns[f"{name} eval"], fns[f"{name} fwd+bwd"] = eval_call(iwn), train_call(iwn)

    def bn(training):
        return F.batch_norm(x, rm, rv, p["weight"], p["bias"], training)
    fns["F.batch_norm eval"], fns["F.batch_norm fwd+bwd"] = eval_call(bn), train_call(bn)
    return fns


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a commit to compare with")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    import surgellm_kernels
    impls = {"fused_iwn": surgellm_kernels}
    with tempfile.TemporaryDirectory() as workdir:
        if args.baseline:
            impls[f"fused_iwn@{args.baseline}"] = baseline_package(args.baseline, workdir)
        for shape in ((32, 16), (32, 768)):
            fns = calls(impls, *shape)
            times = {k: [] for k in fns}
            for fn in fns.values():
                for _ in range(300):
                    fn()
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(100):
                        fn()
                    times[name].append((time.perf_counter() - t0) / 100 * 1e6)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{shape[0]} x {shape[1]}, float32, median of {args.rounds} rounds of 100 calls:")
            for mode in ("eval", "fwd+bwd"):
                bn = med[f"F.batch_norm {mode}"]
                for name in (*impls, "F.batch_norm"):
                    t = med[f"{name} {mode}"]
                    print(f"  {mode:8s} {name:28s} {t:8.1f} us  ({t / bn:.2f}x F.batch_norm)")


if __name__ == "__main__":
    main()
