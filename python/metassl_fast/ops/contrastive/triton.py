"""Triton backend of the contrastive op (kernels/contrastive.py): a forward kernel of
the row (and column) LSE, a row-outer dQ and a column-outer dK kernel."""
from __future__ import annotations

import functools

import torch

from .._common import cdiv, precision, triton_config
from . import _gpu

PRECOMPUTES = _gpu.PRECOMPUTES


def launch_fwd(q_op, k_op, lse, pos, row_loss, col_max, col_sum, s, symmetric):
    from ...kernels import contrastive as tk

    n, d = q_op.shape
    c = k_op.shape[0]
    t = triton_config(d, q_op.dtype, rows=max(n, c))
    lock = torch.zeros(cdiv(c, t.block_n), dtype=torch.int32, device=q_op.device)
    tk.contrastive_fwd_kernel[(cdiv(n, t.block_m),)](
        q_op, k_op, lse, pos, row_loss, col_max, col_sum, lock, n, c, d, q_op.stride(0), k_op.stride(0),
        s, SYMMETRIC=symmetric, PRECISION=precision(q_op.dtype), **t.meta(backward=False))


def launch_bwd(q_op, k_op, lse_row, g, lse_c, s, symmetric, want_dq, rows):
    """-> (G K (N, D) and the per-program sums of G S, or Nones; G^T Q for key rows
    [c0, c1) or None), float32."""
    from ...kernels import contrastive as tk

    n, d = q_op.shape
    c = k_op.shape[0]
    t = triton_config(d, q_op.dtype, rows=max(n, c))
    meta = dict(SYMMETRIC=symmetric, PRECISION=precision(q_op.dtype), **t.meta(backward=True))
    chunks = cdiv(d, t.block_do)  # grid axis 1: one program per BLOCK_DO columns of the output
    dq = parts = dk = None
    if want_dq:
        dq = torch.empty(n, d, dtype=torch.float32, device=q_op.device)
        grid = cdiv(n, t.block_m)
        parts = torch.empty(grid, dtype=torch.float32, device=q_op.device)
        tk.contrastive_bwd_dq_kernel[(grid, chunks)](
            q_op, k_op, lse_row, g, lse_c, g, dq, parts, n, c, d, q_op.stride(0), k_op.stride(0),
            dq.stride(0), s, **meta)
    if rows is not None:
        c0, c1 = rows
        dk = torch.empty(c1 - c0, d, dtype=torch.float32, device=q_op.device)
        tk.contrastive_bwd_dk_kernel[(cdiv(c1 - c0, t.block_n), chunks)](
            q_op, k_op, lse_row, g, lse_c, g, dk, n, c, d, c0, c1, q_op.stride(0), k_op.stride(0),
            dk.stride(0), s, **meta)
    return dq, parts, dk


forward = functools.partial(_gpu.forward, launch_fwd)
backward = functools.partial(_gpu.backward, launch_bwd)
