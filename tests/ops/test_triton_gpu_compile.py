"""The Triton kernels of fused_iwn compile for a GPU, with 64-bit row offsets.

The rest of the suite runs the kernels on CPU tensors under the Triton
interpreter, which never runs the GPU compiler: a kernel can pass there and
still fail to compile for CUDA. Here every kernel of
surgellm_kernels/triton/iwn.py is compiled ahead of time for sm_90
(``triton.compile`` to a cubin, no GPU needed) for representative constexpr
choices, and the generated TTIR is checked: every address computed from a
pointer whose offset multiplies a row, chunk, group or task index by F must
use an int64 offset, so N * F >= 2**31 cannot overflow.

Under TRITON_INTERPRET=1 (set by the repository's conftest.py on machines
without a GPU) ``@triton.jit`` gives interpreter objects that cannot be
compiled, so the compilation runs in a subprocess without that variable (this
file is also that subprocess's script).
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = ("cuda", 90, 32)  # sm_90, warp size 32

# Device functions called by the kernels (inlined into them), never launched.
HELPERS = {"_row_keys", "_load_u", "_group_tile", "_join_parts"}

_DT = {"fp32": ("*fp32", "*fp32"), "bf16": ("*bf16", "*fp32"), "fp64": ("*fp64", "*fp64")}


def _rows_sig(dt, gate_mode):
    """x, gate and keys of a row kernel: data pointer type and the gate's."""
    data, acc = _DT[dt]
    return data, acc, {0: acc, 1: acc, 2: data}[gate_mode]


def _cases():
    """(case id, kernel name, signature, constexprs (ACC as a dtype name), and
    the pointer arguments whose addresses must be computed in int64)."""
    cases = []

    for dt, mode, keys, one in (
        ("fp32", 1, True, False),
        ("bf16", 2, True, True),
        ("fp64", 0, False, False),
        ("fp32", 0, True, True),
    ):
        data, acc, gate = _rows_sig(dt, mode)
        sig = dict(
            x_ptr=data,
            gate_ptr=gate,
            keys_ptr="*i32",
            pcount_ptr=acc,
            pmean_ptr=acc,
            pm2_ptr=acc,
            pres_ptr=acc,
            N="i32",
            F="i32",
            G="i32",
            ROWS_PER_CHUNK="i32",
        )
        const = dict(
            GATE_MODE=mode,
            HAS_KEYS=keys,
            ONE_CHUNK=one,
            ACC=acc,
            BLOCK_N=8,
            BLOCK_F=64,
            GROUP_TILE=16,
        )
        wide = ["x_ptr", "pcount_ptr", "pmean_ptr", "pm2_ptr", "pres_ptr"]
        wide += ["keys_ptr"] if keys else []
        wide += ["gate_ptr"] if mode == 2 else []
        cases.append(
            (
                f"moments_partial-{dt}-gate{mode}-keys{int(keys)}-one{int(one)}",
                "_moments_partial",
                sig,
                const,
                wide,
            )
        )

    for dt in ("fp32", "fp64"):
        acc = _DT[dt][1]
        sig = dict(p_ptr=acc, out_ptr=acc, M="i32", NUM_CHUNKS="i32")
        cases.append(
            (f"sum_chunks-{dt}", "_sum_chunks", sig, dict(ACC=acc, BLOCK=256), ["p_ptr", "out_ptr"])
        )

    for dt, mode, keys, affine in (
        ("fp32", 1, True, True),
        ("bf16", 2, True, False),
        ("fp64", 0, False, True),
    ):
        data, acc, gate = _rows_sig(dt, mode)
        sig = dict(
            x_ptr=data,
            gate_ptr=gate,
            keys_ptr="*i32",
            w_ptr=acc,
            b_ptr=acc,
            mu_ptr=acc,
            sigma_ptr=acc,
            y_ptr=data,
            N="i32",
            F="i32",
            NUM_KEYS="i32",
            KEY_DIV="i32",
            eps_hi="fp32",
            eps_mid="fp32",
            eps_lo="fp32",
        )
        const = dict(
            GATE_MODE=mode,
            HAS_KEYS=keys,
            HAS_W=affine,
            HAS_B=affine,
            ACC=acc,
            BLOCK_N=8,
            BLOCK_F=64,
        )
        wide = ["x_ptr", "y_ptr", "mu_ptr", "sigma_ptr"] + (["keys_ptr"] if keys else [])
        wide += ["gate_ptr"] if mode == 2 else []
        cases.append((f"apply-{dt}-gate{mode}-keys{int(keys)}", "_apply", sig, const, wide))

    for dt, mode, keys in (("fp32", 1, True), ("bf16", 2, True), ("fp64", 0, False)):
        data, acc, gate = _rows_sig(dt, mode)
        sig = dict(
            dy_ptr=data,
            x_ptr=data,
            gate_ptr=gate,
            keys_ptr="*i32",
            mu_ptr=acc,
            ps_ptr=acc,
            N="i32",
            F="i32",
            T="i32",
            NUM_KEYS="i32",
            KEY_DIV="i32",
            ROWS_PER_CHUNK="i32",
        )
        const = dict(GATE_MODE=mode, HAS_KEYS=keys, ACC=acc, BLOCK_N=8, BLOCK_F=64, GROUP_TILE=16)
        wide = ["dy_ptr", "x_ptr", "mu_ptr", "ps_ptr"] + (["keys_ptr"] if keys else [])
        wide += ["gate_ptr"] if mode == 2 else []
        cases.append(
            (f"task_sums-{dt}-gate{mode}-keys{int(keys)}", "_task_sums_partial", sig, const, wide)
        )

    for dt, mode, keys, training in (
        ("fp32", 1, True, True),
        ("fp32", 1, True, False),
        ("bf16", 2, True, True),
        ("fp64", 0, False, False),
    ):
        data, acc, gate = _rows_sig(dt, mode)
        sig = dict(
            dy_ptr=data,
            x_ptr=data,
            gate_ptr=gate,
            keys_ptr="*i32",
            scale_ptr=acc,
            shift_ptr=acc,
            devc_ptr=acc,
            cen_ptr=acc,
            dx_ptr=data,
            dgate_ptr=data if mode == 2 else acc,
            pgate_ptr=acc,
            N="i32",
            F="i32",
            NUM_KEYS="i32",
            KEY_DIV="i32",
            ROWS_PER_CHUNK="i32",
        )
        const = dict(
            GATE_MODE=mode, HAS_KEYS=keys, TRAINING=training, ACC=acc, BLOCK_N=8, BLOCK_F=64
        )
        wide = ["dy_ptr", "dx_ptr", "scale_ptr"] + (["keys_ptr"] if keys else [])
        wide += ["x_ptr"] if training or mode else []  # else u is unused: no load of x
        wide += ["shift_ptr", "devc_ptr", "cen_ptr"] if training else []
        wide += ["gate_ptr", "dgate_ptr"] if mode == 2 else []
        wide += ["pgate_ptr"] if mode == 1 and not training else []
        cases.append(
            (
                f"input_grad-{dt}-gate{mode}-keys{int(keys)}-train{int(training)}",
                "_input_grad",
                sig,
                const,
                wide,
            )
        )
    return cases


CASES = _cases()
CASE_IDS = [c[0] for c in CASES]


# -- the subprocess: compile everything, write TTIR (or the error) as JSON ---------------


def _compile_all(out_path):
    sys.path.insert(0, REPO)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from surgellm_kernels.triton import iwn

    target = GPUTarget(*TARGET)
    acc_types = {"*fp32": tl.float32, "*fp64": tl.float64}

    def compile_one(fn, sig, const):
        const = {k: (acc_types[v] if k == "ACC" else v) for k, v in const.items()}
        signature = dict(sig, **{k: "constexpr" for k in const})
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const)
        return triton.compile(src, target=target).asm["ttir"]

    @triton.jit
    def _int32_rows_control(x_ptr, y_ptr, N, F, BLOCK_N: tl.constexpr):
        # The regression the test must catch: a row index times F in int32.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + rows * F, tl.load(x_ptr + rows * F, mask=rows < N), mask=rows < N)

    result = compile_cases(iwn, CASES, lambda fn, case: compile_one(fn, case[2], case[3]))
    result["control"] = compile_one(
        _int32_rows_control, dict(x_ptr="*fp32", y_ptr="*fp32", N="i32", F="i32"), dict(BLOCK_N=8)
    )
    with open(out_path, "w") as f:
        json.dump(result, f)


def compile_cases(module, cases, compile_case) -> dict:
    """In the subprocess: the names of ``module``'s jitted functions, and for
    each case (case id, kernel name, ...) the TTIR that
    ``compile_case(kernel, case)`` gives, or its error -- reported by the
    test that owns the case, not here."""
    import triton

    result = {
        "jit_functions": sorted(
            name
            for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.jit.JITFunction)
        ),
        "cases": {},
    }
    for case in cases:
        case_id, name = case[0], case[1]
        try:
            result["cases"][case_id] = {"ttir": compile_case(getattr(module, name), case)}
        except Exception as exc:
            result["cases"][case_id] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


# -- the test process -------------------------------------------------------------------


def compile_in_subprocess(script: str, tmp) -> dict:
    """Runs ``script`` (a compile-test file run as a program) without
    TRITON_INTERPRET, so that it compiles for real, and returns its JSON result."""
    out = tmp / "result.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, leave no cache behind
    proc = subprocess.run(
        [sys.executable, script, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"compilation subprocess failed (rc {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_in_subprocess(
        os.path.abspath(__file__), tmp_path_factory.mktemp("triton_gpu_compile")
    )


_DEF = re.compile(
    r"^\s*(%[\w.$-]+) = tt\.(splat|broadcast|expand_dims|reshape|addptr) "
    r"(%[\w.$-]+)(.*)$"
)
_USE = re.compile(r"\btt\.(load|store) (%[\w.$-]+)")


def _is_i64(ty):
    return ty == "i64" or ty.endswith("xi64>")


def _accesses(ttir, arg):
    """For every tt.load / tt.store through a pointer derived from the kernel
    argument ``arg`` (by splat / broadcast / expand_dims / reshape / addptr):
    the types of the offsets added on the way, in order. Canonicalization may
    split ``ptr + (k * F + cols)`` into a 64-bit ``k * F`` step and a 32-bit
    ``cols`` step, so the rule checked is that some step is 64-bit."""
    chains = {f"%{arg}": []}
    found = []
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m and m.group(3) in chains:
            chain = chains[m.group(3)]
            if m.group(2) == "addptr":  # "... : <pointer type>, <offset type> loc(...)"
                chain = chain + [m.group(4).split(" loc(")[0].rsplit(",", 1)[1].strip()]
            chains[m.group(1)] = chain
            continue
        for _op, ptr in _USE.findall(line):
            if ptr in chains:
                found.append(chains[ptr])
    return found


def check_compiled_with_64bit_offsets(entry, name, wide):
    """Kernel ``name`` compiled, and every load and store through each
    pointer argument in ``wide`` has a 64-bit offset step."""
    assert "error" not in entry, f"{name} does not compile for sm_90: {entry.get('error')}"
    ttir = entry["ttir"]
    assert f"tt.func public @{name}(" in ttir
    for arg in wide:
        chains = _accesses(ttir, arg)
        assert chains, f"{name}: nothing loaded or stored through {arg} (test out of date?)"
        narrow = [c for c in chains if not any(_is_i64(t) for t in c)]
        assert not narrow, f"{name}: {arg} addressed with 32-bit offsets only: {narrow}"


def check_every_kernel_has_a_case(compiled, cases, helpers):
    launched = set(compiled["jit_functions"]) - helpers
    covered = {c[1] for c in cases}
    assert launched == covered, (
        f"kernels without a compile case: {launched - covered}; "
        f"cases for unknown kernels: {covered - launched}"
    )


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_compiles_with_64bit_offsets(compiled, case_id):
    _id, name, _sig, _const, wide = CASES[CASE_IDS.index(case_id)]
    check_compiled_with_64bit_offsets(compiled["cases"][case_id], name, wide)


def test_every_kernel_has_a_case(compiled):
    check_every_kernel_has_a_case(compiled, CASES, HELPERS)


def test_offset_check_catches_int32_rows(compiled):
    chains = _accesses(compiled["control"], "x_ptr")
    assert chains and not any(_is_i64(t) for c in chains for t in c), chains


if __name__ == "__main__":
    _compile_all(sys.argv[1])
