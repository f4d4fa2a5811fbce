"""Triton kernels of the fused contrastive loss (InfoNCE, symmetric InfoNCE, CLIP).

    S = s Q K^T      Q (N, D) queries, K (C, D) = [keys; negatives], keys are columns < N
    lse_row_i = log sum_j exp S_ij                       (all C columns)
    lse_col_j = log sum_i exp S_ij                       (j < N, symmetric only)
    G_ij = g_row_i (exp(S_ij - lse_row_i) - [i = j]) + [j < N] g_col_j (exp(S_ij - lse_col_j) - [i = j])
    dQ = s G K,  dK = s G^T Q,  ds = sum_ij G_ij S_ij / s

Forward: one program per BLOCK_M rows streams every column tile once (S summed over D
in BLOCK_K chunks, the pipelined inner loop), keeps an online (max, sum) per row, and
(symmetric) merges each tile's per-column (max, sum) over its rows into a global
running pair under a per-tile lock, taken once per column tile, outside the pipelined
D loop.  Programs start at a column tile offset by their id, which spreads them over
the locks.  The merge order varies with scheduling, so lse_col can differ in the last
bits between runs: under torch.use_deterministic_algorithms(True) the host runs this
kernel one-sided twice instead, on (Q, K) and on (K[:N], Q) (the column LSE is the row
LSE of S^T), in a fixed order.  S is never written to memory.
Backward: two kernels recompute S, one row-outer (dQ and the ds partials, one per
program), one column-outer (dK for the requested key rows).  Each program owns one
BLOCK_DO-wide chunk of the output's D (grid axis 1), so its accumulator is
(BLOCK_M, BLOCK_DO) whatever D is, and S is recomputed once per chunk.  No atomics:
the backward is bit-for-bit repeatable.

GEMM-equivalents (N x C x D products) per loss, R = ceil(D / BLOCK_DO):
  one-sided: 1 (forward) + (R + 1) (dQ) + (R + 1) (dK) = 2R + 3; floor 3, so 2R over it
             (2 at D <= BLOCK_DO)
  symmetric: the same with the lock (floor 4: 2R - 1 over it); deterministic forward + 1.
Limits: any D (chunked); operands fp32, fp16 or bf16, accumulation fp32; fp32 dots use
tf32 unless input_precision="ieee".
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import _chunk, _s_tile, _span, _store_rows


@triton.jit
def _grad_tile(s, row_lse, row_g, col_lse, col_g, is_diag, col_is_key, valid, SYMMETRIC: tl.constexpr):
    """G on a tile; row_* broadcast along the tile's row-loss axis, col_* along the other."""
    diag = tl.where(is_diag, 1.0, 0.0)
    g = row_g * (tl.exp(s - row_lse) - diag)
    if SYMMETRIC:
        g += tl.where(col_is_key, col_g * (tl.exp(s - col_lse) - diag), 0.0)
    return tl.where(valid, g, 0.0)


@triton.jit
def contrastive_fwd_kernel(Q, K, LSE, POS, ROW_LOSS, COL_MAX, COL_SUM, LOCK, N, C, D, stride_q, stride_k, scale,
                           SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok = _span(pid * BLOCK_M, BLOCK_M, N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    n_tiles = tl.cdiv(C, BLOCK_N)
    for t in range(0, n_tiles):
        tile = (t + pid) % n_tiles
        cols, col_ok = _span(tile * BLOCK_N, BLOCK_N, C)
        s = _s_tile(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, PRECISION, BLOCK_M, BLOCK_N,
                    BLOCK_K)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
        pos += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), 1)
        if SYMMETRIC:
            key_col = col_ok & (cols < N)
            if tile * BLOCK_N < N:  # this tile holds key columns: merge its column partials
                sc = tl.where(row_ok[:, None], s, float("-inf"))
                cm = tl.max(sc, 0)
                cm_safe = tl.where(key_col, cm, 0.0)
                cl = tl.sum(tl.exp(sc - cm_safe[None, :]), 0)
                lock = LOCK + tile
                while tl.atomic_cas(lock, 0, 1) == 1:
                    pass
                # .cg: read through L2, not a stale L1 line, what the last lock holder wrote
                om = tl.load(COL_MAX + cols, mask=key_col, other=0.0, cache_modifier=".cg")
                osum = tl.load(COL_SUM + cols, mask=key_col, other=0.0, cache_modifier=".cg")
                nm = tl.maximum(om, cm_safe)
                ns = osum * tl.exp(om - nm) + cl * tl.exp(cm_safe - nm)
                tl.store(COL_MAX + cols, nm, mask=key_col)
                tl.store(COL_SUM + cols, ns, mask=key_col)
                tl.debug_barrier()
                tl.atomic_xchg(lock, 0)
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=row_ok)
    tl.store(POS + rows, pos, mask=row_ok)
    # (max - positive) + log sum: the row loss without the cancellation of lse - positive
    tl.store(ROW_LOSS + rows, (m_i - pos) + tl.log(l_i), mask=row_ok)


@triton.jit
def contrastive_bwd_dq_kernel(Q, K, LSE, G_ROW, LSE_COL, G_COL, DQ, DS_PART, N, C, D, stride_q, stride_k,
                              stride_dq, scale, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_DO: tl.constexpr):
    """dQ / s for a block of rows and one BLOCK_DO chunk of D, and (chunk 0) this block's
    share of sum G S."""
    pid = tl.program_id(0)
    rows, row_ok = _span(pid * BLOCK_M, BLOCK_M, N)
    d, d_ok = _span(tl.program_id(1) * BLOCK_DO, BLOCK_DO, D)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g_row = tl.load(G_ROW + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    gs = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols, col_ok = _span(start, BLOCK_N, C)
        s = _s_tile(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, PRECISION, BLOCK_M, BLOCK_N,
                    BLOCK_K)
        key_col = col_ok & (cols < N)
        # one-sided: LSE_COL and G_COL are any length-N buffers, loaded but unused
        col_lse = tl.load(LSE_COL + cols, mask=key_col, other=0.0)
        col_g = tl.load(G_COL + cols, mask=key_col, other=0.0)
        g = _grad_tile(s, lse[:, None], g_row[:, None], col_lse[None, :], col_g[None, :],
                       rows[:, None] == cols[None, :], key_col[None, :],
                       row_ok[:, None] & col_ok[None, :], SYMMETRIC)
        gs += tl.sum(g * s, 1)
        k = _chunk(K, cols, col_ok, d, d_ok, stride_k)
        acc = tl.dot(g.to(k.dtype), k, acc, input_precision=PRECISION)
    _store_rows(DQ, rows, row_ok, d, d_ok, stride_dq, acc)
    if tl.program_id(1) == 0:
        tl.store(DS_PART + pid, tl.sum(gs, 0))


@triton.jit
def contrastive_bwd_dk_kernel(Q, K, LSE, G_ROW, LSE_COL, G_COL, DK, N, C, D, col0, col1, stride_q,
                              stride_k, stride_dk, scale, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_DO: tl.constexpr):
    """dK = G^T Q (times s later) for key rows [col0, col1) and one BLOCK_DO chunk of D;
    DK row r is key row col0 + r."""
    pid = tl.program_id(0)
    cols, col_ok = _span(col0 + pid * BLOCK_N, BLOCK_N, col1)
    key_col = col_ok & (cols < N)
    d, d_ok = _span(tl.program_id(1) * BLOCK_DO, BLOCK_DO, D)
    # one-sided: LSE_COL and G_COL are any length-N buffers, loaded but unused
    col_lse = tl.load(LSE_COL + cols, mask=key_col, other=0.0)
    col_g = tl.load(G_COL + cols, mask=key_col, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows, row_ok = _span(start, BLOCK_M, N)
        st = _s_tile(K, Q, cols, rows, col_ok, row_ok, D, stride_k, stride_q, scale, PRECISION, BLOCK_N, BLOCK_M,
                     BLOCK_K)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        g_row = tl.load(G_ROW + rows, mask=row_ok, other=0.0)
        gt = _grad_tile(st, lse[None, :], g_row[None, :], col_lse[:, None], col_g[:, None],
                        cols[:, None] == rows[None, :], key_col[:, None],
                        col_ok[:, None] & row_ok[None, :], SYMMETRIC)
        q = _chunk(Q, rows, row_ok, d, d_ok, stride_q)
        acc = tl.dot(gt.to(q.dtype), q, acc, input_precision=PRECISION)
    _store_rows(DK, cols - col0, col_ok, d, d_ok, stride_dk, acc)
