"""Compile every Triton kernel configuration the launchers produce, ahead of
time and without a GPU, for sm_80 and sm_90; print each kernel's registers,
shared memory and local memory (spills). Exit 1 on a compile error or a spill.

    .venv/bin/python scripts/triton_aot.py [--arch 80 90] [--json FILE] [--jobs N]

The Triton interpreter that runs the kernels on CPU in the test suite never
runs the GPU compiler, so code it accepts can still fail to compile for a
GPU. This script takes the configurations from the launchers themselves
rather than from a list kept by hand: it runs the real ops
(``surgellm::iwn`` and ``surgellm::surgical_gate``, forward and backward) on
small CPU tensors with the Triton kernels registered for CPU, over every
dtype, gate form, affine choice, task layout, training / eval and std_mode,
and over the widths 1...4096 (scripts/call_every_kernel.py), which change the
specialization attributes (e.g. divisibility by 16, and the surgical gate's
tiling). Each launch is stopped before it reaches a driver and bound by
Triton's own JIT binder for each target, which gives the signature,
constexprs, specialization attributes and options the JIT would compile on
that GPU. Each distinct one is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` and
its cubin read with the ``cuobjdump`` shipped with Triton.

Written against Triton's JIT binder (triton 3.9); run without TRITON_INTERPRET.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- recording launches ----------------------------------------------------------------


class Recorder:
    """Replaces JITFunction.run: binds each launch for every target, keeps the
    distinct (kernel, target, specialization, options), launches nothing."""

    def __init__(self, archs):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.triton = triton
        self.targets = {cc: GPUTarget("cuda", cc, 32) for cc in archs}
        self.backends = {cc: make_backend(t) for cc, t in self.targets.items()}
        self.binders = {}
        self.configs = {}  # key -> config dict

    def run(self, fn, args, kwargs):
        from triton.runtime.jit import create_function_from_signature

        for cc, backend in self.backends.items():
            binder = self.binders.get((fn, cc))
            if binder is None:
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                self.binders[(fn, cc)] = binder
            bound, specialization, options = binder(*args, **kwargs)
            key = (fn.__name__, cc, str(specialization), str(options))
            if key in self.configs:
                continue
            options, signature, constexprs, attrs = fn._pack_args(
                backend, kwargs, bound, specialization, options
            )
            self.configs[key] = dict(
                fn=fn,
                cc=cc,
                signature=signature,
                constexprs=constexprs,
                attrs=attrs,
                options=options,
            )

    def install(self):
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.run(self, args, kwargs)

        self.triton.runtime.jit.JITFunction.run = run


def unlaunched_kernels(launched):
    """Jitted functions of surgellm_kernels.triton that no drive launched and
    no other jitted function calls (helpers are inlined into their callers)."""
    import importlib
    import pkgutil

    import triton

    import surgellm_kernels.triton as package

    jitted = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        jitted.update(
            {
                name: obj
                for name, obj in vars(module).items()
                if isinstance(obj, triton.runtime.jit.JITFunction)
            }
        )
    called = {
        name
        for name in jitted
        if any(re.search(rf"\b{name}\(", other.src) for o, other in jitted.items() if o != name)
    }
    return sorted(set(jitted) - called - set(launched))


# -- compiling -------------------------------------------------------------------------

_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_CONFIGS = []  # filled before the worker processes fork


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvidia_tool(name):
    """A binary shipped with Triton's NVIDIA backend."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _report(pattern, tool, *args_and_input, output=False):
    """Runs ``tool args... FILE`` on the bytes given (written to a temporary
    file with the suffix given last); returns ``pattern``'s match in its
    stdout and stderr, or raises RuntimeError."""
    *args, data, suffix = args_and_input
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        extra = ["-o", os.path.join(tmp, "out.cubin")] if output else []
        proc = subprocess.run([tool, *args, path, *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(tool)} failed ({proc.returncode}): {proc.stderr}")
    match = pattern.search(proc.stdout + proc.stderr)
    if match is None:
        raise RuntimeError(
            f"nothing matches {pattern.pattern!r} in the output of "
            f"{os.path.basename(tool)}:\n{proc.stdout}{proc.stderr}"
        )
    return match


def compile_config(index):
    """Compiles _CONFIGS[index]; returns its resource usage or its error."""
    import triton

    c = _CONFIGS[index]
    names = c["fn"].arg_names
    row = dict(
        kernel=c["fn"].__name__,
        arch=f"sm_{c['cc']}",
        num_warps=c["options"].num_warps,
        constexprs={names[k[0]]: str(v) for k, v in c["constexprs"].items()},
        signature=" ".join(v for v in c["signature"].values() if v != "constexpr"),
        # the arguments specialized as multiples of 16 (pointers: 16-byte aligned)
        attrs="div16: "
        + ",".join(names[k[0]] for k, v in c["attrs"].items() if ["tt.divisibility", 16] in v),
    )
    try:
        src = triton.compiler.ASTSource(c["fn"], c["signature"], c["constexprs"], c["attrs"])
        target = triton.backends.compiler.GPUTarget("cuda", c["cc"], 32)
        kernel = triton.compile(src, target=target, options=c["options"].__dict__)
        usage = _report(
            _RESOURCE,
            _nvidia_tool("cuobjdump"),
            "--dump-resource-usage",
            kernel.asm["cubin"],
            ".cubin",
        )
        # Triton's shared memory is dynamic (the launch asks for metadata.shared
        # bytes); the cubin's SHARED is the static part.
        row.update(
            registers=int(usage.group(2)),
            stack=int(usage.group(3)),
            shared=int(usage.group(4)) + kernel.metadata.shared,
            local=int(usage.group(5)),
            spill_stores=0,
            spill_loads=0,
        )
        if row["stack"] or row["local"]:
            # A stack frame is either spilled registers or a call's frame: the
            # report of the ptxas Triton uses for this target, with its flags, tells.
            from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

            spills = _report(
                _SPILLS,
                get_ptxas(c["cc"]).path,
                "-v",
                "-lineinfo",
                "--regAllocOptLevel=2",
                # as Triton's own ptxas call: no contraction unless fp fusion is on
                *([] if c["options"].enable_fp_fusion else ["--fmad=false"]),
                f"--gpu-name={sm_arch_from_capability(c['cc'])}",
                kernel.asm["ptx"].encode(),
                ".ptx",
                output=True,
            )
            row.update(spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
    except Exception as exc:  # reported, and fails the run
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write every configuration's row to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--kernels", nargs="+", help="compile only these kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run without TRITON_INTERPRET (the interpreter compiles nothing)")
    sys.path.insert(0, REPO)

    from call_every_kernel import call_every_kernel, use_backend

    recorder = Recorder(args.arch)
    recorder.install()
    use_backend("cpu", "triton")
    call_every_kernel("cpu")
    missing = unlaunched_kernels({c["fn"].__name__ for c in recorder.configs.values()})
    if missing:
        print(f"kernels no op call launched (extend drive_ops): {', '.join(missing)}")
        return 1
    _CONFIGS.extend(
        sorted(
            (
                c
                for c in recorder.configs.values()
                if not args.kernels or c["fn"].__name__ in args.kernels
            ),
            key=lambda c: (c["fn"].__name__, c["cc"], str(c["constexprs"])),
        )
    )
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        rows = list(pool.map(compile_config, range(len(_CONFIGS))))

    print(
        f"{'kernel':22s} {'arch':6s} {'warps':>5s} {'regs':>4s} {'shared':>7s} "
        f"{'stack':>5s} {'spill':>5s}  constexprs  specialization"
    )
    failed = []
    for row in rows:
        consts = ",".join(f"{k}={v}" for k, v in row["constexprs"].items())
        if "error" in row:
            failed.append(row)
            print(f"{row['kernel']:22s} {row['arch']:6s} COMPILE ERROR  {consts}")
            continue
        spilled = row["spill_stores"] > 0 or row["local"] > 0
        if spilled:
            failed.append(row)
        print(
            f"{row['kernel']:22s} {row['arch']:6s} {row['num_warps']:5d} {row['registers']:4d} "
            f"{row['shared']:7d} {row['stack']:5d} {row['spill_stores']:5d}  {consts}  "
            f"{row['attrs']}" + ("  SPILL" if spilled else "")
        )
    kernels = sorted({r["kernel"] for r in rows})
    print(
        f"{len(rows)} configurations of {len(kernels)} kernels "
        f"({', '.join(kernels)}) for {', '.join(f'sm_{a}' for a in args.arch)}: "
        f"{len(rows) - len(failed)} compiled without spills, {len(failed)} failed"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for row in failed:
        print(
            f"\nFAILED {row['kernel']} {row['arch']} {row['constexprs']} {row['attrs']}:\n"
            f"{row.get('error', 'registers spilled to local memory')}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
