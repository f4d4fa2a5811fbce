"""Triton backend of the SigLIP op (kernels/siglip.py)."""
from __future__ import annotations

import functools

import torch

from .._common import cdiv, precision, triton_config
from . import _gpu


class Launch:
    """The SigLIP kernels on one (Q, K) problem."""

    def __init__(self, q_op, k_op, s, b, diag_offset):
        self.q, self.k = q_op, k_op
        self.n, self.d = q_op.shape
        self.c = k_op.shape[0]
        self.t = triton_config(self.d, q_op.dtype, rows=max(self.n, self.c))
        self.precision = precision(q_op.dtype)
        self.sbd = (s, b, diag_offset)

    def forward(self, row_loss):
        from ...kernels import siglip as tk

        tk.siglip_fwd_kernel[(cdiv(self.n, self.t.block_m),)](
            self.q, self.k, row_loss, self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), *self.sbd,
            PRECISION=self.precision, **self.t.meta(backward=False))

    def backward(self, dk, w, out):
        """(dL/dx) K into out (dk False; returns the per-block (sum dL/dx S, sum dL/dx)) or (dL/dx)^T Q."""
        from ...kernels import siglip as tk

        common = (self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), out.stride(0), *self.sbd, w)
        meta = dict(PRECISION=self.precision, **self.t.meta(backward=True))
        chunks = cdiv(self.d, self.t.block_do)  # grid axis 1: BLOCK_DO columns of the output each
        if dk:
            tk.siglip_bwd_dk_kernel[(cdiv(self.c, self.t.block_n), chunks)](self.q, self.k, out, *common, **meta)
            return None
        grid = cdiv(self.n, self.t.block_m)
        parts = torch.empty(grid, 2, dtype=torch.float32, device=self.q.device)
        tk.siglip_bwd_dq_kernel[(grid, chunks)](self.q, self.k, out, parts, *common, **meta)
        return parts


run = functools.partial(_gpu.run, Launch)
