"""Triton backend of the labelled-row op (kernels/labeled.py)."""
from __future__ import annotations

import functools

import torch

from .._common import cdiv, precision, triton_config
from . import _gpu


class Launch:
    """The labelled-row kernels on one (Q, K, labels) problem."""

    def __init__(self, q_op, k_op, y, yk, s, col0, pairwise):
        self.q, self.k, self.y, self.yk, self.s, self.col0 = q_op, k_op, y, yk, s, col0
        self.n, self.d = q_op.shape
        self.c = k_op.shape[0]
        self.t = triton_config(self.d, q_op.dtype, rows=max(self.n, self.c))
        self.meta = dict(SELF=col0 is not None, PAIRWISE=pairwise, PRECISION=precision(q_op.dtype))

    def forward(self, ext, ext_positive, row_loss, stat_a, stat_b):
        from ...kernels import labeled as tk

        tk.labeled_fwd_kernel[(cdiv(self.n, self.t.block_m),)](
            self.q, self.k, self.y, self.yk, ext if ext is not None else row_loss, row_loss, stat_a, stat_b, self.n,
            self.c, self.d, self.q.stride(0), self.k.stride(0), self.s, self.col0 or 0, HAS_EXT=ext is not None,
            EXT_POS=ext_positive, **self.meta, **self.t.meta(backward=False))

    def backward(self, dk, g, stat_a, stat_b, out):
        """G K into out (dk False; returns the per-block sums of G S) or G^T Q (dk True)."""
        from ...kernels import labeled as tk

        args = (self.q, self.k, self.y, self.yk, g, stat_a, stat_b, out)
        tail = (self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), out.stride(0), self.s, self.col0 or 0)
        meta = dict(self.meta, **self.t.meta(backward=True))
        chunks = cdiv(self.d, self.t.block_do)  # grid axis 1: BLOCK_DO columns of the output each
        if dk:
            tk.labeled_bwd_dk_kernel[(cdiv(self.c, self.t.block_n), chunks)](*args, *tail, **meta)
            return None
        grid = cdiv(self.n, self.t.block_m)
        parts = torch.empty(grid, dtype=torch.float32, device=self.q.device)
        tk.labeled_bwd_dq_kernel[(grid, chunks)](*args, parts, *tail, **meta)
        return parts


run = functools.partial(_gpu.run, Launch)
