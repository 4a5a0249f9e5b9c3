"""Triton kernels of ``fused_surgical_gate``: a forward and a backward launcher.

Notation: rows of h, s and gate_logits (N, d); per row, g = sigmoid(logits),
v = g * h + (1 - g) * s (the blend), mean and rstd = 1 / sqrt(var + eps) of v
over its d features (population variance), xhat = (v - mean) * rstd and
z = xhat * weight + bias (weight 1 and bias 0 when None). "acc" is the
accumulation dtype: float64 for float64 data, else float32; every statistic
is in acc.

Functions (each registered by surgellm_kernels/ops/_backend.py as the kernel
of the dispatcher op named in ``KERNELS``).
Their inputs are contiguous and in the dtypes the op's schema promises (the
C++ caller converts); their outputs are freshly allocated:

  surgical_gate_forward   z (N, d) in h's dtype, mean and rstd (N,) in acc
  surgical_gate_backward  dh, ds, dlogits (N, d) in h's dtype; dweight and
                          dbias (d,) in acc, always computed

The forward saves only mean and rstd: the backward recomputes the blend from
h, s and the logits. The variance is two-pass (the row mean first, then the
mean of the squared deviations from it), so rows with a large mean keep
their precision; the mean itself is corrected by the mean of the
deviations from its rounded first value, so a constant row has mean exactly
its value, variance 0 and z = bias. Backward, per row, with dxhat = dz * weight:

  dv = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
  dh = dv * g;  ds = dv * (1 - g);  dlogits = dv * (h - s) * g * (1 - g)

Tiling: a program handles ROWS rows of BLOCK_D = next_power_of_2(d) columns
at a time, held in registers, a tile of TILE_BYTES in acc (one row per
program for long rows, many short rows per program for small d), with warps
enough for BYTES_PER_THREAD bytes of each tile tensor per thread: sizes that
scripts/triton_aot.py compiles for sm_80 and sm_90 without spilling
registers. A row longer than a tile is CHUNKED: BLOCK_D = the tile's
elements and the kernels loop over its blocks, reading it once per pass (the forward
three times for its statistics and once to write z; the backward once for
the row's two means, kept in a (2, N) scratch, and once for the gradients).

Determinism: dweight and dbias are sums over rows. The backward is split
into at most MAX_PROGRAMS programs, each owning a contiguous block of rows
(a multiple of ROWS; a function of the shapes only); each writes its partial
sums to a (programs, d) buffer, and a second kernel adds the partials in
program order. No atomics, so the results are bitwise reproducible. With one
program the partials are the result and no second kernel runs.

Offsets: row indices are int64 (``program_id(0).to(tl.int64)``), so every
``row * d + col`` offset is computed in int64 and tensors with
N * d >= 2**31 elements are addressed correctly.

Numerics (core ``tl`` math only, the GPU's approximate float32
instructions, eps in three float32 parts) as the package docstring says.
Large logits saturate the sigmoid without NaN: g = 1 / (1 + exp(-x)) is
exactly 0 where exp(-x) overflows to inf and exactly 1 where it drops below
half an ulp of 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .iwn import ROUND_AS_WRITTEN, _acc_dtypes, _join_parts, _on_device, float32_parts

__all__ = ["KERNELS", "surgical_gate_forward", "surgical_gate_backward"]

TILE_BYTES = 4096  # of a program's tile in acc: ROWS * BLOCK_D * itemsize
BYTES_PER_THREAD = 16  # of each tile tensor held per thread: the warps of a program
MAX_PROGRAMS = 512  # cap on the backward's row-block programs (and partial rows)
BLOCK_SUM = 256  # columns per program when summing the partials


def _tiling(d: int, acc_itemsize: int) -> dict:
    """The launch parameters of rows of d features: BLOCK_D columns (the
    row, a power of two, up to a whole tile) and ROWS rows per tile, CHUNKED
    when a row is longer than one tile (then the kernels loop over its
    blocks), and num_warps for BYTES_PER_THREAD bytes of a tile per thread."""
    if d < 1:
        raise ValueError(f"surgical_gate (triton): the feature dimension d = {d} must be >= 1")
    tile = TILE_BYTES // acc_itemsize
    block_d = min(triton.next_power_of_2(d), tile)
    rows = max(1, tile // block_d)
    warps = triton.next_power_of_2(rows * block_d * acc_itemsize // (32 * BYTES_PER_THREAD))
    return dict(ROWS=rows, BLOCK_D=block_d, CHUNKED=block_d < d, num_warps=max(1, min(16, warps)))


def _row_blocks(n: int, rows: int):
    """(rows_per_program, num_programs) of the backward: at most MAX_PROGRAMS
    programs, each a multiple of ``rows`` rows; 0 programs for n == 0."""
    if n == 0:
        return rows, 0
    wanted = min(MAX_PROGRAMS, triton.cdiv(n, rows))
    per = triton.cdiv(triton.cdiv(n, wanted), rows) * rows
    return per, triton.cdiv(n, per)


# -- shared pieces ---------------------------------------------------------------------


@triton.jit
def _blend(h_ptr, s_ptr, l_ptr, offs, mask, ACC: tl.constexpr):
    """h, s, g = sigmoid(logits) and v = g * h + (1 - g) * s of a tile at int64
    ``offs``, all in acc; 0 (and g = 1/2) where ``mask`` is off. v is s
    where h == s and g is a number, as the C++ kernels' two fused steps
    g * h + (s - g * s) give it, so that a row of h == s constant stays
    constant (z = bias): g * h + (1 - g) * s is often an ulp off there,
    which LayerNorm's 1 / sqrt(eps) magnifies; a NaN gate gives NaN. (A
    select, not the fused steps: with those the float64 backward spilled
    registers on sm_80.)"""
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.sigmoid(tl.load(l_ptr + offs, mask=mask, other=0.0).to(ACC))
    return h, s, g, tl.where((h == s) & (g == g), s, g * h + (1.0 - g) * s)


# -- forward --------------------------------------------------------------------------


@triton.jit
def _row_sum(
    h_ptr,
    s_ptr,
    l_ptr,
    rows,
    rmask,
    D,
    shift,
    SQUARE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row of a chunked tile: the sum over all D columns, block by block,
    of v - shift (or of its square)."""
    total = tl.zeros((ROWS,), ACC)
    for c in range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        _h, _s, _g, v = _blend(h_ptr, s_ptr, l_ptr, rows[:, None] * D + cols[None, :], mask, ACC)
        dev = tl.where(mask, v - shift[:, None], 0.0)
        total += tl.sum(dev * dev if SQUARE else dev, axis=1)
    return total


@triton.jit
def _store_z(
    z_ptr,
    w_ptr,
    b_ptr,
    v,
    mean,
    rstd,
    rows,
    rmask,
    cols,
    D,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
):
    """z = (v - mean) * rstd * w + b of a tile of blends v."""
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    z = tl.where(mask, v - mean[:, None], 0.0) * rstd[:, None]
    if HAS_W:
        z = z * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)[None, :]
    if HAS_B:
        z = z + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    tl.store(z_ptr + rows[:, None] * D + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)


# N (rows) is not specialized: a launch with N == 1 would otherwise compile a
# kernel of its own (and in float64 ptxas spills 4 bytes in one of them).
@triton.jit(do_not_specialize=["N"])
def _forward(
    h_ptr,
    s_ptr,
    l_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    D,
    eps_hi,
    eps_mid,
    eps_lo,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    """z, mean and rstd of ROWS rows: two-pass statistics of the blend. A
    row longer than BLOCK_D (CHUNKED) is read block by block in each pass
    (the same sums, added block by block), then once more to write z."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < N
    zero = tl.zeros((ROWS,), ACC)
    if CHUNKED:
        mean = _row_sum(h_ptr, s_ptr, l_ptr, rows, rmask, D, zero, False, ACC, ROWS, BLOCK_D) / D
        mean += _row_sum(h_ptr, s_ptr, l_ptr, rows, rmask, D, mean, False, ACC, ROWS, BLOCK_D) / D
        var = _row_sum(h_ptr, s_ptr, l_ptr, rows, rmask, D, mean, True, ACC, ROWS, BLOCK_D) / D
    else:
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        _h, _s, _g, v = _blend(h_ptr, s_ptr, l_ptr, rows[:, None] * D + cols[None, :], mask, ACC)
        mean = tl.sum(tl.where(mask, v, 0.0), axis=1) / D
        # plus the mean of the deviations from the rounded mean (what its rounding
        # lost): a constant row then gets its value exactly, deviations 0, z = bias
        mean += tl.sum(tl.where(mask, v - mean[:, None], 0.0), axis=1) / D
        diff = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / D
    # A variance past the accumulation type's range (squares that overflow)
    # becomes NaN, as F.layer_norm and the reference give, not rstd = 0 (z =
    # bias): var - var is 0 for a finite var and NaN for inf.
    var += var - var
    rstd = 1.0 / tl.sqrt(var + _join_parts(eps_hi, eps_mid, eps_lo, (ROWS,), ACC))
    if CHUNKED:
        for c in range(0, D, BLOCK_D):
            cols = c + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            _h, _s, _g, v = _blend(
                h_ptr, s_ptr, l_ptr, rows[:, None] * D + cols[None, :], mask, ACC
            )
            _store_z(z_ptr, w_ptr, b_ptr, v, mean, rstd, rows, rmask, cols, D, HAS_W, HAS_B, ACC)
    else:
        _store_z(
            z_ptr,
            w_ptr,
            b_ptr,
            v,
            mean,
            rstd,
            rows,
            rmask,
            tl.arange(0, BLOCK_D),
            D,
            HAS_W,
            HAS_B,
            ACC,
        )
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


def surgical_gate_forward(h, s, gate_logits, weight, bias, eps):
    """z (N, d) in h's dtype, mean and rstd (N,) in acc, of
    LayerNorm(g * h + (1 - g) * s) * weight + bias with g = sigmoid(gate_logits)."""
    d = h.shape[-1]
    n = h.numel() // d if d > 0 else 0
    acc_t, ACC = _acc_dtypes(h.dtype)
    meta = _tiling(d, acc_t.itemsize)
    z = torch.empty_like(h)
    mean = h.new_empty(h.shape[:-1], dtype=acc_t)
    rstd = h.new_empty(h.shape[:-1], dtype=acc_t)
    if n == 0:
        return z, mean, rstd
    dummy = h.new_empty((1,), dtype=acc_t)
    with _on_device(h):
        _forward[(triton.cdiv(n, meta["ROWS"]),)](
            h,
            s,
            gate_logits,
            weight if weight is not None else dummy,
            bias if bias is not None else dummy,
            z,
            mean,
            rstd,
            n,
            d,
            *float32_parts(float(eps)),
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            ACC=ACC,
            **meta,
            **ROUND_AS_WRITTEN,
        )
    return z, mean, rstd


# -- backward -------------------------------------------------------------------------


@triton.jit
def _backward_tile(
    dz_ptr,
    h_ptr,
    s_ptr,
    l_ptr,
    w_ptr,
    rows,
    rmask,
    cols,
    D,
    mean,
    rstd,
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
):
    """Of a tile: the mask, offsets, h, s, g, dz, xhat and dxhat = dz * w."""
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    h, s, g, v = _blend(h_ptr, s_ptr, l_ptr, offs, mask, ACC)
    dz = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_W:
        dxhat = dz * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)[None, :]
    else:
        dxhat = dz
    return mask, offs, h, s, g, dz, xhat, dxhat


@triton.jit
def _backward_block(
    dz_ptr,
    h_ptr,
    s_ptr,
    l_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dh_ptr,
    ds_ptr,
    dl_ptr,
    pw_ptr,
    pb_ptr,
    c_ptr,
    pid,
    row0,
    cols,
    N,
    D,
    ROWS_PER_PROGRAM,
    HAS_W: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    """The gradients of the program's rows in the columns ``cols``, and the
    program's partial sums of dz * xhat and dz over those columns. A row's
    mean(dxhat) and mean(dxhat * xhat) come from c (CHUNKED) or the tile."""
    dw = tl.zeros((BLOCK_D,), ACC)
    db = tl.zeros((BLOCK_D,), ACC)
    for i in range(0, ROWS_PER_PROGRAM, ROWS):
        rows = row0 + i + tl.arange(0, ROWS)
        rmask = rows < N
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0).to(ACC)
        mask, offs, h, s, g, dz, xhat, dxhat = _backward_tile(
            dz_ptr, h_ptr, s_ptr, l_ptr, w_ptr, rows, rmask, cols, D, mean, rstd, ACC, HAS_W
        )
        if CHUNKED:
            c1 = tl.load(c_ptr + rows, mask=rmask, other=0.0)
            c2 = tl.load(c_ptr + N + rows, mask=rmask, other=0.0)
        else:
            c1 = tl.sum(dxhat, axis=1) / D
            c2 = tl.sum(dxhat * xhat, axis=1) / D
        dv = tl.where(mask, rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None]), 0.0)
        gc = 1.0 - g
        tl.store(dh_ptr + offs, (dv * g).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(ds_ptr + offs, (dv * gc).to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(dl_ptr + offs, (dv * (h - s) * (g * gc)).to(dl_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dz * xhat, axis=0)
        db += tl.sum(dz, axis=0)
    tl.store(pw_ptr + pid * D + cols, dw, mask=cols < D)
    tl.store(pb_ptr + pid * D + cols, db, mask=cols < D)


@triton.jit(do_not_specialize=["N"])
def _backward(
    dz_ptr,
    h_ptr,
    s_ptr,
    l_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dh_ptr,
    ds_ptr,
    dl_ptr,
    pw_ptr,
    pb_ptr,
    c_ptr,
    N,
    D,
    ROWS_PER_PROGRAM,
    HAS_W: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    """dh, ds and dlogits of the program's rows (ROWS at a time), and their
    partial sums of dz * xhat and dz into row program_id(0) of pw and pb.
    CHUNKED (rows longer than BLOCK_D): a first pass over each row's blocks
    writes its mean(dxhat) and mean(dxhat * xhat) to c (2, N); then, block of
    columns by block, the rows' gradients and that block's partial sums."""
    pid = tl.program_id(0).to(tl.int64)
    row0 = pid * ROWS_PER_PROGRAM
    if CHUNKED:
        for i in range(0, ROWS_PER_PROGRAM, ROWS):
            rows = row0 + i + tl.arange(0, ROWS)
            rmask = rows < N
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0).to(ACC)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0).to(ACC)
            s1 = tl.zeros((ROWS,), ACC)
            s2 = tl.zeros((ROWS,), ACC)
            for c in range(0, D, BLOCK_D):
                _m, _o, _h, _s, _g, _dz, xhat, dxhat = _backward_tile(
                    dz_ptr,
                    h_ptr,
                    s_ptr,
                    l_ptr,
                    w_ptr,
                    rows,
                    rmask,
                    c + tl.arange(0, BLOCK_D),
                    D,
                    mean,
                    rstd,
                    ACC,
                    HAS_W,
                )
                s1 += tl.sum(dxhat, axis=1)
                s2 += tl.sum(dxhat * xhat, axis=1)
            tl.store(c_ptr + rows, s1 / D, mask=rmask)
            tl.store(c_ptr + N + rows, s2 / D, mask=rmask)
        tl.debug_barrier()  # the row sums written above are read by other threads below
        for c in range(0, D, BLOCK_D):
            _backward_block(
                dz_ptr,
                h_ptr,
                s_ptr,
                l_ptr,
                w_ptr,
                mean_ptr,
                rstd_ptr,
                dh_ptr,
                ds_ptr,
                dl_ptr,
                pw_ptr,
                pb_ptr,
                c_ptr,
                pid,
                row0,
                c + tl.arange(0, BLOCK_D),
                N,
                D,
                ROWS_PER_PROGRAM,
                HAS_W,
                ACC,
                ROWS,
                BLOCK_D,
                CHUNKED,
            )
    else:
        _backward_block(
            dz_ptr,
            h_ptr,
            s_ptr,
            l_ptr,
            w_ptr,
            mean_ptr,
            rstd_ptr,
            dh_ptr,
            ds_ptr,
            dl_ptr,
            pw_ptr,
            pb_ptr,
            c_ptr,
            pid,
            row0,
            tl.arange(0, BLOCK_D),
            N,
            D,
            ROWS_PER_PROGRAM,
            HAS_W,
            ACC,
            ROWS,
            BLOCK_D,
            CHUNKED,
        )


@triton.jit
def _sum_partials(
    pw_ptr, pb_ptr, dw_ptr, db_ptr, D, NUM_PROGRAMS, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """dw[j] and db[j] = sums over programs, in program order, of pw[p, j] and
    pb[p, j] (both (NUM_PROGRAMS, D))."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < D
    dw = tl.zeros((BLOCK,), ACC)
    db = tl.zeros((BLOCK,), ACC)
    for p in range(0, NUM_PROGRAMS):
        part = tl.cast(p, tl.int64) * D + cols
        dw += tl.load(pw_ptr + part, mask=cmask, other=0.0).to(ACC)
        db += tl.load(pb_ptr + part, mask=cmask, other=0.0).to(ACC)
    tl.store(dw_ptr + cols, dw, mask=cmask)
    tl.store(db_ptr + cols, db, mask=cmask)


def surgical_gate_backward(grad_z, h, s, gate_logits, weight, mean, rstd):
    """dh, ds, dlogits (N, d) in h's dtype and dweight, dbias (d,) in acc, from
    the forward's mean and rstd; dweight and dbias are computed also when
    weight is None (zeros for N == 0)."""
    d = h.shape[-1]
    n = h.numel() // d if d > 0 else 0
    acc_t, ACC = _acc_dtypes(h.dtype)
    meta = _tiling(d, acc_t.itemsize)
    # Rounded as written (no contraction), this longer kernel spills registers
    # in some tiles at the forward's warp count: float32 tiles get twice as
    # many warps, float64 tiles of one whole-width row half as many (each
    # choice the one scripts/triton_aot.py compiles without spills).
    warps = meta["num_warps"]
    if acc_t == torch.float32:
        meta["num_warps"] = min(16, 2 * warps)
    elif meta["ROWS"] == 1:
        meta["num_warps"] = max(1, warps // 2)
    dh = torch.empty_like(h)
    ds = torch.empty_like(h)
    dlogits = torch.empty_like(h)
    dweight = h.new_zeros((d,), dtype=acc_t)
    dbias = h.new_zeros((d,), dtype=acc_t)
    per, nprog = _row_blocks(n, meta["ROWS"])
    if nprog == 0:
        return dh, ds, dlogits, dweight, dbias
    if nprog == 1:  # the one program's partials are the result
        pw, pb = dweight, dbias
    else:
        pw = h.new_empty((nprog, d), dtype=acc_t)
        pb = h.new_empty((nprog, d), dtype=acc_t)
    dummy = h.new_empty((1,), dtype=acc_t)
    row_sums = h.new_empty((2, n), dtype=acc_t) if meta["CHUNKED"] else dummy
    with _on_device(h):
        _backward[(nprog,)](
            grad_z,
            h,
            s,
            gate_logits,
            weight if weight is not None else dummy,
            mean,
            rstd,
            dh,
            ds,
            dlogits,
            pw,
            pb,
            row_sums,
            n,
            d,
            per,
            HAS_W=weight is not None,
            ACC=ACC,
            **meta,
            **ROUND_AS_WRITTEN,
        )
        if nprog > 1:
            _sum_partials[(triton.cdiv(d, BLOCK_SUM),)](
                pw, pb, dweight, dbias, d, nprog, ACC=ACC, BLOCK=BLOCK_SUM, **ROUND_AS_WRITTEN
            )
    return dh, ds, dlogits, dweight, dbias


KERNELS = {
    "_surgical_gate_forward": surgical_gate_forward,
    "_surgical_gate_backward": surgical_gate_backward,
}
