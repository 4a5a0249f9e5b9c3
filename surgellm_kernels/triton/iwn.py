"""Triton kernels of ``fused_iwn`` (SPEC §2): a split reduction with no atomics.

Forward (training):
  1. ``_moments_partial``: grid (row chunks x feature blocks x group tiles);
     per (chunk, group, feature) count, mean and M2 of u = x * sigmoid(gate),
     two passes over the chunk (sum, then squared deviations).
  2. ``_combine``: grid (tasks x feature blocks); merges the chunks in order
     with Chan's formula, then Eq.10-11 over the classes present.
  3. ``_normalize``: y = (u - mu_t) / (sigma_t + eps) * w + b.
Backward: ``_task_sums_partial`` (s1 = sum dy, s2 = sum dy (u - mu) per task
and chunk), ``_backward_coefficients`` (the coefficients of
csrc/include/iwn_math.h, including the closed-form gate gradient of
training), ``_input_grad`` (dx, dgate). Partials are merged in a
fixed order, so results are deterministic.

Only core ``tl`` math is used (``tl.sigmoid``, ``tl.sqrt``): the Triton CPU
interpreter (TRITON_INTERPRET=1) has no libdevice. Every load is converted to
the accumulation dtype (float32, float64 for float64 data) before any math.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 8       # rows per tile
BLOCK_F = 64      # features per program
GROUP_TILE = 16   # (task, class) groups per program in the one-hot reductions
TARGET_CHUNKS = 128


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _torch_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(n: int) -> int:
    per = max(BLOCK_N, triton.cdiv(n, TARGET_CHUNKS))
    return triton.cdiv(per, BLOCK_N) * BLOCK_N


def _gate_mode(gate) -> int:
    return 0 if gate is None else (1 if gate.dim() == 1 else 2)


@triton.jit
def _load_u(x_ptr, gate_ptr, rows, cols, mask, F, GATE_MODE: tl.constexpr, ACC: tl.constexpr):
    """u = x * sigmoid(gate) for a [BLOCK_N, BLOCK_F] tile, and the sigmoid."""
    offs = rows[:, None] * F + cols[None, :]
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
def _keyed_rows(x_ptr, gate_ptr, keys_ptr, r, cols, groups, N, F, GATE_MODE: tl.constexpr,
                ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [r, r + BLOCK_N): one-hot of their key over ``groups``, and u."""
    rows = r + tl.arange(0, BLOCK_N)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    keys = tl.load(keys_ptr + rows, mask=rows < N, other=-1)
    onehot = (keys[:, None] == groups[None, :]).to(ACC)
    u, _s = _load_u(x_ptr, gate_ptr, rows, cols, mask, F, GATE_MODE, ACC)
    return onehot, u


@triton.jit
def _moments_partial(x_ptr, gate_ptr, keys_ptr, pcount_ptr, pmean_ptr, pm2_ptr, N, F, K,
                     ROWS_PER_CHUNK, GATE_MODE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, GROUP_TILE: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    groups = tl.program_id(2) * GROUP_TILE + tl.arange(0, GROUP_TILE)
    row0 = chunk * ROWS_PER_CHUNK
    count = tl.zeros((GROUP_TILE,), ACC)
    total = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    for r in range(row0, row0 + ROWS_PER_CHUNK, BLOCK_N):
        onehot, u = _keyed_rows(x_ptr, gate_ptr, keys_ptr, r, cols, groups, N, F, GATE_MODE, ACC,
                                BLOCK_N)
        count += tl.sum(onehot, axis=0)
        total += tl.sum(onehot[:, :, None] * u[:, None, :], axis=0)
    mean = total / tl.maximum(count, 1.0)[:, None]
    m2 = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    for r in range(row0, row0 + ROWS_PER_CHUNK, BLOCK_N):
        onehot, u = _keyed_rows(x_ptr, gate_ptr, keys_ptr, r, cols, groups, N, F, GATE_MODE, ACC,
                                BLOCK_N)
        row_mean = tl.sum(onehot[:, :, None] * mean[None, :, :], axis=1)
        dev = (u - row_mean) * tl.sum(onehot, axis=1)[:, None]
        m2 += tl.sum(onehot[:, :, None] * (dev * dev)[:, None, :], axis=0)
    gmask = groups < K
    out = (chunk * K + groups)[:, None] * F + cols[None, :]
    omask = gmask[:, None] & (cols < F)[None, :]
    tl.store(pmean_ptr + out, mean, mask=omask)
    tl.store(pm2_ptr + out, m2, mask=omask)
    if tl.program_id(1) == 0:
        tl.store(pcount_ptr + chunk * K + groups, count, mask=gmask)


@triton.jit
def _merge_class(pcount_ptr, pmean_ptr, pm2_ptr, k, cols, fmask, F, K, NUM_CHUNKS,
                 ACC: tl.constexpr, BLOCK_F: tl.constexpr):
    """Chan-merge group k's chunk summaries in chunk order."""
    n = tl.zeros((BLOCK_F,), ACC)
    mean = tl.zeros((BLOCK_F,), ACC)
    m2 = tl.zeros((BLOCK_F,), ACC)
    for ch in range(0, NUM_CHUNKS):
        nb = tl.load(pcount_ptr + ch * K + k).to(ACC)
        off = (ch * K + k) * F + cols
        mb = tl.load(pmean_ptr + off, mask=fmask, other=0.0)
        m2b = tl.load(pm2_ptr + off, mask=fmask, other=0.0)
        total = n + nb
        frac = tl.where(total > 0, nb / tl.maximum(total, 1.0), 0.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * n * frac
        n = total
    return n, mean, m2


@triton.jit
def _combine(pcount_ptr, pmean_ptr, pm2_ptr, gcount_ptr, gmean_ptr, gstd_ptr, mu_ptr, sigma_ptr,
             F, C, NUM_CHUNKS, POOLED: tl.constexpr, ACC: tl.constexpr, BLOCK_F: tl.constexpr):
    """Eq.10-11 for one task and a block of features (see iwn_math.h)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    K = tl.num_programs(0) * C
    present = tl.zeros((BLOCK_F,), ACC)
    sum_mean = tl.zeros((BLOCK_F,), ACC)
    sum_std = tl.zeros((BLOCK_F,), ACC)
    for c in range(0, C):
        k = t * C + c
        n, mean, m2 = _merge_class(pcount_ptr, pmean_ptr, pm2_ptr, k, cols, fmask, F, K,
                                   NUM_CHUNKS, ACC, BLOCK_F)
        has = n > 0
        sd = tl.where(has, tl.sqrt(tl.maximum(m2 / tl.maximum(n, 1.0), 0.0)), 0.0)
        present += has.to(ACC)
        sum_mean += tl.where(has, mean, 0.0)
        sum_std += sd
        tl.store(gmean_ptr + k * F + cols, mean, mask=fmask)
        tl.store(gstd_ptr + k * F + cols, sd, mask=fmask)
        if tl.program_id(1) == 0:
            tl.store(gcount_ptr + k, tl.max(n, axis=0))
    denom = tl.maximum(present, 1.0)
    mu = sum_mean / denom
    sigma = sum_std / denom
    if POOLED:
        spread = tl.zeros((BLOCK_F,), ACC)
        for c in range(0, C):
            k = t * C + c
            n, mean, m2 = _merge_class(pcount_ptr, pmean_ptr, pm2_ptr, k, cols, fmask, F, K,
                                       NUM_CHUNKS, ACC, BLOCK_F)
            d = mean - mu
            spread += tl.where(n > 0, m2 / tl.maximum(n, 1.0) + d * d, 0.0)
        spread = spread / denom
        sigma = tl.where(spread > 0, tl.sqrt(tl.maximum(spread, 0.0)), 0.0)
    tl.store(mu_ptr + t * F + cols, mu, mask=fmask)
    tl.store(sigma_ptr + t * F + cols, sigma, mask=fmask)


@triton.jit
def _normalize(x_ptr, gate_ptr, keys_ptr, w_ptr, b_ptr, mu_ptr, sigma_ptr, y_ptr, N, F, KEY_DIV,
               eps, GATE_MODE: tl.constexpr, HAS_KEYS: tl.constexpr, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    u, _s = _load_u(x_ptr, gate_ptr, rows, cols, mask, F, GATE_MODE, ACC)
    if HAS_KEYS:
        task = tl.load(keys_ptr + rows, mask=rows < N, other=0) // KEY_DIV
    else:
        task = tl.zeros((BLOCK_N,), tl.int32)
    stat = task[:, None] * F + cols[None, :]
    mu = tl.load(mu_ptr + stat, mask=mask, other=0.0)
    sigma = tl.load(sigma_ptr + stat, mask=mask, other=1.0)
    y = (u - mu) / (sigma + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < F, other=1.0)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cols < F, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * F + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _task_sums_partial(dy_ptr, x_ptr, gate_ptr, keys_ptr, mu_ptr, ps_ptr, N, F, T, KEY_DIV,
                       ROWS_PER_CHUNK, GATE_MODE: tl.constexpr, HAS_KEYS: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                       GROUP_TILE: tl.constexpr):
    """Per (chunk, task): s1 = sum dy and s2 = sum dy * (u - mu_task)."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    tasks = tl.program_id(2) * GROUP_TILE + tl.arange(0, GROUP_TILE)
    s1 = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    s2 = tl.zeros((GROUP_TILE, BLOCK_F), ACC)
    row0 = chunk * ROWS_PER_CHUNK
    for r in range(row0, row0 + ROWS_PER_CHUNK, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & (cols < F)[None, :]
        if HAS_KEYS:
            task = tl.load(keys_ptr + rows, mask=rows < N, other=0) // KEY_DIV
        else:
            task = tl.zeros((BLOCK_N,), tl.int32)
        task = tl.where(rows < N, task, -1)
        onehot = (task[:, None] == tasks[None, :]).to(ACC)
        u, _s = _load_u(x_ptr, gate_ptr, rows, cols, mask, F, GATE_MODE, ACC)
        dy = tl.load(dy_ptr + rows[:, None] * F + cols[None, :], mask=mask, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + tl.maximum(task, 0)[:, None] * F + cols[None, :], mask=mask,
                     other=0.0)
        s1 += tl.sum(onehot[:, :, None] * dy[:, None, :], axis=0)
        s2 += tl.sum(onehot[:, :, None] * (dy * (u - mu))[:, None, :], axis=0)
    out = (chunk * 2 * T + tasks)[:, None] * F + cols[None, :]
    omask = (tasks < T)[:, None] & (cols < F)[None, :]
    tl.store(ps_ptr + out, s1, mask=omask)
    tl.store(ps_ptr + out + T * F, s2, mask=omask)


@triton.jit
def _backward_coefficients(ps_ptr, w_ptr, gcount_ptr, gmean_ptr, gstd_ptr, mu_ptr, sigma_ptr,
                           p_ptr, a_ptr, b_ptr, cen_ptr, dw_ptr, db_ptr, duu_ptr, F, T, C,
                           NUM_CHUNKS,
                           eps, TRAINING: tl.constexpr, POOLED: tl.constexpr,
                           HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_F: tl.constexpr):
    """dL/du = (dy - A) * P + B * (u - center), per (task, class); see iwn_math.h."""
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=fmask, other=1.0)
    else:
        w = tl.full((BLOCK_F,), 1.0, ACC)
    dw = tl.zeros((BLOCK_F,), ACC)
    db = tl.zeros((BLOCK_F,), ACC)
    du_dot_u = tl.zeros((BLOCK_F,), ACC)  # closed form of sum_i dL/du_i u_i (training)
    for t in range(0, T):
        s1 = tl.zeros((BLOCK_F,), ACC)
        s2 = tl.zeros((BLOCK_F,), ACC)
        for ch in range(0, NUM_CHUNKS):
            s1 += tl.load(ps_ptr + (ch * 2 * T + t) * F + cols, mask=fmask, other=0.0)
            s2 += tl.load(ps_ptr + (ch * 2 * T + T + t) * F + cols, mask=fmask, other=0.0)
        mu = tl.load(mu_ptr + t * F + cols, mask=fmask, other=0.0)
        sigma = tl.load(sigma_ptr + t * F + cols, mask=fmask, other=1.0)
        r = 1.0 / (sigma + eps)
        dy_yhat = r * s2
        tl.store(p_ptr + t * F + cols, w * r, mask=fmask)
        dw += dy_yhat
        db += s1
        du_dot_u += eps * r * w * dy_yhat
        if TRAINING:
            present = tl.zeros((BLOCK_F,), ACC)
            for c in range(0, C):
                present += (tl.load(gcount_ptr + t * C + c) > 0).to(ACC)
            d_sigma = -r * w * dy_yhat
            for c in range(0, C):
                k = t * C + c
                n = tl.load(gcount_ptr + k).to(ACC)
                inv = tl.where(n > 0, 1.0 / tl.maximum(present * n, 1.0), 0.0)
                if POOLED:
                    dev = sigma
                    cen = mu
                else:
                    dev = tl.load(gstd_ptr + k * F + cols, mask=fmask, other=0.0)
                    cen = tl.load(gmean_ptr + k * F + cols, mask=fmask, other=0.0)
                b = tl.where(dev > 0, d_sigma * inv / tl.where(dev > 0, dev, 1.0), 0.0)
                tl.store(a_ptr + k * F + cols, s1 * inv, mask=fmask)
                tl.store(b_ptr + k * F + cols, b, mask=fmask)
                tl.store(cen_ptr + k * F + cols, tl.where(n > 0, cen, 0.0), mask=fmask)
    tl.store(dw_ptr + cols, dw, mask=fmask)
    tl.store(db_ptr + cols, db, mask=fmask)
    tl.store(duu_ptr + cols, du_dot_u, mask=fmask)


@triton.jit
def _input_grad(dy_ptr, x_ptr, gate_ptr, keys_ptr, p_ptr, a_ptr, b_ptr, cen_ptr, dx_ptr,
                dgate_ptr, pgate_ptr, N, F, KEY_DIV, ROWS_PER_CHUNK, GATE_MODE: tl.constexpr,
                HAS_KEYS: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    gate_acc = tl.zeros((BLOCK_F,), ACC)
    row0 = chunk * ROWS_PER_CHUNK
    for r in range(row0, row0 + ROWS_PER_CHUNK, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & (cols < F)[None, :]
        if HAS_KEYS:
            key = tl.load(keys_ptr + rows, mask=rows < N, other=0)
        else:
            key = tl.zeros((BLOCK_N,), tl.int32)
        offs = rows[:, None] * F + cols[None, :]
        u, s = _load_u(x_ptr, gate_ptr, rows, cols, mask, F, GATE_MODE, ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = tl.load(p_ptr + (key // KEY_DIV)[:, None] * F + cols[None, :], mask=mask, other=0.0)
        if TRAINING:
            kf = key[:, None] * F + cols[None, :]
            du = (dy - tl.load(a_ptr + kf, mask=mask, other=0.0)) * p
            du += tl.load(b_ptr + kf, mask=mask, other=0.0) * (
                u - tl.load(cen_ptr + kf, mask=mask, other=0.0))
        else:
            du = dy * p
        tl.store(dx_ptr + offs, (du * s).to(dx_ptr.dtype.element_ty), mask=mask)
        if GATE_MODE == 1 and not TRAINING:  # training: closed form instead
            gate_acc += tl.sum(tl.where(mask, du * u, 0.0), axis=0)
        if GATE_MODE == 2:
            tl.store(dgate_ptr + offs, (du * u * (1.0 - s)).to(dgate_ptr.dtype.element_ty),
                     mask=mask)
    if GATE_MODE == 1 and not TRAINING:
        tl.store(pgate_ptr + chunk * F + cols, gate_acc, mask=cols < F)


def _group_tiles(k: int) -> int:
    return triton.cdiv(k, GROUP_TILE)


def iwn_forward(x, keys, gate, weight, bias, mean_in, std_in, training, T, C, eps, pooled):
    """Same contract as the C++ ``iwn_forward`` (see csrc/bindings.cpp)."""
    N, F = x.shape
    acc_t = _torch_acc(x.dtype)
    ACC = _acc(x.dtype)
    K = T * C if training else 0
    y = torch.empty_like(x)
    gcount = x.new_empty((K,), dtype=acc_t)
    gmean = x.new_empty((K, F), dtype=acc_t)
    gstd = x.new_empty((K, F), dtype=acc_t)
    dummy = x.new_empty((1,), dtype=acc_t)
    gate_arg = gate if gate is not None else dummy
    fblocks = triton.cdiv(F, BLOCK_F)
    if training:
        mu = x.new_empty((T, F), dtype=acc_t)
        sigma = x.new_empty((T, F), dtype=acc_t)
        keys_arg = keys if keys is not None else torch.zeros(N, dtype=torch.int32, device=x.device)
        rows_per_chunk = _rows_per_chunk(N)
        nchunks = triton.cdiv(N, rows_per_chunk)
        pcount = x.new_empty((nchunks, K), dtype=acc_t)
        pmean = x.new_empty((nchunks, K, F), dtype=acc_t)
        pm2 = x.new_empty((nchunks, K, F), dtype=acc_t)
        _moments_partial[(nchunks, fblocks, _group_tiles(K))](
            x, gate_arg, keys_arg, pcount, pmean, pm2, N, F, K, rows_per_chunk,
            GATE_MODE=_gate_mode(gate), ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F,
            GROUP_TILE=GROUP_TILE)
        _combine[(T, fblocks)](pcount, pmean, pm2, gcount, gmean, gstd, mu, sigma, F, C, nchunks,
                               POOLED=pooled, ACC=ACC, BLOCK_F=BLOCK_F)
        stats_mu, stats_sigma, key_div = mu, sigma, C
    else:
        mu, sigma = mean_in.clone(), std_in.clone()
        stats_mu, stats_sigma, key_div = mean_in, std_in, 1
        keys_arg = keys
    if N > 0:
        _normalize[(triton.cdiv(N, BLOCK_N), fblocks)](
            x, gate_arg, keys_arg if keys_arg is not None else dummy,
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            stats_mu, stats_sigma, y, N, F, key_div, eps, GATE_MODE=_gate_mode(gate),
            HAS_KEYS=keys_arg is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return y, gcount, gmean, gstd, mu, sigma


def iwn_backward(dy, x, keys, gate, weight, gcount, gmean, gstd, mu, sigma, training, T, C, eps,
                 pooled):
    """Same contract as the C++ ``iwn_backward`` (see csrc/bindings.cpp)."""
    N, F = x.shape
    acc_t = _torch_acc(x.dtype)
    ACC = _acc(x.dtype)
    key_div = C if training else 1
    K = T * key_div
    dummy = x.new_empty((1,), dtype=acc_t)
    gate_arg = gate if gate is not None else dummy
    keys_arg = keys if keys is not None else dummy
    fblocks = triton.cdiv(F, BLOCK_F)
    rows_per_chunk = _rows_per_chunk(N)
    nchunks = triton.cdiv(N, rows_per_chunk)
    mode = _gate_mode(gate)
    ps = x.new_zeros((nchunks, 2 * T, F), dtype=acc_t)
    _task_sums_partial[(nchunks, fblocks, _group_tiles(T))](
        dy, x, gate_arg, keys_arg, mu, ps, N, F, T, key_div, rows_per_chunk, GATE_MODE=mode,
        HAS_KEYS=keys is not None, ACC=ACC, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F,
        GROUP_TILE=GROUP_TILE)
    P = x.new_empty((T, F), dtype=acc_t)
    A = x.new_empty((K, F), dtype=acc_t)
    B = torch.empty_like(A)
    center = torch.empty_like(A)
    dweight = x.new_empty((F,), dtype=acc_t)
    dbias = x.new_empty((F,), dtype=acc_t)
    du_dot_u = x.new_empty((F,), dtype=acc_t)
    _backward_coefficients[(fblocks,)](
        ps, weight if weight is not None else dummy, gcount if training else dummy,
        gmean if training else dummy, gstd if training else dummy, mu, sigma, P, A, B, center,
        dweight, dbias, du_dot_u, F, T, C, nchunks, eps, TRAINING=training, POOLED=pooled,
        HAS_W=weight is not None, ACC=ACC, BLOCK_F=BLOCK_F)
    dx = torch.empty_like(x)
    dgate_full = torch.empty_like(gate) if mode == 2 else dummy
    pgate = x.new_empty((nchunks, F), dtype=acc_t) if mode == 1 else dummy
    _input_grad[(nchunks, fblocks)](
        dy, x, gate_arg, keys_arg, P, A, B, center, dx, dgate_full, pgate, N, F, key_div,
        rows_per_chunk, GATE_MODE=mode, HAS_KEYS=keys is not None, TRAINING=training, ACC=ACC,
        BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    if mode == 1:
        # sum_i dL/du_i u_i: closed form in training (see iwn_math.h), else reduced
        dgate = (du_dot_u if training else pgate.sum(0)) * (1 - torch.sigmoid(gate))
    elif mode == 2:
        dgate = dgate_full
    else:
        dgate = x.new_empty((0,), dtype=acc_t)
    return dx, dgate, dweight, dbias
