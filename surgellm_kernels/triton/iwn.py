"""Triton kernels of ``fused_iwn``, one launcher per phase of the op.

Notation: rows of x (N, F); u = x * sigmoid(gate) (u = x without a gate);
every row has an int32 key (keys None: every key is 0). In training
key = task * C + class (G = T * C groups) and key_div = C; in eval key = task
and key_div = 1. A row's task is key // key_div. "acc" is the accumulation
dtype: float64 for float64 x, else float32; every statistic is in acc.

The row passes of the op's phases, each a function below registered by
surgellm_kernels/ops/_backend.py as the kernel of the dispatcher op of the
same name (``KERNELS``). Their inputs are contiguous and in the dtypes the
op's schema promises (the C++ caller converts); their outputs are freshly
allocated:

  forward   _iwn_group_moments -> (C++: _iwn_combine) -> _iwn_apply
  backward  _iwn_task_sums -> (C++: _iwn_coefficients) -> _iwn_input_grad

The small per-(task, class, feature) steps -- the merge of row-chunk
moments, combine and coefficients -- are not re-derived here: they are the
C++ ops every backend shares (csrc/iwn/iwn_math.h), which run as CUDA C++ on
a GPU (so the Triton backend needs the extension built with CUDA) and as
the CPU kernels under the interpreter.

Mean residuals: the group means are rounded to acc, and where a class's rows
nearly coincide (tiny s_c) that rounding error is first-order in the backward
term dev_coef * (u - center). So iwn_group_moments also returns, per group and
feature, mean_residual = (1/n) * sum over the group's rows of (u - mean), the
part of the exact mean the rounded mean cannot hold (computed in acc), and
the coefficients fold it into dy_shift.

Invalid keys: labels and task ids are range-checked before launch, except
under CUDA graph capture (no host sync there), where invalid ones arrive as
key -1. A row whose key
is < 0 or >= the number of keys the phase knows (num_groups, or
T * key_div) is never used to index a statistic: it is left out of every
reduction (moments, task sums, the (F,) gate gradient) and its y and dx (and
per-instance dgate) are NaN, so the error shows instead of reading out of
bounds.

Determinism: reductions over rows (group moments, task sums, the eval
gradient of a (F,) gate) are split into row chunks; each chunk writes partial
results to a scratch buffer (chunks x groups x F) and the partials are merged
in chunk order (the moments by _iwn_merge_moments; plain sums otherwise). No
atomics, so the results are bitwise reproducible. The number of chunks
depends on the shapes only and is capped so that the scratch stays under
``SCRATCH_BYTES``; with one chunk the partials are the result and no merge
runs.

Offsets: every offset that multiplies a row, chunk, group or task index by F
is computed in int64, so tensors with N * F >= 2**31 elements are addressed
correctly.

Numerics (core ``tl`` math only, the GPU's approximate float32
instructions, eps in three float32 parts) as the package docstring says.
Triton 3.6 on an H200 showed why eps is split: passed as one float, a
constant row's 1 / sqrt(eps) was off by half of float32's rounding of 1e-5.
No checks here: the op checks its arguments (check_iwn_args) before any
phase runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct

import torch
import triton
import triton.language as tl

__all__ = ["KERNELS", "iwn_group_moments", "iwn_apply", "iwn_task_sums", "iwn_input_grad"]

BLOCK_N = 8  # rows per tile
BLOCK_F = 64  # features per program
GROUP_TILE = 16  # groups (or tasks) per program in the one-hot reductions (8 in float64)
# Warps of the kernels whose tiles hold one-hot [rows, groups, features]
# products or a row reduction: with the default 4, some of their
# configurations spill registers (scripts/triton_aot.py compiles them all);
# the input gradient in float64, compiled without contraction, needs 16.
REDUCE_WARPS = 8
INPUT_GRAD_WARPS_FP64 = 16
BLOCK_SUM = 256  # elements per program when summing chunk partials
TARGET_CHUNKS = 128
SCRATCH_BYTES = 256 << 20  # cap on the partial buffers of one split reduction

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc_dtypes(dtype: torch.dtype):
    """(torch, tl) accumulation dtypes of data of ``dtype``: float64 for
    float64 data, else float32."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return acc, _TL_DTYPES[acc]


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (a tensor on cuda:1 launches on cuda:1); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Every launch rounds as written: no multiply-add contraction (the CPU build's
# -ffp-contract=off, nvcc's --fmad=false). Contracted, x * g - mu becomes
# fma(x, g, -mu), the rounding of u = x * g leaks into u - mu, and a constant
# feature (u - mu = 0 exactly) gets that rounding divided by eps.
ROUND_AS_WRITTEN = {"enable_fp_fusion": False}


# A CUDA grid's second and third dimensions: blocks of BLOCK_F features, and
# tiles of GROUP_TILE groups or tasks.
MAX_GRID_YZ = 65535


def check_grid(grid, on_cuda: bool) -> None:
    """A clear error where a launch would fail ("invalid configuration")."""
    if on_cuda and any(g > MAX_GRID_YZ for g in grid[1:]):
        raise ValueError(
            f"x: too many features or (task, class) groups for the Triton kernels' launch "
            f"grid {tuple(grid)} (at most {MAX_GRID_YZ} blocks of {BLOCK_F} features, and of "
            f"{GROUP_TILE} groups or tasks); run this call on the CUDA C++ or CPU backend"
        )


def _launch(kernel, grid, *args, **meta):
    check_grid(grid, args[0].is_cuda)
    if all(g > 0 for g in grid):
        kernel[grid](*args, **meta, **ROUND_AS_WRITTEN)


def _rows_only(x: torch.Tensor) -> None:
    """The Triton kernels read rows (N, F). Channels-first planes (N, F, L)
    reach them only under the CPU interpreter (on a GPU the op hands them
    rows of positions): a clear error there."""
    if x.dim() == 3 and x.shape[2] != 1:
        raise NotImplementedError(
            "the Triton kernels read features-innermost rows; x of shape (N, F, L) in "
            "contiguous (channels-first) memory runs on the C++ CPU kernels, or pass x with "
            "its features innermost in memory: x.movedim(1, -1).contiguous().movedim(-1, 1) "
            "(for 4-D x, x.to(memory_format=torch.channels_last))"
        )


def _chunks(n: int, scratch_per_chunk: int, itemsize: int):
    """(rows_per_chunk, num_chunks) of a split reduction over n rows whose
    partial buffer holds ``scratch_per_chunk`` elements per chunk: about
    TARGET_CHUNKS chunks, fewer when the partials would exceed SCRATCH_BYTES,
    at least one (also for n == 0). A function of the shapes only."""
    cap = max(1, SCRATCH_BYTES // max(1, scratch_per_chunk * itemsize))
    wanted = max(1, min(TARGET_CHUNKS, cap, triton.cdiv(n, BLOCK_N)))
    rows = triton.cdiv(triton.cdiv(max(n, 1), wanted), BLOCK_N) * BLOCK_N
    return rows, max(1, triton.cdiv(n, rows))


def _gate_mode(gate) -> int:
    """0: no gate, 1: (F,) gate in acc, 2: (N, F) per-instance gate in x's dtype."""
    return 0 if gate is None else (1 if gate.dim() == 1 else 2)


def _groups_per_program(acc_t: torch.dtype) -> int:
    return GROUP_TILE if acc_t != torch.float64 else GROUP_TILE // 2


def _fblocks(F: int) -> int:
    return max(1, triton.cdiv(F, BLOCK_F))  # one block even for F == 0 (counts)


# -- shared pieces ---------------------------------------------------------------------


@triton.jit
def _row_keys(keys_ptr, rows, N, NUM_KEYS, HAS_KEYS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys (int32) of ``rows`` (int64 indices), -1 for rows past N and for
    keys outside [0, NUM_KEYS): such a row must not index any statistic. Callers test
    ``key >= 0`` before using ``key // KEY_DIV``: Triton's integer ``//``
    truncates toward zero, so -1 // C would be task 0."""
    in_rows = rows < N
    if HAS_KEYS:
        key = tl.load(keys_ptr + rows, mask=in_rows, other=-1)
    else:
        key = tl.zeros((BLOCK_N,), tl.int32)
    return tl.where(in_rows & (key >= 0) & (key < NUM_KEYS), key, -1)


@triton.jit
def _load_u(x_ptr, gate_ptr, offs, cols, mask, F, GATE_MODE: tl.constexpr, ACC: tl.constexpr):
    """u = x * sigmoid(gate) of a [BLOCK_N, BLOCK_F] tile at int64 ``offs``, and
    the sigmoid."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if GATE_MODE == 1:
        logit = tl.load(gate_ptr + cols, mask=cols < F, other=0.0).to(ACC)
        s = tl.sigmoid(logit)[None, :] + tl.zeros_like(x)
    elif GATE_MODE == 2:
        s = tl.sigmoid(tl.load(gate_ptr + offs, mask=mask, other=0.0).to(ACC))
    else:
        s = tl.full(x.shape, 1.0, ACC)
    return x * s, s


@triton.jit
def _sum_chunks(p_ptr, out_ptr, M, NUM_CHUNKS, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over chunks, in chunk order, of p[chunk, i]; p is (chunks, M)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M
    total = tl.zeros((BLOCK,), ACC)
    for ch in range(0, NUM_CHUNKS):
        total += tl.load(p_ptr + tl.cast(ch, tl.int64) * M + idx, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + idx, total, mask=mask)


def _reduce_chunks(partial: torch.Tensor, out: torch.Tensor, ACC) -> None:
    """Sum ``partial`` (chunks, *out.shape) into ``out`` in chunk order."""
    m = out.numel()
    _launch(
        _sum_chunks,
        (triton.cdiv(m, BLOCK_SUM),),
        partial,
        out,
        m,
        partial.shape[0],
        ACC=ACC,
        BLOCK=BLOCK_SUM,
    )


# -- forward: group moments -----------------------------------------------------------


@triton.jit
def _group_tile(
    x_ptr,
    gate_ptr,
    keys_ptr,
    rows,
    cols,
    fmask,
    groups,
    N,
    F,
    G,
    GATE_MODE: tl.constexpr,
    HAS_KEYS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A tile of u (0 in invalid rows) and, per row, which of ``groups`` it
    belongs to: what both passes of _moments_partial read, read the same way."""
    key = _row_keys(keys_ptr, rows, N, G, HAS_KEYS, BLOCK_N)
    mask = (key >= 0)[:, None] & fmask[None, :]
    u, _s = _load_u(
        x_ptr, gate_ptr, rows[:, None] * F + cols[None, :], cols, mask, F, GATE_MODE, ACC
    )
    return u, key[:, None] == groups[None, :]


@triton.jit
def _moments_partial(
    x_ptr,
    gate_ptr,
    keys_ptr,
    pcount_ptr,
    pmean_ptr,
    pm2_ptr,
    pres_ptr,
    N,
    F,
    G,
    ROWS_PER_CHUNK,
    GATE_MODE: tl.constexpr,
    HAS_KEYS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    GROUP_TILE: tl.constexpr,
):
    """Per (chunk, group, feature): count, mean and M2 of u over the chunk's rows,
    and R = sum of the deviations (u - mean), two passes (sum, then deviations
    from the chunk's rounded mean). ONE_CHUNK (the partials are the result):
    R / count (the mean residual; 0 for an empty group) is stored instead of R."""
    chunk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    groups = tl.program_id(2) * GROUP_TILE + tl.arange(0, GROUP_TILE)
    fmask = cols < F
    row0 = chunk * ROWS_PER_CHUNK
    count = tl.zeros((GROUP_TILE,), ACC)
    total = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    for i in range(0, ROWS_PER_CHUNK, BLOCK_N):
        rows = row0 + i + tl.arange(0, BLOCK_N)
        u, hit = _group_tile(
            x_ptr,
            gate_ptr,
            keys_ptr,
            rows,
            cols,
            fmask,
            groups,
            N,
            F,
            G,
            GATE_MODE,
            HAS_KEYS,
            ACC,
            BLOCK_N,
        )
        count += tl.sum(hit.to(ACC), axis=0)
        total += tl.sum(tl.where(hit[:, :, None], u[:, None, :], 0.0), axis=0)
    mean = total / tl.maximum(count, 1.0)[:, None]
    m2 = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    res = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    for i in range(0, ROWS_PER_CHUNK, BLOCK_N):
        rows = row0 + i + tl.arange(0, BLOCK_N)
        u, hit = _group_tile(
            x_ptr,
            gate_ptr,
            keys_ptr,
            rows,
            cols,
            fmask,
            groups,
            N,
            F,
            G,
            GATE_MODE,
            HAS_KEYS,
            ACC,
            BLOCK_N,
        )
        dev = u - tl.sum(tl.where(hit[:, :, None], mean[None, :, :], 0.0), axis=1)
        m2 += tl.sum(tl.where(hit[:, :, None], (dev * dev)[:, None, :], 0.0), axis=0)
        res += tl.sum(tl.where(hit[:, :, None], dev[:, None, :], 0.0), axis=0)
    if ONE_CHUNK:
        res = res / tl.maximum(count, 1.0)[:, None]  # R is 0 for an empty group
    gmask = groups < G
    part = chunk * G + groups
    out = part[:, None] * F + cols[None, :]
    omask = gmask[:, None] & fmask[None, :]
    tl.store(pmean_ptr + out, mean, mask=omask)
    tl.store(pm2_ptr + out, m2, mask=omask)
    tl.store(pres_ptr + out, res, mask=omask)
    if tl.program_id(1) == 0:
        tl.store(pcount_ptr + part, count, mask=gmask)


def iwn_group_moments(x, keys, gate, num_groups):
    """Per group g < num_groups: count (G,), mean (G, F), M2 (G, F) and
    mean_residual (G, F) of u, where mean_residual = (1/n) * sum over the
    group's rows of (u - mean) against the returned (rounded) mean, in acc.
    Empty groups give 0, 0, 0, 0; rows with a key outside [0, G) are skipped."""
    _rows_only(x)
    N, F = x.shape
    G = int(num_groups)
    acc_t, ACC = _acc_dtypes(x.dtype)
    rows_per_chunk, nchunks = _chunks(N, G * (3 * F + 1), acc_t.itemsize)
    # One chunk: its summaries are the result; several: (chunks, G, ...)
    # partials, merged by the C++ op.
    shape = (G,) if nchunks == 1 else (nchunks, G)
    pcount = x.new_zeros(shape, dtype=acc_t)
    pmean, pm2, pres = (x.new_zeros((*shape, F), dtype=acc_t) for _ in range(3))
    count, mean, m2, mean_residual = pcount, pmean, pm2, pres
    dummy = x.new_empty((1,), dtype=acc_t)
    with _on_device(x):
        tile = _groups_per_program(acc_t)
        _launch(
            _moments_partial,
            (nchunks, _fblocks(F), triton.cdiv(G, tile)),
            x,
            gate if gate is not None else dummy,
            keys if keys is not None else dummy,
            pcount,
            pmean,
            pm2,
            pres,
            N,
            F,
            G,
            rows_per_chunk,
            GATE_MODE=_gate_mode(gate),
            HAS_KEYS=keys is not None,
            ONE_CHUNK=nchunks == 1,
            ACC=ACC,
            BLOCK_N=BLOCK_N,
            BLOCK_F=BLOCK_F,
            GROUP_TILE=tile,
            num_warps=REDUCE_WARPS,
        )
    if nchunks > 1:  # the merge every backend shares (C++: iwn_math.h's merge_parts_at)
        return torch.ops.surgellm._iwn_merge_moments(pcount, pmean, pm2, pres)
    return count, mean, m2, mean_residual


# -- forward: apply -------------------------------------------------------------------


FLOAT32_MAX = 3.4028234663852886e38


@functools.lru_cache(maxsize=64)
def float32_parts(value: float) -> tuple[float, float, float]:
    """value as (hi, mid, lo), each a float32, with hi + mid + lo == value
    exactly in float64 (24 + 24 + 24 bits hold float64's 53; each remainder
    is exact in float64) for |value| >= 2**-97 (below it the parts fall under
    float32's normal range and round; the ops refuse an eps under 2**-126);
    inf and nan pass as themselves."""
    if not math.isfinite(value):
        return (value, 0.0, 0.0)
    if abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"eps must be at most {FLOAT32_MAX} on the Triton backend, got {value}: "
            "use a smaller eps or another backend"
        )
    parts = []
    rest = value
    for _ in range(3):
        part = struct.unpack("f", struct.pack("f", rest))[0]  # rest rounded to float32
        parts.append(part)
        rest -= part
    return tuple(parts)


@triton.jit
def _join_parts(hi, mid, lo, SHAPE: tl.constexpr, ACC: tl.constexpr):
    """float32_parts' value in acc, as a SHAPE tensor: exact in float64, to
    float32's precision in float32."""
    return tl.full(SHAPE, hi, ACC) + tl.full(SHAPE, mid, ACC) + tl.full(SHAPE, lo, ACC)


@triton.jit
def _apply(
    x_ptr,
    gate_ptr,
    keys_ptr,
    w_ptr,
    b_ptr,
    mu_ptr,
    sigma_ptr,
    y_ptr,
    N,
    F,
    NUM_KEYS,
    KEY_DIV,
    eps_hi,
    eps_mid,
    eps_lo,
    GATE_MODE: tl.constexpr,
    HAS_KEYS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """y = (u - mu_t) / (sigma_t + eps) * w + b; NaN rows for invalid keys."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    mask = (rows < N)[:, None] & fmask[None, :]
    offs = rows[:, None] * F + cols[None, :]
    u, _s = _load_u(x_ptr, gate_ptr, offs, cols, mask, F, GATE_MODE, ACC)
    key = _row_keys(keys_ptr, rows, N, NUM_KEYS, HAS_KEYS, BLOCK_N)
    valid = key >= 0
    task = tl.where(valid, key // KEY_DIV, 0).to(tl.int64)  # task 0: masked out below
    smask = valid[:, None] & fmask[None, :]
    stat = task[:, None] * F + cols[None, :]
    mu = tl.load(mu_ptr + stat, mask=smask, other=0.0).to(ACC)
    sigma = tl.load(sigma_ptr + stat, mask=smask, other=1.0).to(ACC)
    eps = _join_parts(eps_hi, eps_mid, eps_lo, (BLOCK_F,), ACC)
    y = (u - mu) / (sigma + eps[None, :])
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=fmask, other=1.0).to(ACC)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=fmask, other=0.0).to(ACC)[None, :]
    y = tl.where(valid[:, None], y, float("nan"))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def iwn_apply(x, keys, gate, weight, bias, mu, sigma, key_div, eps):
    """y (N, F) in x's dtype: (u - mu[t]) / (sigma[t] + eps) * weight + bias with
    t = key // key_div; rows whose key is outside [0, T * key_div) are NaN."""
    _rows_only(x)
    N, F = x.shape
    T = mu.shape[0]
    acc_t, ACC = _acc_dtypes(x.dtype)
    y = torch.empty_like(x)
    dummy = x.new_empty((1,), dtype=acc_t)
    with _on_device(x):
        _launch(
            _apply,
            (triton.cdiv(N, BLOCK_N), _fblocks(F)),
            x,
            gate if gate is not None else dummy,
            keys if keys is not None else dummy,
            weight if weight is not None else dummy,
            bias if bias is not None else dummy,
            mu,
            sigma,
            y,
            N,
            F,
            T * int(key_div),
            int(key_div),
            *float32_parts(float(eps)),
            GATE_MODE=_gate_mode(gate),
            HAS_KEYS=keys is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            ACC=ACC,
            BLOCK_N=BLOCK_N,
            BLOCK_F=BLOCK_F,
        )
    return y


# -- backward: task sums --------------------------------------------------------------


@triton.jit
def _task_sums_partial(
    dy_ptr,
    x_ptr,
    gate_ptr,
    keys_ptr,
    mu_ptr,
    ps_ptr,
    N,
    F,
    T,
    NUM_KEYS,
    KEY_DIV,
    ROWS_PER_CHUNK,
    GATE_MODE: tl.constexpr,
    HAS_KEYS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    GROUP_TILE: tl.constexpr,
):
    """Per (chunk, task): s1 = sum dy and s2 = sum dy * (u - mu_task), into the
    (chunks, 2, T, F) partial buffer."""
    chunk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    tasks = tl.program_id(2) * GROUP_TILE + tl.arange(0, GROUP_TILE)
    fmask = cols < F
    s1 = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    s2 = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    row0 = chunk * ROWS_PER_CHUNK
    for i in range(0, ROWS_PER_CHUNK, BLOCK_N):
        rows = row0 + i + tl.arange(0, BLOCK_N)
        key = _row_keys(keys_ptr, rows, N, NUM_KEYS, HAS_KEYS, BLOCK_N)
        valid = key >= 0
        task = tl.where(valid, key // KEY_DIV, -1)
        mask = valid[:, None] & fmask[None, :]
        offs = rows[:, None] * F + cols[None, :]
        u, _s = _load_u(x_ptr, gate_ptr, offs, cols, mask, F, GATE_MODE, ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        stat = tl.maximum(task, 0).to(tl.int64)[:, None] * F + cols[None, :]
        mu = tl.load(mu_ptr + stat, mask=mask, other=0.0).to(ACC)
        hit = task[:, None] == tasks[None, :]
        s1 += tl.sum(tl.where(hit[:, :, None], dy[:, None, :], 0.0), axis=0)
        s2 += tl.sum(tl.where(hit[:, :, None], (dy * (u - mu))[:, None, :], 0.0), axis=0)
    omask = (tasks < T)[:, None] & fmask[None, :]
    out1 = ((chunk * 2) * T + tasks)[:, None] * F + cols[None, :]
    out2 = ((chunk * 2 + 1) * T + tasks)[:, None] * F + cols[None, :]
    tl.store(ps_ptr + out1, s1, mask=omask)
    tl.store(ps_ptr + out2, s2, mask=omask)


def iwn_task_sums(grad_y, x, keys, gate, mu, key_div):
    """sums (2, T, F) in acc: sums[0, t] = sum of dy and sums[1, t] = sum of
    dy * (u - mu[t]) over the rows of task t (T = mu.shape[0])."""
    _rows_only(x)
    N, F = x.shape
    T = mu.shape[0]
    acc_t, ACC = _acc_dtypes(x.dtype)
    sums = x.new_zeros((2, T, F), dtype=acc_t)
    if T == 0:
        return sums
    rows_per_chunk, nchunks = _chunks(N, 2 * T * F, acc_t.itemsize)
    ps = sums if nchunks == 1 else x.new_empty((nchunks, 2, T, F), dtype=acc_t)
    dummy = x.new_empty((1,), dtype=acc_t)
    with _on_device(x):
        tile = _groups_per_program(acc_t)
        _launch(
            _task_sums_partial,
            (nchunks, _fblocks(F), triton.cdiv(T, tile)),
            grad_y,
            x,
            gate if gate is not None else dummy,
            keys if keys is not None else dummy,
            mu,
            ps,
            N,
            F,
            T,
            T * int(key_div),
            int(key_div),
            rows_per_chunk,
            GATE_MODE=_gate_mode(gate),
            HAS_KEYS=keys is not None,
            ACC=ACC,
            BLOCK_N=BLOCK_N,
            BLOCK_F=BLOCK_F,
            GROUP_TILE=tile,
            num_warps=REDUCE_WARPS,
        )
        if nchunks > 1:
            _reduce_chunks(ps, sums, ACC)
    return sums


# -- backward: input gradient -------------------------------------------------------


@triton.jit
def _input_grad(
    dy_ptr,
    x_ptr,
    gate_ptr,
    keys_ptr,
    scale_ptr,
    shift_ptr,
    devc_ptr,
    cen_ptr,
    dx_ptr,
    dgate_ptr,
    pgate_ptr,
    N,
    F,
    NUM_KEYS,
    KEY_DIV,
    ROWS_PER_CHUNK,
    GATE_MODE: tl.constexpr,
    HAS_KEYS: tl.constexpr,
    TRAINING: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """dx = du * sigmoid(gate); the (N, F) gate's gradient du * u * (1 - s), or
    the (F,) gate's per-chunk partial sum of du * u (eval only)."""
    chunk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    gate_acc = tl.zeros((BLOCK_F,), ACC)
    row0 = chunk * ROWS_PER_CHUNK
    for i in range(0, ROWS_PER_CHUNK, BLOCK_N):
        rows = row0 + i + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & fmask[None, :]
        key = _row_keys(keys_ptr, rows, N, NUM_KEYS, HAS_KEYS, BLOCK_N)
        valid = key >= 0
        smask = valid[:, None] & fmask[None, :]
        task = tl.where(valid, key // KEY_DIV, 0).to(tl.int64)
        offs = rows[:, None] * F + cols[None, :]
        u, s = _load_u(x_ptr, gate_ptr, offs, cols, mask, F, GATE_MODE, ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = tl.load(scale_ptr + task[:, None] * F + cols[None, :], mask=smask, other=0.0).to(ACC)
        if TRAINING:
            kf = tl.maximum(key, 0).to(tl.int64)[:, None] * F + cols[None, :]
            a = tl.load(shift_ptr + kf, mask=smask, other=0.0).to(ACC)
            b = tl.load(devc_ptr + kf, mask=smask, other=0.0).to(ACC)
            cen = tl.load(cen_ptr + kf, mask=smask, other=0.0).to(ACC)
            du = (dy - a) * p + b * (u - cen)
        else:
            du = dy * p
        du = tl.where(valid[:, None], du, float("nan"))
        tl.store(dx_ptr + offs, (du * s).to(dx_ptr.dtype.element_ty), mask=mask)
        if GATE_MODE == 1 and not TRAINING:  # training: closed form instead
            gate_acc += tl.sum(tl.where(smask, du * u, 0.0), axis=0)
        if GATE_MODE == 2:
            tl.store(
                dgate_ptr + offs, (du * u * (1.0 - s)).to(dgate_ptr.dtype.element_ty), mask=mask
            )
    if GATE_MODE == 1 and not TRAINING:
        tl.store(pgate_ptr + chunk * F + cols, gate_acc, mask=fmask)


def iwn_input_grad(
    grad_y, x, keys, gate, scale, dy_shift, dev_coef, center, du_dot_u, key_div, training
):
    """dx (N, F) in x's dtype and dgate: (N, F) in x's dtype for a per-instance
    gate, (F,) in acc for a (F,) gate, else an empty (0,) acc tensor. Rows whose
    key is invalid get NaN dx and are left out of the (F,) gate's sum."""
    _rows_only(x)
    N, F = x.shape
    T = scale.shape[0]
    acc_t, ACC = _acc_dtypes(x.dtype)
    mode = _gate_mode(gate)
    training = bool(training)
    num_keys = T * int(key_div)
    if training:
        num_keys = min(num_keys, dy_shift.shape[0])
    reduce_gate = mode == 1 and not training
    if reduce_gate:
        rows_per_chunk, nchunks = _chunks(N, F, acc_t.itemsize)
    else:  # nothing to reduce: one row tile per program
        rows_per_chunk, nchunks = BLOCK_N, triton.cdiv(N, BLOCK_N)
    dx = torch.empty_like(x)
    dummy = x.new_empty((1,), dtype=acc_t)
    dgate_full = torch.empty_like(gate) if mode == 2 else dummy
    gate_sum, pgate = dummy, dummy
    if reduce_gate:
        gate_sum = x.new_zeros((F,), dtype=acc_t)
        pgate = gate_sum if nchunks == 1 else x.new_empty((nchunks, F), dtype=acc_t)
    with _on_device(x):
        _launch(
            _input_grad,
            (nchunks, _fblocks(F)),
            grad_y,
            x,
            gate if gate is not None else dummy,
            keys if keys is not None else dummy,
            scale,
            dy_shift if training else dummy,
            dev_coef if training else dummy,
            center if training else dummy,
            dx,
            dgate_full,
            pgate,
            N,
            F,
            num_keys,
            int(key_div),
            rows_per_chunk,
            GATE_MODE=mode,
            HAS_KEYS=keys is not None,
            TRAINING=training,
            ACC=ACC,
            BLOCK_N=BLOCK_N,
            BLOCK_F=BLOCK_F,
            num_warps=INPUT_GRAD_WARPS_FP64 if acc_t == torch.float64 else REDUCE_WARPS,
        )
        if reduce_gate and nchunks > 1:
            _reduce_chunks(pgate, gate_sum, ACC)
    if mode == 1:
        # sum_i dL/du_i u_i: closed form in training (see iwn_math.h), else reduced
        dgate = (du_dot_u if training else gate_sum) * (1 - torch.sigmoid(gate))
    elif mode == 2:
        dgate = dgate_full
    else:
        dgate = x.new_empty((0,), dtype=acc_t)
    return dx, dgate


# The phase op each launcher implements (ops/_backend.py registers them).
KERNELS = {
    "_iwn_group_moments": iwn_group_moments,
    "_iwn_apply": iwn_apply,
    "_iwn_task_sums": iwn_task_sums,
    "_iwn_input_grad": iwn_input_grad,
}
