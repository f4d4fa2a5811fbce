"""CPU backend of the contrastive op: the row-block sweep (ops/_common.py row_sweep; its
products S, G K and G^T Q in csrc/cpu/gemm.cpp or torch's BLAS, sweep_gemm), and
csrc/cpu/contrastive.cpp for the log-sum-exp,
softmax and gradient of each block in cache.

GEMM count: one-sided 3 (S, dQ, dK in one pass during the forward); symmetric 4
(pass 1 for the row and column LSE, pass 2 recomputes S for the gradient).  For a
scalar loss with grad enabled the gradient is computed in the forward and the
backward only scales it by grad_output; reduction="none" recomputes in backward.
"""
from __future__ import annotations

import math

import torch

from ... import _ext
from .._common import nthreads, row_sweep
from ._shared import col_lse_and_loss, empty_grads, finish_grads, inputs, key_rows, reduce, row_weights

PRECOMPUTES = True  # the gradient of a scalar loss is formed during the forward


def _sweep(qs, keys, n_pairs, *, stats, col_stats, grad, lse_row, lse_col, g_row, g_col, need_dq, dk_rows):
    """One pass over the row blocks of S = qs keys^T (qs is already scaled by s).

    stats: compute lse_row (written) and the row losses; col_stats: the column LSE
    and losses; grad: overwrite each block with G.  Returns ((row_loss, col_loss),
    lse_col, dq / s, dk of key rows dk_rows = (c0, c1) or None, sum G S)."""
    C_ext = _ext.require("_C")
    n_rows, n_cols = qs.shape[0], keys.shape[0]
    dtype = qs.dtype
    code = _ext.DTYPE_CODE[dtype]
    nt = nthreads()
    pos = torch.empty(n_rows, dtype=dtype) if stats else None
    row_loss = torch.empty(n_rows, dtype=dtype) if stats else None
    col_max = col_sum = None
    if col_stats:
        col_max = torch.full((n_pairs,), -math.inf, dtype=dtype)
        col_sum = torch.zeros(n_pairs, dtype=dtype)
    dq = torch.empty_like(qs) if grad and need_dq else None
    dk = keys.new_zeros(dk_rows[1] - dk_rows[0], keys.shape[1]) if grad and dk_rows is not None else None
    with_col = grad and lse_col is not None
    gs = [0.0]

    def kernel(S, r0, r1):
        if col_stats:
            C_ext.block_col_stats(
                dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, n_cols=n_pairs,
                ld=n_cols, col_max=col_max.data_ptr(), col_sum=col_sum.data_ptr(),
                col_numel=n_pairs, nthreads=nt)
        # element counts are the slices' own: the C++ side checks them against B
        b = r1 - r0
        lse_blk = lse_row[r0:r1]
        gs[0] += C_ext.block_rows(
            dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=b, C=n_cols, ld=n_cols,
            row0=r0, n_pairs=n_pairs, lse=lse_blk.data_ptr(), lse_numel=lse_blk.numel(),
            compute_lse=stats, pos=pos[r0:r1].data_ptr() if stats else 0, pos_numel=b if stats else 0,
            row_loss=row_loss[r0:r1].data_ptr() if stats else 0, row_loss_numel=b if stats else 0,
            g_row=g_row[r0:r1].data_ptr() if grad else 0, g_row_numel=g_row[r0:r1].numel() if grad else 0,
            lse_col=lse_col.data_ptr() if with_col else 0, g_col=g_col.data_ptr() if with_col else 0,
            col_numel=min(lse_col.numel(), g_col.numel()) if with_col else 0,
            write_grad=grad, nthreads=nt)

    row_sweep(qs, keys, kernel, d_rows=dq if grad else None, d_keys=dk, key_cols=dk_rows)
    lse_c = col_loss = None
    if col_stats:
        lse_c, col_loss = col_lse_and_loss(col_max, col_sum, pos)
    return (row_loss, col_loss), lse_c, dq, dk, torch.tensor(gs[0], dtype=torch.float64)


def forward(query, key, negatives, scale, symmetric, normalize, reduction, precompute, need):
    q, keys, q_norm, k_norm = inputs(query, key, negatives, normalize)
    s = float(scale)
    qs = q * s
    n = query.shape[0]
    acc = q.dtype
    lse_row = torch.empty(n, dtype=acc)
    lse_col = None
    dk_rows = key_rows(n, keys.shape[0], need)
    if not symmetric and precompute:  # one pass: statistics and gradient together
        g_row = row_weights(reduction, n, False, None, acc, q.device)
        losses, _, dq, dk, gs = _sweep(qs, keys, n, stats=True, col_stats=False, grad=True, lse_row=lse_row,
                                       lse_col=None, g_row=g_row, g_col=None, need_dq=need[0], dk_rows=dk_rows)
    else:
        losses, lse_col, _, _, _ = _sweep(qs, keys, n, stats=True, col_stats=symmetric, grad=False,
                                          lse_row=lse_row, lse_col=None, g_row=None, g_col=None,
                                          need_dq=False, dk_rows=None)
        if precompute:
            g = row_weights(reduction, n, True, None, acc, q.device)
            _, _, dq, dk, gs = _sweep(qs, keys, n, stats=False, col_stats=False, grad=True, lse_row=lse_row,
                                      lse_col=lse_col, g_row=g, g_col=g, need_dq=need[0], dk_rows=dk_rows)
    loss = reduce(losses, symmetric, reduction, query.dtype)
    if precompute:
        grads = finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need)
    else:
        grads = empty_grads(query, key, scale)
    lse_col_out = lse_col if symmetric else lse_row.new_empty(0)
    return (loss, lse_row, lse_col_out) + grads


def backward(grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize, reduction, need):
    q, keys, q_norm, k_norm = inputs(query, key, negatives, normalize)
    s = float(scale)
    n = query.shape[0]
    g = row_weights(reduction, n, symmetric, grad, q.dtype, q.device)
    _, _, dq, dk, gs = _sweep(q * s, keys, n, stats=False, col_stats=False, grad=True,
                              lse_row=lse_row.contiguous(), lse_col=lse_col.contiguous() if symmetric else None,
                              g_row=g, g_col=g if symmetric else None,
                              need_dq=need[0], dk_rows=key_rows(n, keys.shape[0], need))
    return finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need)
