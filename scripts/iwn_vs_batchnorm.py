"""Class-balanced BatchNorm against F.batch_norm, interleaved, on this CPU.

    .venv/bin/python scripts/iwn_vs_batchnorm.py [--rounds 3] [--reps 7]

For (64, 256, 28, 28) and (256, 64, 56, 56), float32 and bfloat16,
contiguous and channels_last: FusedInstanceWeightedNorm2d's op
(fused_iwn(feature_dim=1), 10 classes) and F.batch_norm on the same tensor,
training forward + backward and eval forward, and the eager reference's
training step. Each round times every variant (median of --reps calls; 3 for
the eager reference) one after the other; the ratios printed are ranges over
the rounds (F.batch_norm time / fused time: above 1, fused is faster).
Training calls start from cleared gradients, as a training step does.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from surgellm_kernels import fused_iwn
from surgellm_kernels.ops._backend import planned_backend
from surgellm_kernels.ops.reference import iwn_reference

CLASSES = 10


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def variants(shape, dtype, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    labels = torch.randint(0, CLASSES, (shape[0],), generator=g)
    w = torch.ones(C, dtype=dtype, requires_grad=True)
    b = torch.zeros(C, dtype=dtype, requires_grad=True)
    mean, std, var = (torch.full((C,), v, dtype=dtype) for v in (0.0, 1.0, 1.0))
    leaf = x.detach().requires_grad_()
    dy = torch.randn_like(x)

    def clear_grads():  # else backward adds into .grad: one more pass over x
        leaf.grad = w.grad = b.grad = None

    def iwn(fn, training):
        def run():
            kwargs = dict(weight=w, bias=b, running_mean=mean, running_std=std, feature_dim=1)
            if training:
                clear_grads()
                fn(leaf, labels, training=True, num_classes=CLASSES, **kwargs).backward(dy)
            else:
                with torch.no_grad():
                    fn(x, **kwargs)

        return run

    def bn(training):
        def run():
            if training:
                clear_grads()
                F.batch_norm(leaf, mean, var, w, b, training=True).backward(dy)
            else:
                with torch.no_grad():
                    F.batch_norm(x, mean, var, w, b)

        return run

    return {
        "fused train": iwn(fused_iwn, True),
        "bn train": bn(True),
        "fused eval": iwn(fused_iwn, False),
        "bn eval": bn(False),
        "eager train": iwn(iwn_reference, True),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16", "float64"],
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.reps < 1:
        parser.error("--rounds and --reps must be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    backend = planned_backend("iwn", "cpu")
    print(f"fused_iwn backend: {backend}")
    if backend != "cpu":
        print("  (not the CPU kernels: the fused rows measure what runs instead)")
    print(
        f"{'shape':>16} {'dtype':>9} {'layout':>13}  {'train: bn/fused':>15}  "
        f"{'eval: bn/fused':>14}  {'train: eager/fused':>18}  fused train ms"
    )
    for shape in [(64, 256, 28, 28), (256, 64, 56, 56)]:
        for dtype in [getattr(torch, d) for d in args.dtypes]:
            for channels_last in (False, True):
                runs = variants(shape, dtype, channels_last)
                rounds = []
                for _ in range(args.rounds):
                    rounds.append(
                        {
                            k: median_ms(fn, args.reps if "eager" not in k else 3)
                            for k, fn in runs.items()
                        }
                    )

                def span(num, den, rounds=rounds):
                    r = sorted(t[num] / t[den] for t in rounds)
                    return f"{r[0]:.2f}-{r[-1]:.2f}x"

                fused = sorted(t["fused train"] for t in rounds)
                print(
                    f"{'x'.join(map(str, shape)):>16} {str(dtype)[6:]:>9} "
                    f"{'channels_last' if channels_last else 'contiguous':>13}  "
                    f"{span('bn train', 'fused train'):>15}  {span('bn eval', 'fused eval'):>14}  "
                    f"{span('eager train', 'fused train'):>18}  "
                    f"{fused[0]:.1f}-{fused[-1]:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
