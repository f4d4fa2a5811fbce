"""Triton kernels of the SigLIP loss (sigmoid loss of every pair).  The math is the CPU
kernel's (csrc/cpu/siglip.h, python/metassl_fast/reference/).

    x_ij = s Q_i . K_j + b,  z_ij = +1 at column i + diag_col0 of row i, -1 elsewhere
    loss_i = sum_j softplus(-z_ij x_ij),   dL/dx_ij = -z_ij w sigmoid(-z_ij x_ij)
    dQ = s (dL/dx) K,  dK = s (dL/dx)^T Q,  ds = sum dL/dx (Q K^T),  db = sum dL/dx

The S tile is the raw product Q K^T (scale 1), so its sum against dL/dx gives ds.
The forward writes per-row losses; the backward recomputes S in a row-outer (dQ and
per-program (ds, db) partials) and a column-outer (dK) kernel, each program owning one
BLOCK_DO chunk of the output's D (grid axis 1), no atomics.  S is summed over D in
BLOCK_K chunks (kernels/_tiles.py).  GEMM-equivalents, R = ceil(D / BLOCK_DO):
1 (forward) + (R + 1) + (R + 1); floor 3, so 2R over it.

Limits as kernels/contrastive.py: any D, fp32/fp16/bf16 operands, fp32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import _chunk, _s_tile, _sigmoid, _softplus, _span, _store_rows


@triton.jit
def _siglip_x(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, bias, diag_col0,
              PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(raw S, x, z, valid) of a tile."""
    s = _s_tile(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, 1.0, PRECISION, BLOCK_A, BLOCK_B, BLOCK_K)
    x = s * scale + bias
    z = tl.where(cols[None, :] == rows[:, None] + diag_col0, 1.0, -1.0)
    return s, x, z, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _siglip_dx(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, bias, diag_col0, w,
               PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(raw S, dL/dx) of a tile, dL/dx = 0 outside it."""
    s, x, z, ok = _siglip_x(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, bias, diag_col0,
                            PRECISION, BLOCK_A, BLOCK_B, BLOCK_K)
    return s, tl.where(ok, -z * w * _sigmoid(-z * x), 0.0)


@triton.jit
def siglip_fwd_kernel(Q, K, LOSS, N, C, D, stride_q, stride_k, scale, bias, diag_col0, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok = _span(pid * BLOCK_M, BLOCK_M, N)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols, col_ok = _span(start, BLOCK_N, C)
        _s, x, z, ok = _siglip_x(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, bias, diag_col0,
                                 PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        total += tl.sum(tl.where(ok, _softplus(-z * x), 0.0), 1)
    tl.store(LOSS + rows, total, mask=row_ok)


@triton.jit
def siglip_bwd_dq_kernel(Q, K, DQ, PART, N, C, D, stride_q, stride_k, stride_dq, scale, bias, diag_col0, w,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """(dL/dx) K for a block of rows and one BLOCK_DO chunk of D (times s later); chunk 0
    writes PART[pid] = (sum dL/dx S, sum dL/dx)."""
    pid = tl.program_id(0)
    rows, row_ok = _span(pid * BLOCK_M, BLOCK_M, N)
    d, d_ok = _span(tl.program_id(1) * BLOCK_DO, BLOCK_DO, D)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols, col_ok = _span(start, BLOCK_N, C)
        s, dx = _siglip_dx(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, bias, diag_col0, w,
                           PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        ds += tl.sum(dx * s, 1)
        db += tl.sum(dx, 1)
        k = _chunk(K, cols, col_ok, d, d_ok, stride_k)
        acc = tl.dot(dx.to(k.dtype), k, acc, input_precision=PRECISION)
    _store_rows(DQ, rows, row_ok, d, d_ok, stride_dq, acc)
    if tl.program_id(1) == 0:
        tl.store(PART + 2 * pid, tl.sum(ds, 0))
        tl.store(PART + 2 * pid + 1, tl.sum(db, 0))


@triton.jit
def siglip_bwd_dk_kernel(Q, K, DK, N, C, D, stride_q, stride_k, stride_dk, scale, bias, diag_col0, w,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """(dL/dx)^T Q for a block of columns and one BLOCK_DO chunk of D (times s later)."""
    pid = tl.program_id(0)
    cols, col_ok = _span(pid * BLOCK_N, BLOCK_N, C)
    d, d_ok = _span(tl.program_id(1) * BLOCK_DO, BLOCK_DO, D)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows, row_ok = _span(start, BLOCK_M, N)
        _s, dx = _siglip_dx(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, bias, diag_col0, w,
                            PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        q = _chunk(Q, rows, row_ok, d, d_ok, stride_q)
        acc = tl.dot(tl.trans(dx).to(q.dtype), q, acc, input_precision=PRECISION)
    _store_rows(DK, cols, col_ok, d, d_ok, stride_dk, acc)
