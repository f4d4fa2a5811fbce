"""CUDA C++ backend of the contrastive op (csrc/cuda/contrastive.cu through _C_cuda):
the Triton kernels' contract, 64 x 64 tiles, fp16/bf16 on tensor cores, fp32 exact on
CUDA cores."""
from __future__ import annotations

import functools

import torch

from ... import _ext
from .._common import cdiv, ptr_args, cuda_call, cuda_tile
from . import _gpu

PRECOMPUTES = _gpu.PRECOMPUTES


def launch_fwd(q_op, k_op, lse, pos, row_loss, col_max, col_sum, s, symmetric):
    n, d = q_op.shape
    c = k_op.shape[0]
    lock = torch.zeros(cdiv(c, cuda_tile()), dtype=torch.int32, device=q_op.device)
    cuda_call("contrastive_fwd", q_op.device, dtype=_ext.CUDA_DTYPE_CODE[q_op.dtype],
              **ptr_args(Q=q_op, K=k_op, lse=lse, pos=pos, row_loss=row_loss, col_max=col_max, col_sum=col_sum,
                          lock=lock),
              N=n, C=c, D=d, ldq=q_op.stride(0), ldk=k_op.stride(0), scale=s, symmetric=symmetric)


def launch_bwd(q_op, k_op, lse_row, g, lse_c, s, symmetric, want_dq, rows):
    n, d = q_op.shape
    c = k_op.shape[0]
    dev = q_op.device
    dq = parts = dk = None
    common = dict(dtype=_ext.CUDA_DTYPE_CODE[q_op.dtype], N=n, C=c, D=d, ldq=q_op.stride(0), ldk=k_op.stride(0),
                  scale=s, symmetric=symmetric)
    if want_dq:
        dq = torch.empty(n, d, dtype=torch.float32, device=dev)
        parts = torch.empty(cdiv(n, cuda_tile()), dtype=torch.float32, device=dev)
        cuda_call("contrastive_bwd", dev, dk=False, col0=0, col1=0, ldo=dq.stride(0), **common,
                  **ptr_args(Q=q_op, K=k_op, lse=lse_row, g_row=g, lse_col=lse_c, g_col=g, out=dq, ds_part=parts))
    if rows is not None:
        c0, c1 = rows
        dk = torch.empty(c1 - c0, d, dtype=torch.float32, device=dev)
        cuda_call("contrastive_bwd", dev, dk=True, col0=c0, col1=c1, ldo=dk.stride(0), **common,
                  **ptr_args(Q=q_op, K=k_op, lse=lse_row, g_row=g, lse_col=lse_c, g_col=g, out=dk,
                              ds_part=lse_row))
    return dq, parts, dk


forward = functools.partial(_gpu.forward, launch_fwd)
backward = functools.partial(_gpu.backward, launch_bwd)
