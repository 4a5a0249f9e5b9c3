"""How far the CPU kernels are from the memory wall at large shapes.

Three ratios, each against an ATen op timed in the same process, the
implementations taking turns (A B C ... B C A ...) and each ratio the median
over the rounds of that round's ratio:

    fused_iwn training forward + backward (gate (F,), 10 classes) / addcmul
    fused_surgical_gate forward / addcmul
    fused_surgical_gate forward + backward / F.layer_norm forward + backward

``torch.addcmul(a, b, c, out=d)`` moves four tensors of x's size and
allocates nothing: it measures what this machine streams. The floors, from
the bytes an ideal kernel moves (benchmarks/harness.py, TENSORS_MOVED): IWN
training forward + backward 8 tensors = 2x addcmul, the gate forward 4
tensors = 1x, the gate forward + backward 11 tensors where LayerNorm moves 5
(2.2x). Each fused call also allocates its outputs (y; dx; z; dh, ds,
dlogits), as ATen's LayerNorm does; addcmul(out=) does not.

With ``--phases``, each op's phases (the dispatcher ops one call runs) are
then profiled with torch.profiler: time per call, the tensors of x's size
an ideal phase moves, and the GB/s that makes against addcmul's in the same
run -- what bounds each phase, and where the time above the floor goes.
With ``--sorted-labels`` as well, IWN's phases are then profiled with its
labels in random order and sorted (each class's rows in one run), taking
turns: what rows of alternating classes cost.

    .venv/bin/python scripts/memory_wall.py                      # float32
    .venv/bin/python scripts/memory_wall.py --dtype bfloat16 --rounds 7
    .venv/bin/python scripts/memory_wall.py --phases --shapes 4096x768
    .venv/bin/python scripts/memory_wall.py --phases --sorted-labels
"""

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from surgellm_kernels import fused_iwn, fused_surgical_gate
from surgellm_kernels.ops import _backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import (  # noqa: E402  (the benchmark suite's)
    PHASE_TENSORS,  # noqa: F401  (the table of phases this script reports)
    PROXY_TENSORS,
    forward_backward,
    gb_per_s,
    interleaved,
    median_ratio,
    phase_rates,
    phase_times,
    tensor_bytes,
)

FLOORS = {"iwn fwd+bwd / addcmul": 2.0, "gate fwd / addcmul": 1.0, "gate fwd+bwd / LN fwd+bwd": 2.2}


def class_labels(N, num_classes, generator, sorted_labels=False):
    """IWN's labels: uniform over the classes, in random order, or the same
    labels sorted (each class's rows in one run)."""
    labels = torch.randint(0, num_classes, (N,), generator=generator)
    return labels.sort().values if sorted_labels else labels


def iwn_training_step(N, d, dtype, num_classes=10, sorted_labels=False, seed=0):
    """fused_iwn's training forward + backward, gate (F,), as a closure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    gate = torch.randn(d, generator=g).to(dtype).requires_grad_()
    labels = class_labels(N, num_classes, g, sorted_labels)
    grad = torch.randn(N, d, generator=g).to(dtype)

    def iwn():
        return fused_iwn(x, labels, gate=gate, training=True, num_classes=num_classes)

    return forward_backward(iwn, grad, (x, gate))


def closures(N, d, dtype):
    g = torch.Generator().manual_seed(1)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    h, s, logits = rand(N, d, grad=True), rand(N, d, grad=True), rand(N, d, grad=True)
    w = torch.ones(d, dtype=dtype, requires_grad=True)
    b = torch.zeros(d, dtype=dtype, requires_grad=True)
    grad = rand(N, d)
    a, b2, c, out = rand(N, d), rand(N, d), rand(N, d), rand(N, d)

    def gate_fwd():
        with torch.no_grad():
            fused_surgical_gate(h, s, logits, w, b)

    return {
        "addcmul": lambda: torch.addcmul(a, b2, c, out=out),
        "iwn fwd+bwd": iwn_training_step(N, d, dtype),
        "gate fwd": gate_fwd,
        "gate fwd+bwd": forward_backward(
            lambda: fused_surgical_gate(h, s, logits, w, b), grad, (h, s, logits, w, b)
        ),
        "LN fwd+bwd": forward_backward(lambda: F.layer_norm(h, (d,), w, b), grad, (h, w, b)),
    }


def measure(N, d, dtype, rounds, calls):
    times = interleaved(closures(N, d, dtype), rounds, calls)
    m = {name: statistics.median(t) for name, t in times.items()}
    return m, {
        key: median_ratio(times[ours], times[base])
        for key, (ours, base) in {
            "iwn fwd+bwd / addcmul": ("iwn fwd+bwd", "addcmul"),
            "gate fwd / addcmul": ("gate fwd", "addcmul"),
            "gate fwd+bwd / LN fwd+bwd": ("gate fwd+bwd", "LN fwd+bwd"),
        }.items()
    }


def phases(N, d, dtype, calls):
    """Each phase's time per call and GB/s (ideal bytes) against addcmul's:
    printed, and returned as {phase op: {"ms", "tensors", "gb_per_s"}} with
    addcmul's GB/s."""
    fns = closures(N, d, dtype)
    one = tensor_bytes((N, d), dtype)
    for fn in fns.values():
        fn()
    addcmul_s = []
    for _ in range(calls):
        start = time.perf_counter()
        fns["addcmul"]()
        addcmul_s.append(time.perf_counter() - start)
    addcmul_gbs = gb_per_s(PROXY_TENSORS * one, statistics.median(addcmul_s) * 1e3)
    print(
        f"phases at {N}x{d} {str(dtype)[6:]}: torch.profiler, {calls} calls of each op; "
        f"addcmul {addcmul_gbs:.1f} GB/s in this run"
    )
    print(f"  {'phase':<34} {'ms/call':>8} {'tensors':>8} {'GB/s':>7} {'/ addcmul':>10}")
    table = {}
    for op in ("iwn fwd+bwd", "gate fwd+bwd"):
        times = phase_times(fns[op], calls)
        for phase, (ms, tensors, gbs) in phase_rates(times, one).items():
            gbs = gbs or 0.0
            ratio = f"{gbs / addcmul_gbs:.2f}" if tensors else "-"
            print(f"  {phase[10:]:<34} {ms:>8.3f} {tensors:>8} {gbs:>7.1f} {ratio:>10}")
            table[phase] = {"ms": ms, "tensors": tensors, "gb_per_s": gbs}
        print(f"  {op + ' phases, total':<34} {sum(times.values()):>8.3f}")
    return table, addcmul_gbs


def label_order(N, d, dtype, calls, rounds):
    """IWN's phases with the labels in random order and the same labels
    sorted, the two taking turns in this process: {phase: (random ms, sorted
    ms)}, medians over the rounds, printed with their quotient."""
    steps = [iwn_training_step(N, d, dtype, sorted_labels=s) for s in (False, True)]
    for step in steps:
        step()
    runs = [[], []]
    for r in range(rounds):
        for k in (r % 2, 1 - r % 2):  # which goes first alternates
            runs[k].append(phase_times(steps[k], calls))
    table = {
        phase: tuple(statistics.median(run[phase] for run in runs[k]) for k in (0, 1))
        for phase in runs[0][0]
    }
    print(
        f"IWN phases at {N}x{d} {str(dtype)[6:]}, labels in random order and sorted, taking "
        f"turns ({rounds} rounds of {calls} calls; medians, ms per call)"
    )
    print(f"  {'phase':<34} {'random':>8} {'sorted':>8} {'random / sorted':>16}")
    for phase, (shuffled, ordered) in table.items():
        ratio = f"{shuffled / ordered:.2f}" if ordered > 0 else "-"
        print(f"  {phase[10:]:<34} {shuffled:>8.3f} {ordered:>8.3f} {ratio:>16}")
    return table


def shape_list(text):
    """'4096x768,32768x768' -> [(4096, 768), (32768, 768)]."""
    shapes = []
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]+)x([0-9]+)", part.strip())
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise argparse.ArgumentTypeError(
                f"each shape is ROWSxFEATURES, both positive, comma-separated "
                f"(e.g. 4096x768,32768x768); got {part!r}"
            )
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=shape_list, default="4096x768,32768x768")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=3, help="calls timed together in one round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--phases", action="store_true", help="then profile each op's phases")
    p.add_argument(
        "--sorted-labels",
        action="store_true",
        help="with --phases, IWN's phases also with its labels sorted (each class's rows in "
        "one run), the two taking turns: what rows of alternating classes cost",
    )
    args = p.parse_args()
    for option in ("rounds", "calls", "threads"):
        if getattr(args, option) < 1:
            p.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    if args.sorted_labels and not args.phases:
        p.error("--sorted-labels profiles phases: give --phases too")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    running = {op: _backend.planned_backend(op, "cpu") for op in ("iwn", "surgical_gate")}
    print("backends: " + ", ".join(f"{op} {name}" for op, name in running.items()))
    if "cpu" not in running.values() or len(set(running.values())) > 1:
        print("  (not the CPU kernels: these ratios measure what runs instead)")
    print(f"{'shape':>11} {'addcmul ms':>10} " + " ".join(f"{k + ' (floor)':>32}" for k in FLOORS))
    for N, d in args.shapes:
        m, ratios = measure(N, d, dtype, args.rounds, args.calls)
        cells = " ".join(f"{f'{ratios[k]:.2f} ({FLOORS[k]:.1f})':>32}" for k in FLOORS)
        print(f"{f'{N}x{d}':>11} {m['addcmul'] * 1e3:>10.2f} {cells}", flush=True)
        # The times themselves: addcmul's speed shifts with the machine's
        # memory traffic more than the fused ops' do, which moves the ratios.
        times = ", ".join(f"{name} {t * 1e3:.2f}" for name, t in m.items())
        print(f"{'':>11} ms: {times}", flush=True)
    if args.phases:
        for N, d in args.shapes:
            phases(N, d, dtype, calls=10)
            if args.sorted_labels:
                label_order(N, d, dtype, calls=5, rounds=args.rounds)


if __name__ == "__main__":
    main()
