"""The Triton kernels of fused_surgical_gate compile for a GPU, with 64-bit row offsets.

The same check as test_triton_gpu_compile.py (whose helpers this file uses),
for surgellm_kernels/triton/surgical_gate.py: every kernel is compiled ahead
of time for sm_90 (``triton.compile`` to a cubin, no GPU needed) for the
tilings its launchers pick (one long row per program, many short rows per
program, the longest row allowed) and with and without weight and bias, with
the launchers' warp counts; in the generated TTIR every load and store
through a row-indexed pointer (rows * d + cols, or the per-row mean and rstd,
or a program's partial row) must have a 64-bit offset.

The compilation runs in a subprocess without TRITON_INTERPRET (this file is
also that subprocess's script), as there.
"""

import json
import os
import sys

import pytest

pytest.importorskip("triton")

from test_triton_gpu_compile import (  # noqa: E402
    _DT,
    REPO,
    TARGET,
    check_compiled_with_64bit_offsets,
    check_every_kernel_has_a_case,
    compile_cases,
    compile_in_subprocess,
)

# Device functions called by the kernels (inlined into them), never launched.
HELPERS = {"_blend", "_row_sum", "_store_z", "_backward_tile", "_backward_block", "_join_parts"}


def _cases():
    """(case id, kernel name, signature, constexprs (ACC as a dtype name), the
    feature count d whose tiling (ROWS, BLOCK_D, warps) the launcher would
    use, and the pointer arguments whose addresses must be computed in int64)."""
    cases = []
    # d: 4096 and 16384 rows in blocks, 64 and 7 many rows per program
    for dt, d, w, b in (
        ("fp32", 4096, True, True),
        ("bf16", 64, False, False),
        ("fp64", 7, True, False),
        ("fp32", 16384, False, True),
        ("fp64", 16384, True, True),
    ):
        data, acc = _DT[dt]
        sig = dict(
            h_ptr=data,
            s_ptr=data,
            l_ptr=data,
            w_ptr=acc,
            b_ptr=acc,
            z_ptr=data,
            mean_ptr=acc,
            rstd_ptr=acc,
            N="i32",
            D="i32",
            eps_hi="fp32",
            eps_mid="fp32",
            eps_lo="fp32",
        )
        cases.append(
            (
                f"forward-{dt}-d{d}-w{int(w)}-b{int(b)}",
                "_forward",
                sig,
                dict(HAS_W=w, HAS_B=b, ACC=acc),
                d,
                ["h_ptr", "s_ptr", "l_ptr", "z_ptr", "mean_ptr", "rstd_ptr"],
            )
        )
    for dt, d, w in (
        ("fp32", 4096, True),
        ("bf16", 64, False),
        ("fp64", 7, True),
        ("fp32", 16384, False),
    ):
        data, acc = _DT[dt]
        sig = dict(
            dz_ptr=data,
            h_ptr=data,
            s_ptr=data,
            l_ptr=data,
            w_ptr=acc,
            mean_ptr=acc,
            rstd_ptr=acc,
            dh_ptr=data,
            ds_ptr=data,
            dl_ptr=data,
            pw_ptr=acc,
            pb_ptr=acc,
            c_ptr=acc,
            N="i32",
            D="i32",
            ROWS_PER_PROGRAM="i32",
        )
        wide = [
            "dz_ptr",
            "h_ptr",
            "s_ptr",
            "l_ptr",
            "mean_ptr",
            "rstd_ptr",
            "dh_ptr",
            "ds_ptr",
            "dl_ptr",
            "pw_ptr",
            "pb_ptr",
        ]
        wide += ["c_ptr"] if d > 1024 else []  # rows in blocks: the row sums' scratch
        cases.append(
            (f"backward-{dt}-d{d}-w{int(w)}", "_backward", sig, dict(HAS_W=w, ACC=acc), d, wide)
        )
    # d == 1: a launch passes it as the constexpr 1 (Triton specializes
    # integer arguments equal to 1; N is exempt, see triton/surgical_gate.py)
    data, acc = _DT["fp32"]
    sig = dict(
        h_ptr=data,
        s_ptr=data,
        l_ptr=data,
        w_ptr=acc,
        b_ptr=acc,
        z_ptr=data,
        mean_ptr=acc,
        rstd_ptr=acc,
        N="i32",
        D="constexpr",
        eps_hi="fp32",
        eps_mid="fp32",
        eps_lo="fp32",
    )
    cases.append(
        (
            "forward-fp32-d1",
            "_forward",
            sig,
            dict(D=1, HAS_W=True, HAS_B=True, ACC=acc),
            1,
            ["h_ptr", "s_ptr", "l_ptr", "z_ptr", "mean_ptr", "rstd_ptr"],
        )
    )
    sig = dict(
        dz_ptr=data,
        h_ptr=data,
        s_ptr=data,
        l_ptr=data,
        w_ptr=acc,
        mean_ptr=acc,
        rstd_ptr=acc,
        dh_ptr=data,
        ds_ptr=data,
        dl_ptr=data,
        pw_ptr=acc,
        pb_ptr=acc,
        c_ptr=acc,
        N="i32",
        D="constexpr",
        ROWS_PER_PROGRAM="i32",
    )
    cases.append(
        (
            "backward-fp32-d1",
            "_backward",
            sig,
            dict(D=1, HAS_W=True, ACC=acc),
            1,
            [
                "dz_ptr",
                "h_ptr",
                "s_ptr",
                "l_ptr",
                "mean_ptr",
                "rstd_ptr",
                "dh_ptr",
                "ds_ptr",
                "dl_ptr",
                "pw_ptr",
                "pb_ptr",
            ],
        )
    )
    for dt in ("fp32", "fp64"):
        acc = _DT[dt][1]
        sig = dict(pw_ptr=acc, pb_ptr=acc, dw_ptr=acc, db_ptr=acc, D="i32", NUM_PROGRAMS="i32")
        cases.append(
            (
                f"sum_partials-{dt}",
                "_sum_partials",
                sig,
                dict(ACC=acc),
                None,
                ["pw_ptr", "pb_ptr", "dw_ptr", "db_ptr"],
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

    from surgellm_kernels.triton import surgical_gate as sg

    target = GPUTarget(*TARGET)
    acc_types = {"*fp32": tl.float32, "*fp64": tl.float64}

    def compile_one(fn, sig, const, d):
        const = {k: (acc_types[v] if k == "ACC" else v) for k, v in const.items()}
        itemsize = 8 if const["ACC"] == tl.float64 else 4
        if d is None:  # _sum_partials
            const["BLOCK"] = sg.BLOCK_SUM
            warps = 4
        else:  # what the launchers pass for rows of d features
            meta = sg._tiling(d, itemsize)
            warps = meta.pop("num_warps")
            const.update(meta)
        signature = dict(sig, **{k: "constexpr" for k in const})
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const)
        return triton.compile(src, target=target, options={"num_warps": warps}).asm["ttir"]

    result = compile_cases(sg, CASES, lambda fn, case: compile_one(fn, *case[2:5]))
    with open(out_path, "w") as f:
        json.dump(result, f)


# -- the test process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_in_subprocess(
        os.path.abspath(__file__), tmp_path_factory.mktemp("triton_gpu_compile_surgical_gate")
    )


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_compiles_with_64bit_offsets(compiled, case_id):
    _id, name, _sig, _const, _d, wide = CASES[CASE_IDS.index(case_id)]
    check_compiled_with_64bit_offsets(compiled["cases"][case_id], name, wide)


def test_every_kernel_has_a_case(compiled):
    check_every_kernel_has_a_case(compiled, CASES, HELPERS)


if __name__ == "__main__":
    _compile_all(sys.argv[1])
