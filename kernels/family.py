"""Triton kernels of the rest of the contrastive family: labelled rows (SupCon, NT-Xent,
pytorch-metric-learning's pairwise NT-Xent, explicit positives) and SigLIP.  The math
is the CPU kernel's (csrc/cpu/contrastive.h, python/metassl_fast/reference/family.py).

Labelled rows, S = s Q K^T, anchor i with label yq_i, column j with label yk_j; with
SELF, column i + self_col0 is the anchor itself and in no set:
    valid_ij = not self,  pos_ij = valid and yk_j == yq_i,  neg_ij = yk_j != yq_i
  mean-positive:  l_i = LSE_valid S_i - mean_pos S_i          (+ one extra logit EXT_i,
                  outside S, when HAS_EXT: a positive if EXT_POS, else only in the LSE)
                  G_ij = g_i (exp(S_ij - lse_i) [valid] - [pos] / npos_i)
  pairwise:       l_i = sum_pos softplus(lse_neg_i - S_ip)
                  G_ip = -g_i sigmoid(lse_neg_i - S_ip),  G_in = g_i sig_i exp(S_in - lse_neg_i)
                  with sig_i = sum_pos sigmoid(lse_neg_i - S_ip)
The forward kernel stores per row the loss and the statistics the backward needs
(lse and npos, or lse_neg and sig); the backward recomputes S tiles in a row-outer
(dQ, sum G S per program) and a column-outer (dK) kernel, no atomics.

SigLIP: x = s Q K^T + b, z = +1 at column i + diag_col0 of row i, -1 elsewhere;
loss_i = sum_j softplus(-z x_ij); dL/dx = -z w sigmoid(-z x).

Limits as kernels/contrastive.py: D <= 1024 (BLOCK_D holds all of D), fp32/fp16/bf16
operands, fp32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .contrastive import _s_tile


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _sets(rows, cols, row_ok, col_ok, yq, yk, self_col0, SELF: tl.constexpr):
    """(valid, pos, neg) masks of a tile."""
    ok = row_ok[:, None] & col_ok[None, :]
    valid = ok
    if SELF:
        valid = ok & (cols[None, :] != rows[:, None] + self_col0)
    same = yq[:, None] == yk[None, :]
    return valid, valid & same, ok & (same == 0)


@triton.jit
def labeled_fwd_kernel(Q, K, YQ, YK, EXT, LOSS, STAT_A, STAT_B, N, C, D, stride_q, stride_k, scale, self_col0,
                       SELF: tl.constexpr, PAIRWISE: tl.constexpr, HAS_EXT: tl.constexpr, EXT_POS: tl.constexpr,
                       PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: LOSS, STAT_A = lse (pairwise: lse over the negatives), STAT_B = npos
    (pairwise: sum of the positives' sigmoids)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    yq = tl.load(YQ + rows, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos_sum = tl.zeros([BLOCK_M], tl.float32)
    npos = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        yk = tl.load(YK + cols, mask=col_ok, other=0)
        s, _a, _b = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, scale, PRECISION)
        valid, pos, neg = _sets(rows, cols, row_ok, col_ok, yq, yk, self_col0, SELF)
        npos += tl.sum(tl.where(pos, 1.0, 0.0), 1)
        if PAIRWISE:
            in_lse = neg
        else:
            in_lse = valid
            pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
        sl = tl.where(in_lse, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sl, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing in its LSE yet
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sl - m_safe[:, None]), 1)
        m_i = m_new
    has = l_i > 0  # padded rows, and anchors with nothing in their LSE, have l_i = 0
    log_l = tl.where(has, tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    if PAIRWISE:
        lse = m_i + log_l
        total = tl.zeros([BLOCK_M], tl.float32)
        sig = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, C, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < C
            yk = tl.load(YK + cols, mask=col_ok, other=0)
            s, _a, _b = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, scale, PRECISION)
            valid, pos, neg = _sets(rows, cols, row_ok, col_ok, yq, yk, self_col0, SELF)
            t = lse[:, None] - s
            total += tl.sum(tl.where(pos, _softplus(t), 0.0), 1)
            sig += tl.sum(tl.where(pos, _sigmoid(t), 0.0), 1)
        tl.store(LOSS + rows, tl.where(npos > 0, total, 0.0), mask=row_ok)
        tl.store(STAT_A + rows, lse, mask=row_ok)
        tl.store(STAT_B + rows, sig, mask=row_ok)
    else:
        if HAS_EXT:
            ext = tl.load(EXT + rows, mask=row_ok, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, ext)
            l_i = l_i * tl.exp(m_i - m_new) + tl.exp(ext - m_new)
            m_i = m_new
            if EXT_POS:
                pos_sum += ext
                npos += 1.0
            log_l = tl.log(l_i)
        loss = (m_i - pos_sum / tl.maximum(npos, 1.0)) + log_l
        tl.store(LOSS + rows, tl.where(npos > 0, loss, 0.0), mask=row_ok)
        tl.store(STAT_A + rows, m_i + log_l, mask=row_ok)
        tl.store(STAT_B + rows, npos, mask=row_ok)


@triton.jit
def _labeled_grad(s, valid, pos, neg, g, stat_a, stat_b, PAIRWISE: tl.constexpr):
    """G on a tile; g, stat_a, stat_b broadcast along the anchor axis."""
    # an anchor whose LSE ran over nothing (stat_a = -inf) has no column that uses this
    # exp: keep it finite so that the unselected branch of tl.where holds no inf * 0
    e = tl.exp(tl.where(stat_a == float("-inf"), 0.0, s - stat_a))
    if PAIRWISE:
        gp = -g * _sigmoid(stat_a - s)
        gn = g * stat_b * e
        return tl.where(pos, gp, tl.where(neg, gn, 0.0))
    gv = g * e - tl.where(pos, g / tl.maximum(stat_b, 1.0), 0.0)
    return tl.where(valid & (stat_b > 0), gv, 0.0)


@triton.jit
def labeled_bwd_dq_kernel(Q, K, YQ, YK, G, STAT_A, STAT_B, DQ, DS_PART, N, C, D, stride_q, stride_k, stride_dq,
                          scale, self_col0, SELF: tl.constexpr, PAIRWISE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """G K for a block of anchors (times s later) and the block's sum G S."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    yq = tl.load(YQ + rows, mask=row_ok, other=0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    a = tl.load(STAT_A + rows, mask=row_ok, other=0.0)
    b = tl.load(STAT_B + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gs = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        yk = tl.load(YK + cols, mask=col_ok, other=0)
        s, _q, k = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, scale, PRECISION)
        valid, pos, neg = _sets(rows, cols, row_ok, col_ok, yq, yk, self_col0, SELF)
        gt = _labeled_grad(s, valid, pos, neg, g[:, None], a[:, None], b[:, None], PAIRWISE)
        gs += tl.sum(gt * s, 1)
        acc = tl.dot(gt.to(k.dtype), k, acc, input_precision=PRECISION)
    tl.store(DQ + rows[:, None] * stride_dq + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(DS_PART + pid, tl.sum(gs, 0))


@triton.jit
def labeled_bwd_dk_kernel(Q, K, YQ, YK, G, STAT_A, STAT_B, DK, N, C, D, stride_q, stride_k, stride_dk, scale,
                          self_col0, SELF: tl.constexpr, PAIRWISE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """G^T Q for a block of columns (Q already scaled by the caller's choice of scale)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    yk = tl.load(YK + cols, mask=col_ok, other=0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        yq = tl.load(YQ + rows, mask=row_ok, other=0)
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        a = tl.load(STAT_A + rows, mask=row_ok, other=0.0)
        b = tl.load(STAT_B + rows, mask=row_ok, other=0.0)
        s, q, _k = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, scale, PRECISION)
        valid, pos, neg = _sets(rows, cols, row_ok, col_ok, yq, yk, self_col0, SELF)
        gt = _labeled_grad(s, valid, pos, neg, g[:, None], a[:, None], b[:, None], PAIRWISE)
        acc = tl.dot(tl.trans(gt).to(q.dtype), q, acc, input_precision=PRECISION)
    tl.store(DK + cols[:, None] * stride_dk + d[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _siglip_tile(s_raw, rows, cols, row_ok, col_ok, scale, bias, diag_col0):
    """(x, z, valid) of a tile."""
    x = s_raw * scale + bias
    z = tl.where(cols[None, :] == rows[:, None] + diag_col0, 1.0, -1.0)
    return x, z, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _siglip_dx(s_raw, rows, cols, row_ok, col_ok, scale, bias, diag_col0, w):
    """dL/dx = -z w sigmoid(-z x) on a tile, 0 outside it."""
    x, z, ok = _siglip_tile(s_raw, rows, cols, row_ok, col_ok, scale, bias, diag_col0)
    return tl.where(ok, -z * w * _sigmoid(-z * x), 0.0)


@triton.jit
def siglip_fwd_kernel(Q, K, LOSS, N, C, D, stride_q, stride_k, scale, bias, diag_col0, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    total = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        s, _a, _b = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, 1.0, PRECISION)
        x, z, ok = _siglip_tile(s, rows, cols, row_ok, col_ok, scale, bias, diag_col0)
        total += tl.sum(tl.where(ok, _softplus(-z * x), 0.0), 1)
    tl.store(LOSS + rows, total, mask=row_ok)


@triton.jit
def siglip_bwd_dq_kernel(Q, K, DQ, PART, N, C, D, stride_q, stride_k, stride_dq, scale, bias, diag_col0, w,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """(dL/dx) K for a block of rows (times s later); PART[pid] = (sum dL/dx S, sum dL/dx)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        s, _q, k = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, 1.0, PRECISION)
        dx = _siglip_dx(s, rows, cols, row_ok, col_ok, scale, bias, diag_col0, w)
        ds += tl.sum(dx * s, 1)
        db += tl.sum(dx, 1)
        acc = tl.dot(dx.to(k.dtype), k, acc, input_precision=PRECISION)
    tl.store(DQ + rows[:, None] * stride_dq + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(PART + 2 * pid, tl.sum(ds, 0))
    tl.store(PART + 2 * pid + 1, tl.sum(db, 0))


@triton.jit
def siglip_bwd_dk_kernel(Q, K, DK, N, C, D, stride_q, stride_k, stride_dk, scale, bias, diag_col0, w,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """(dL/dx)^T Q for a block of columns (times s later)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        s, q, _k = _s_tile(Q, K, rows, cols, row_ok, col_ok, d, d_ok, stride_q, stride_k, 1.0, PRECISION)
        dx = _siglip_dx(s, rows, cols, row_ok, col_ok, scale, bias, diag_col0, w)
        acc = tl.dot(tl.trans(dx).to(q.dtype), q, acc, input_precision=PRECISION)
    tl.store(DK + cols[:, None] * stride_dk + d[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])
