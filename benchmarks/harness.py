"""Benchmark harness shared by every op: cases, implementations, measurement
and the end-of-run report (tables, JSON, PNG).

An op plugs in by describing its cases and its implementations (see
test_fused_iwn.py); everything else -- pytest-benchmark timing, the roofline
proxy, peak memory, speed-ups from rounds in which a case's implementations
take turns -- lives here.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# Sizes of a run: the default covers every op and the training step in a few
# minutes; SURGELLM_BENCH_FULL=1 adds the large shapes and bfloat16 (float16
# on CUDA); SURGELLM_BENCH_QUICK=1 is CI's smoke run.
QUICK = os.environ.get("SURGELLM_BENCH_QUICK", "0") not in ("", "0")
FULL = os.environ.get("SURGELLM_BENCH_FULL", "0") not in ("", "0") and not QUICK
# Overrides of the cases, e.g. for scripts/gpu_check.sh:
# SURGELLM_BENCH_SHAPES="32768x768,4096x768"  SURGELLM_BENCH_DTYPES="float16,bfloat16"
# SURGELLM_BENCH_DEVICES="cuda"
SHAPES_ENV, DTYPES_ENV = "SURGELLM_BENCH_SHAPES", "SURGELLM_BENCH_DTYPES"
DEVICES = [
    d
    for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if d in os.environ.get("SURGELLM_BENCH_DEVICES", "cpu,cuda").split(",")
]
MODES = ("eval", "train_fwd", "train_fwd_bwd")
# Tensors of x's size an ideal kernel moves, per op and mode. fused_iwn: eval
# reads x, writes y; training reads x twice (statistics, then normalize) and
# writes y; the backward reads x and dy twice and writes dx.
# fused_surgical_gate: the forward reads h, s, logits and writes z; the
# backward reads dz, h, s, logits and writes dh, ds, dlogits.
TENSORS_MOVED = {
    "fused_iwn": {"eval": 2, "train_fwd": 3, "train_fwd_bwd": 8},
    "fused_surgical_gate": {"eval": 4, "train_fwd": 4, "train_fwd_bwd": 11},
    "SurgicalGate module": {"eval": 4, "train_fwd": 4, "train_fwd_bwd": 11},
    "InstanceWeightedNorm2d": {"eval": 2, "train_fwd": 3, "train_fwd_bwd": 8},
}
# Rows that compute something else than their op, with the tensors they move
# (their GB/s and roofline count these): LayerNorm alone reads x and writes
# y, and in backward reads dy and x and writes dx.
IMPL_TENSORS = {"F.layer_norm alone": {"eval": 2, "train_fwd": 2, "train_fwd_bwd": 5}}
# Tensors of x's size each phase (dispatcher op) of an ideal kernel moves;
# the per-class tables (0) move a few rows of F values. The report prints,
# for the fused CPU kernels in training, each phase's time and GB/s against
# the proxy's in the same run (scripts/memory_wall.py --phases too).
PHASE_TENSORS = {
    "surgellm::_iwn_group_keys": 0,
    "surgellm::_iwn_group_moments": 1,  # read x
    "surgellm::_iwn_combine": 0,
    "surgellm::_iwn_apply": 2,  # read x, write y
    "surgellm::_iwn_task_sums": 2,  # read dy, x
    "surgellm::_iwn_coefficients": 0,
    "surgellm::_iwn_input_grad": 3,  # read dy, x, write dx
    "surgellm::_surgical_gate_forward": 4,  # read h, s, logits, write z
    "surgellm::_surgical_gate_backward": 7,  # read dz, h, s, logits, write dh, ds, dlogits
}
PROXY = "addcmul proxy"
COPY = "D2D copy of ideal bytes"  # CUDA roofline: copy_ moving the ideal bytes
PROXY_TENSORS = 4  # torch.addcmul(a, b, c, out=o): three reads, one write
ALLOCATOR = "default"  # set by conftest.py


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: str

    @property
    def key(self):
        return (self.op, self.mode, self.shape, str(self.dtype), self.device)

    @property
    def bytes_moved(self) -> int:
        return TENSORS_MOVED[self.op][self.mode] * tensor_bytes(self.shape, self.dtype)


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """The bytes of one tensor of this shape and dtype."""
    numel = 1
    for s in shape:
        numel *= s
    return numel * torch.empty((), dtype=dtype).element_size()


def gb_per_s(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def shapes(default: List[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """The defaults, or the override's shapes of the defaults' rank (2-D for
    the ops, 4-D for BatchNorm): one list serves every file, and a file none
    of whose rank it names runs no case."""
    text = os.environ.get(SHAPES_ENV, "").strip()
    if not text:
        return default
    given = [tuple(int(n) for n in shape.split("x")) for shape in text.split(",")]
    return [shape for shape in given if len(shape) == len(default[0])]


def sized(quick, default, full):
    """The value for this run's size (SURGELLM_BENCH_QUICK / _FULL)."""
    return quick if QUICK else full if FULL else default


def dtypes(device: str) -> List[torch.dtype]:
    text = os.environ.get(DTYPES_ENV, "").strip()
    if text:
        return [getattr(torch, name.strip()) for name in text.split(",")]
    if not FULL:
        return [torch.float32]
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def cases(op: str, default_shapes, modes=MODES) -> List[Case]:
    """The op's cases on every device present, for the shapes and dtypes of
    this run (the defaults, or the environment's overrides)."""
    return [
        Case(op, mode, shape, dtype, device)
        for device in DEVICES
        for dtype in dtypes(device)
        for shape in shapes(default_shapes)
        for mode in modes
    ]


def case_id(case: Case) -> str:
    return (
        f"{case.device}-{str(case.dtype).split('.')[-1]}-"
        f"{'x'.join(map(str, case.shape))}-{case.mode}"
    )


@dataclass
class Implementation:
    """``build(case)`` returns (fn, None) with fn() -> outputs, or (None, why).
    ``backend``: the surgellm_kernels backend it runs (its rows are left out
    where that backend cannot run at all: the report says why in one line)."""

    name: str
    build: Callable[[Case], Tuple[Optional[Callable], Optional[str]]]
    env: Dict[str, str] = field(default_factory=dict)
    backend: Optional[str] = None


def kernel_implementation(
    name: str, op: str, backend: str, make: Callable[[Case], Callable]
) -> Implementation:
    """surgellm_kernels' ``backend`` for ``op`` (forced with SURGELLM_BACKEND):
    ``make(case)`` gives the timed fn; a case that backend cannot run is
    left out with the reason (Triton interpreted on CPU tensors too: a test
    vehicle, not timed)."""
    from surgellm_kernels import backends

    def build(case):
        status = backends(torch.device(case.device), op)[backend]
        why = None if status.available else status.reason
        if why is None and backend == "triton" and case.device != "cuda":
            why = "the Triton interpreter on CPU is a test vehicle, not timed"
        return (None, why) if why is not None else (make(case), None)

    return Implementation(name, build, env={"SURGELLM_BACKEND": backend}, backend=backend)


def runnable(implementations: List[Implementation], op: str) -> List[Implementation]:
    """The implementations that can run on a device present here."""
    from surgellm_kernels import backends

    def runs(impl):
        if impl.backend == "triton":  # interpreted on CPU tensors: a test vehicle, not timed
            return "cuda" in DEVICES and backends("cuda", op)["triton"].available
        if impl.backend is not None:
            return any(backends(device, op)[impl.backend].available for device in DEVICES)
        return impl is not COPY_ROOFLINE or "cuda" in DEVICES

    return [impl for impl in implementations if runs(impl)]


@dataclass
class Row:
    op: str
    mode: str
    shape: str
    dtype: str
    device: str
    impl: str
    median_ms: Optional[float] = None
    peak_mb: Optional[float] = None
    note: str = ""
    phase_ms: Optional[Dict[str, float]] = None  # per call, fused CPU kernels in training
    # ms per call in each round of the case's implementations taking turns
    # (Report.take_turns): the report's ratios come from these
    turns_ms: Optional[List[float]] = None
    # which group of turns they came from: a case that came back after other
    # cases ran takes turns again in a group of its own, and rounds of two
    # groups are never paired into a ratio
    turn_group: Optional[int] = None

    @property
    def case(self) -> tuple:
        return (self.op, self.mode, self.shape, self.dtype, self.device)


def phase_times(fn: Callable, calls: int = 3) -> Dict[str, float]:
    """Each phase's self CPU time per call of fn (torch.profiler), in ms."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(calls):
            fn()
    return {
        e.key: e.self_cpu_time_total / 1e3 / calls
        for e in prof.key_averages()
        if e.key in PHASE_TENSORS
    }


def phase_rates(phase_ms: Dict[str, float], one_tensor: int) -> Dict[str, tuple]:
    """{phase: (ms, ideal tensors, GB/s)} of phase_times' result for tensors
    of one_tensor bytes each; GB/s None for a phase that moves only per-class
    tables (or took no measurable time)."""
    return {
        phase: (
            ms,
            PHASE_TENSORS[phase],
            gb_per_s(PHASE_TENSORS[phase] * one_tensor, ms)
            if PHASE_TENSORS[phase] and ms > 0
            else None,
        )
        for phase, ms in phase_ms.items()
    }


def _copy_of_ideal_bytes(case: Case):
    """copy_ between two device buffers of half the case's ideal bytes (a
    copy reads and writes each byte): the bandwidth a kernel moving exactly
    the ideal bytes can hope for."""
    if not case.device.startswith("cuda"):
        return None, "the device-to-device copy roofline is measured on CUDA only"
    numel = max(1, case.bytes_moved // 2)
    src = torch.empty(numel, dtype=torch.uint8, device=case.device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), None


COPY_ROOFLINE = Implementation(COPY, _copy_of_ideal_bytes)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def environment(env: Dict[str, str]):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forward_backward(forward: Callable, grad: torch.Tensor, leaves) -> Callable:
    """fn() drops the leaves' gradients (as zero_grad(set_to_none=True) does),
    runs forward().backward(grad) and returns the first leaf's gradient.
    fn.reset drops them alone: peak_bytes calls it before measuring, so that
    freeing the last call's gradients does not offset this call's memory."""
    leaves = list(leaves)

    def reset():
        for t in leaves:
            t.grad = None

    def fn():
        reset()
        forward().backward(grad)
        return leaves[0].grad

    fn.reset = reset
    return fn


def peak_bytes(fn: Callable, device: str) -> int:
    """Peak of the memory one call holds beyond its inputs: outputs, gradients
    and temporaries (CUDA: max_memory_allocated; CPU: the profiler's record of
    the allocator, which also sees the C++ kernels' scratch)."""
    if hasattr(fn, "reset"):
        fn.reset()
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def interleaved(
    fns: Dict[str, Callable],
    rounds: int,
    calls: int = 1,
    envs: Optional[Dict[str, Dict[str, str]]] = None,
    warm: bool = True,
) -> Dict[str, List[float]]:
    """Seconds per call of each fn, the fns taking turns (A B C ... B C A ...,
    the order turned each round so that none always runs first): in each
    round, one untimed call (its memory warm; not with ``warm=False``), then
    ``calls`` timed calls, in ``envs[name]``'s environment, set outside the
    timing. Within one round the fns see the same machine, so the ratio of
    their times is robust to the drift that moves a whole run."""
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with environment((envs or {}).get(name, {})):
                if warm:
                    fns[name]()
                start = time.perf_counter()
                for _ in range(calls):
                    fns[name]()
                times[name].append((time.perf_counter() - start) / calls)
    return times


def median_ratio(numerator: List[float], denominator: List[float]) -> float:
    """The median over rounds of one round's ratio (interleaved's times)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def rounds_for(seconds_per_call: float) -> int:
    budget = 0.15 if QUICK else 0.8
    lo, hi = (2, 3) if QUICK else (3, 40)
    return int(min(hi, max(lo, budget / max(seconds_per_call, 1e-6))))


def turns_for(seconds_per_round: float) -> int:
    """Rounds in which a case's implementations take turns."""
    budget = 0.2 if QUICK else 1.0
    lo, hi = (3, 3) if QUICK else (5, 15)
    return int(min(hi, max(lo, budget / max(seconds_per_round, 1e-6))))


class Report:
    def __init__(self):
        self.rows: List[Row] = []
        self._turns: Dict[str, tuple] = {}  # impl -> (row, fn, env) of the case in progress
        self._turns_case: Optional[tuple] = None
        self._finished: set = set()  # the cases whose implementations took turns
        self._groups = 0  # groups of turns taken so far
        self.interrupted = False  # set by conftest.py: no more turns
        self.picture: Optional[str] = None
        # free-form results of benchmarks that are not op cases: title -> lines
        self.sections: Dict[str, List[str]] = {}

    def add_section_line(self, title: str, line: str) -> None:
        self.sections.setdefault(title, []).append(line)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self._write_rows_file(asdict(row))

    @staticmethod
    def _write_rows_file(record) -> None:
        # SURGELLM_BENCH_ROWS=FILE: each row appended as it is measured, so
        # that a run stopped at a time limit leaves its figures behind
        # (scripts/gpu_check.sh).
        path = os.environ.get("SURGELLM_BENCH_ROWS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def begin_case(self, case: tuple) -> None:
        """Called before a case's implementation runs: a new case first
        lets the last one's implementations take their turns."""
        if self._turns and self._turns_case != case:
            self.finish_turns()
        if case in self._finished and case != self._turns_case:
            warnings.warn(
                f"benchmark case {case} came back after other cases ran (test order "
                "changed?): its implementations take turns in separate groups, and "
                "ratios between the groups are left out",
                stacklevel=2,
            )
        self._turns_case = case

    def take_turns(self, row: Row, fn: Callable, env: Dict[str, str]) -> None:
        """Keeps a measured implementation's fn until its case's last one is
        in (a case's implementations run one after another); then times them
        taking turns, and the report's ratios come from those rounds."""
        if hasattr(fn, "reset"):
            fn.reset()  # its gradients are not held while the others run
        self._turns[row.impl] = (row, fn, env)

    def finish_turns(self) -> None:
        group, self._turns = self._turns, {}
        if not group:
            return
        self._finished.add(self._turns_case)
        rows = [row for row, _, _ in group.values()]
        if self.interrupted:
            for row in rows:
                row.note = "no turns: the run was interrupted"
            return
        if len(group) < 2:
            rows[0].note = "timed alone: no other implementation of the case ran"
            return
        fns = {name: fn for name, (_, fn, _) in group.items()}
        seconds_per_round = 2e-3 * sum(row.median_ms for row in rows)  # a warm call, a timed one
        times = interleaved(
            fns,
            turns_for(seconds_per_round),
            envs={name: env for name, (_, _, env) in group.items()},
        )
        self._groups += 1
        for name, (row, fn, _) in group.items():
            if hasattr(fn, "reset"):
                fn.reset()
            row.turns_ms = [t * 1e3 for t in times[name]]
            row.turn_group = self._groups
            self._write_rows_file({"case": row.case, "impl": name, "turns_ms": row.turns_ms})

    def table_rows(self):
        """Rows with the ratios of the same run (vs eager, vs compile,
        roofline, vs copy): each the median, over the rounds in which the
        case's implementations took turns, of that round's ratio."""
        turns = {(r.turn_group, r.case, r.impl): r.turns_ms for r in self.rows if r.turns_ms}
        out = []
        for r in self.rows:
            eager, compiled, proxy, copy = (
                turns.get((r.turn_group, r.case, name))
                for name in ("eager", "torch.compile", PROXY, COPY)
            )

            def ratio(other, scale=1.0, ours=r.turns_ms):
                return median_ratio(other, ours) * scale if other and ours else None

            d = asdict(r)
            if r.median_ms is not None:
                # the table's time: the median of the turns where there were
                # turns, so that it agrees with the ratios beside it
                d["benchmark_median_ms"] = r.median_ms
                d["median_ms"] = statistics.median(r.turns_ms) if r.turns_ms else r.median_ms
                one = tensor_bytes(
                    [int(s) for s in r.shape.split("x")], getattr(torch, r.dtype.split(".")[-1])
                )
                tensors = (
                    PROXY_TENSORS
                    if r.impl == PROXY
                    else IMPL_TENSORS.get(r.impl, TENSORS_MOVED[r.op])[r.mode]
                )
                d["tensor_bytes"] = one
                d["gb_per_s"] = gb_per_s(tensors * one, d["median_ms"])
                proxy_ms = statistics.median(proxy) if proxy else None
                d["proxy_gb_per_s"] = gb_per_s(PROXY_TENSORS * one, proxy_ms) if proxy else None
                d["vs_eager"] = ratio(eager)
                d["vs_compile"] = ratio(compiled)
                # the floor: the proxy's time scaled to this mode's bytes;
                # roofline: that floor over ours (1 = at addcmul's rate)
                d["floor_ms"] = proxy_ms * tensors / PROXY_TENSORS if proxy else None
                d["roofline"] = ratio(proxy, tensors / PROXY_TENSORS)
                # CUDA: the fraction of copy bandwidth reached on this row's
                # bytes (the copy moves the op's ideal bytes)
                copied = TENSORS_MOVED[r.op][r.mode]
                d["vs_copy"] = ratio(copy, tensors / copied) if r.impl != COPY else None
            out.append(d)
        return out

    def format_tables(self) -> str:
        rows = self.table_rows()
        lines = [
            "After pytest-benchmark's rounds of each implementation alone (its table "
            "above), a case's implementations take turns (A B C ... B C A ...) for "
            f"{turns_for(1e9)}-{turns_for(0)} rounds; the tables below come from those "
            "rounds: median ms and floor are medians of the times, each ratio (vs eager, "
            "vs comp., roofline, vs copy) the median of the rounds' ratios."
        ]
        for title, section in self.sections.items():
            lines += ["", title, *section]
        for op in sorted({r["op"] for r in rows}):
            for mode in MODES:
                sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
                if not sel:
                    continue
                with_copy = any(r.get("vs_copy") for r in sel)
                lines.append("")
                lines.append(
                    f"{op} -- {mode} (floor: {PROXY} time scaled to "
                    f"{TENSORS_MOVED[op][mode]} tensors, a row that computes less to its own; "
                    f"roofline: floor / ours, 1 = at addcmul's rate from memory, which "
                    f"data held in cache between passes can beat; "
                    f"peak: memory held beyond the inputs, outputs included"
                    + (f"; vs copy: {COPY} time / ours, 1 = copy bandwidth)" if with_copy else ")")
                )
                head = (
                    f"{'shape':>11} {'dtype':>9} {'device':>6} {'implementation':<24} "
                    f"{'median ms':>10} {'vs eager':>9} {'vs comp.':>9} {'GB/s':>7} "
                    f"{'floor ms':>9} {'roofline':>8} {'peak MB':>8}"
                    + (f" {'vs copy':>7}" if with_copy else "")
                )
                lines.append(head)
                lines.append("-" * len(head))
                for r in sel:
                    if r["median_ms"] is None:
                        lines.append(
                            f"{r['shape']:>11} {r['dtype'].split('.')[-1]:>9} "
                            f"{r['device']:>6} {r['impl']:<24} {r['note']}"
                        )
                        continue

                    def fmt(v, spec):
                        return format(v, spec) if v is not None else "n/a"

                    lines.append(
                        f"{r['shape']:>11} {r['dtype'].split('.')[-1]:>9} {r['device']:>6} "
                        f"{r['impl']:<24} {r['median_ms']:>10.3f} {fmt(r['vs_eager'], '>8.2f')}x "
                        f"{fmt(r['vs_compile'], '>8.2f')}x {r['gb_per_s']:>7.1f} "
                        f"{fmt(r['floor_ms'], '>9.3f')} "
                        f"{fmt(r['roofline'], '>8.2f')} {fmt(r['peak_mb'], '>8.1f')}"
                        + (f" {fmt(r.get('vs_copy'), '>7.2f')}" if with_copy else "")
                        + (f"  ({r['note']})" if r["note"] else "")
                    )
                lines += self._phase_lines(sel)
        return "\n".join(lines)

    @staticmethod
    def _phase_lines(sel) -> List[str]:
        """Per phase of the rows that have them: ms per call, ideal tensors,
        GB/s of their bytes, and that GB/s over the proxy's in the same run."""
        lines = []
        for r in sel:
            if not r.get("phase_ms"):
                continue
            proxy_gbs = r["proxy_gb_per_s"]
            lines.append(
                f"  phases of {r['impl']} at {r['shape']} {r['dtype'].split('.')[-1]}: "
                "ms per call, ideal tensors, GB/s"
                + (f", GB/s / {PROXY} ({proxy_gbs:.1f} GB/s)" if proxy_gbs else "")
            )
            for phase, (ms, tensors, gbs) in phase_rates(r["phase_ms"], r["tensor_bytes"]).items():
                lines.append(
                    f"    {phase.split('::')[-1]:<26} {ms:>8.3f} {tensors:>3}"
                    + (f" {gbs:>7.1f}" if gbs else f" {'-':>7}")
                    + (f" {gbs / proxy_gbs:>6.2f}" if gbs and proxy_gbs else "")
                )
        return lines

    def save(self, folder: str) -> List[str]:
        os.makedirs(folder, exist_ok=True)
        meta = machine_info()
        json_path = os.path.join(folder, "results.json")
        with open(json_path, "w") as f:
            json.dump(
                {"machine": meta, "rows": self.table_rows(), "sections": self.sections}, f, indent=1
            )
        paths = [json_path]
        png = self._plot(os.path.join(folder, "speedup.png"), meta)
        if png:
            paths.append(png)
        return paths

    def _plot(self, path: str, meta) -> Optional[str]:
        """Speed-up over eager per case, one panel per (op, mode) measured."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
        except ImportError:
            return None
        rows = [r for r in self.table_rows() if r.get("vs_eager") and r["impl"] != "eager"]
        panels = sorted(
            {(r["op"], r["mode"]) for r in rows}, key=lambda p: (p[0], MODES.index(p[1]))
        )
        if not panels:
            return None
        columns = min(3, len(panels))
        lines = -(-len(panels) // columns)
        fig, axes = plt.subplots(
            lines, columns, figsize=(6.5 * columns, 4.6 * lines + 1.4), squeeze=False
        )
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        ticks = [2.0**k for k in range(-6, 8)]
        for ax, (op, mode) in zip(axes.flat, panels):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            cases = sorted(
                {(r["shape"], r["dtype"].split(".")[-1], r["device"]) for r in sel},
                key=lambda c: (c[2], c[1], [int(s) for s in c[0].split("x")]),
            )
            impls = sorted({r["impl"] for r in sel})
            width = 0.8 / max(1, len(impls))
            for k, impl in enumerate(impls):
                values = []
                for c in cases:
                    match = [
                        r["vs_eager"]
                        for r in sel
                        if r["impl"] == impl
                        and (r["shape"], r["dtype"].split(".")[-1], r["device"]) == c
                    ]
                    values.append(match[0] if match else float("nan"))
                ax.bar([x + k * width for x in range(len(cases))], values, width, label=impl)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}\u00d7"))
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
            ax.set_xticklabels([" ".join(c) for c in cases], fontsize=7, rotation=30, ha="right")
            ax.set_title(f"{op}: {mode.replace('_', ' ')}")
            ax.set_ylabel("speed-up over eager PyTorch")
            ax.legend(fontsize=7)
        fig.suptitle(
            f"surgellm_kernels, {meta['date']}: {meta['cpu']}, {meta['threads']} "
            f"threads, torch {meta['torch']}",
            fontsize=9,
        )
        fig.text(0.01, 0.005, CAPTION, fontsize=7, va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 1.2 / (4.6 * lines + 1.4), 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


CAPTION = (
    "Bars: how many times faster than the eager PyTorch reference (above 1x: faster). "
    "eager: the paper's equations in PyTorch ops; torch.compile: that reference compiled; "
    "F.batch_norm / F.layer_norm: ATen's own norm on the same tensor, which computes less "
    "(no classes, no gate, no blend); addcmul proxy: torch.addcmul(a, b, c, out=d), one op "
    "that reads three tensors and writes one -- the time this machine needs to move that "
    "many bytes from memory (a kernel whose data stay in cache between its passes can beat it)."
)


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):  # other work shares the cores: the ratios are noisier
        info["load average (1 min)"] = round(os.getloadavg()[0], 2)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from surgellm_kernels.ops import _backend

        info["backends"] = _backend.summary()
    except Exception:  # the report must not fail on this
        info["backends"] = "unknown"
    info.update(allocator=ALLOCATOR, size="quick" if QUICK else "full" if FULL else "default")
    return info


def run_case(benchmark, report: Report, case: Case, impl: Implementation) -> None:
    """Times one implementation on one case, or records why it cannot run."""
    import pytest

    row = Row(
        case.op, case.mode, "x".join(map(str, case.shape)), str(case.dtype), case.device, impl.name
    )
    report.begin_case(row.case)
    with environment(impl.env):
        fn, why = impl.build(case)
        if fn is None:
            row.note = f"not run: {why}"
            report.add(row)
            pytest.skip(why)

        def timed():
            out = fn()
            sync(case.device)
            return out

        if hasattr(fn, "reset"):  # for take_turns: no gradients held while others run
            timed.reset = fn.reset
        timed()  # warm-up (compilation happens here)
        timed()
        start = time.perf_counter()  # a call after the warm-up sets the rounds
        timed()
        per_call = time.perf_counter() - start
        row.peak_mb = peak_bytes(fn, case.device) / 2**20
        benchmark.extra_info.update({"op": case.op, "mode": case.mode, "impl": impl.name})
        benchmark.pedantic(timed, rounds=rounds_for(per_call), iterations=1, warmup_rounds=1)
        if impl.backend == "cpu" and case.device == "cpu" and case.mode == "train_fwd_bwd":
            row.phase_ms = phase_times(fn)
    row.median_ms = benchmark.stats.stats.median * 1e3
    report.add(row)
    report.take_turns(row, timed, impl.env)
