"""CUDA C++ backend of the labelled-row op (csrc/cuda/labeled.cu through _C_cuda)."""
from __future__ import annotations

import functools

import torch

from ... import _ext
from .._common import cdiv, ptr_args, cuda_call, cuda_tile
from . import _gpu


class Launch:
    """The labelled-row kernels on one (Q, K, labels) problem: fixed square tiles."""

    def __init__(self, q_op, k_op, y, yk, s, col0, pairwise):
        self.q = q_op
        n, d = q_op.shape
        self.n = n
        self.common = dict(dtype=_ext.CUDA_DTYPE_CODE[q_op.dtype], **ptr_args(Q=q_op, K=k_op, yq=y, yk=yk), N=n,
                           C=k_op.shape[0], D=d, ldq=q_op.stride(0), ldk=k_op.stride(0), scale=s,
                           self=col0 is not None, self_col0=col0 or 0, pairwise=pairwise)

    def forward(self, ext, ext_positive, row_loss, stat_a, stat_b):
        cuda_call("labeled_fwd", self.q.device, **self.common,
                  **ptr_args(ext=ext if ext is not None else row_loss, loss=row_loss, stat_a=stat_a, stat_b=stat_b),
                  has_ext=ext is not None, ext_pos=ext_positive)

    def backward(self, dk, g, stat_a, stat_b, out):
        """G K into out (dk False; returns the per-block sums of G S) or G^T Q (dk True)."""
        parts = None if dk else torch.empty(cdiv(self.n, cuda_tile()), dtype=torch.float32, device=self.q.device)
        cuda_call("labeled_bwd", self.q.device, **self.common, dk=dk, ldo=out.stride(0),
                  **ptr_args(g=g, stat_a=stat_a, stat_b=stat_b, out=out, part=parts if parts is not None else g))
        return parts


run = functools.partial(_gpu.run, Launch)
