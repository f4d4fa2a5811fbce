"""CUDA C++ backend of the SigLIP op (csrc/cuda/siglip.cu through _C_cuda)."""
from __future__ import annotations

import functools

import torch

from ... import _ext
from .._common import cdiv, ptr_args, cuda_call, cuda_tile
from . import _gpu


class Launch:
    """The SigLIP kernels on one (Q, K) problem: fixed square tiles."""

    def __init__(self, q_op, k_op, s, b, diag_offset):
        self.q = q_op
        self.n, d = q_op.shape
        self.common = dict(dtype=_ext.CUDA_DTYPE_CODE[q_op.dtype], **ptr_args(Q=q_op, K=k_op), N=self.n,
                           C=k_op.shape[0], D=d, ldq=q_op.stride(0), ldk=k_op.stride(0), logit_scale=s, bias=b,
                           diag_col0=diag_offset)

    def forward(self, row_loss):
        cuda_call("siglip_fwd", self.q.device, **self.common, **ptr_args(loss=row_loss))

    def backward(self, dk, w, out):
        """(dL/dx) K into out (dk False; returns the per-block (sum dL/dx S, sum dL/dx)) or (dL/dx)^T Q."""
        parts = None if dk else torch.empty(cdiv(self.n, cuda_tile()), 2, dtype=torch.float32, device=self.q.device)
        cuda_call("siglip_bwd", self.q.device, **self.common, dk=dk, w=w, ldo=out.stride(0),
                  **ptr_args(out=out, part=parts if parts is not None else out))
        return parts


run = functools.partial(_gpu.run, Launch)
