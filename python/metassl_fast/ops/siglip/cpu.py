"""CPU backend of the SigLIP op: the row-block sweep of ops/_common.py with
csrc/cpu/siglip.cpp on each block (loss, dL/dx in place, and the sums that give the
scale and bias gradients)."""
from __future__ import annotations

import torch

from ... import _ext
from .._common import acc_dtype, grad_or_empty, nthreads, row_sweep, tensor_or_empty


def run(query, key, scale, bias, diag_offset, grad_out, with_grad, need):
    """Loss and, with_grad, (dq, dk, dscale, dbias) for upstream gradient grad_out (None = 1)."""
    C_ext = _ext.require("_C")
    acc = acc_dtype(query.dtype)
    q, k = query.to(acc), key.to(acc)
    n = q.shape[0]
    s, b = float(scale), float(bias)
    w = 1.0 / n * (1.0 if grad_out is None else float(grad_out))
    code, nt = _ext.DTYPE_CODE[acc], nthreads()
    tot = [0.0, 0.0, 0.0]

    def kernel(S, r0, r1):
        res = C_ext.block_sigmoid(dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, C=S.shape[1],
                                  ld=S.stride(0), row0=diag_offset + r0, scale=s, bias=b, weight=w,
                                  write_grad=with_grad, nthreads=nt)
        for i in range(3):
            tot[i] += res[i]

    need_dq, need_dk, need_ds, need_db = need
    dq = torch.empty_like(q) if with_grad and need_dq else None
    dk = torch.zeros_like(k) if with_grad and need_dk else None
    row_sweep(q, k, kernel, d_rows=dq, d_keys=dk, row_alpha=s, key_alpha=s)
    loss = torch.tensor(tot[0], dtype=torch.float64).to(query.dtype)  # the loss itself only when w = 1/N
    if not with_grad:
        return loss, None
    return loss, (grad_or_empty(dq, query, need_dq), grad_or_empty(dk, key, need_dk),
                  tensor_or_empty(tot[1], scale, need_ds), tensor_or_empty(tot[2], bias, need_db))
