"""CPU backend of the labelled-row op: the row-block sweep of ops/_common.py with
csrc/cpu/labeled.cpp on each block.  With the key tower equal to the query tower
(NT-Xent, SupCon: key=None) dZ = s (G Z + G^T Z) lands in one buffer."""
from __future__ import annotations

import torch

from ... import _ext
from .._common import nthreads, normalize_backward, operands, row_sweep, tensor_or_empty
from ._shared import checked_labels, own_col0, positives_per_row, reduce_rows, weights


def run(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction,
        pairwise, grad_out, with_grad, need):
    """Loss (reduced) and, with_grad, (dq, dk, dpos, ds) for upstream gradient grad_out (None = 1)."""
    C_ext = _ext.require("_C")
    q, q_norm = operands(query, normalize)
    self_mode = key is None
    k, k_norm = (q, q_norm) if self_mode else operands(key, normalize)
    y, yk = checked_labels(labels, None if self_mode else key_labels, q.shape[0], k.shape[0])
    col0 = own_col0(key, self_offset)
    need_dq, need_dk, need_dpos, need_ds = need
    s = float(scale)
    n = q.shape[0]
    npos = positives_per_row(y, yk, col0)
    ext = dext = None
    if pos_logit is not None:  # one more logit per row, outside S
        npos = npos + (1 if ext_positive else 0)
        ext = pos_logit.to(q.dtype).contiguous()
        dext = torch.zeros(n, dtype=q.dtype)
    g, count = weights(reduction, pairwise, npos, grad_out, q.dtype)
    row_loss = torch.empty(n, dtype=q.dtype)
    code, nt = _ext.DTYPE_CODE[q.dtype], nthreads()
    gs = [0.0]

    def kernel(S, r0, r1):
        b = r1 - r0
        gs[0] += C_ext.block_rows_labeled(
            dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=b, C=S.shape[1], ld=S.stride(0),
            row0=r0 + (col0 or 0), exclude_self=col0 is not None, pairwise=pairwise, y_row=y[r0:r1].data_ptr(),
            y_row_numel=b, y_col=yk.data_ptr(), y_col_numel=yk.numel(),
            row_loss=row_loss[r0:r1].data_ptr(), row_loss_numel=b, g_row=g[r0:r1].data_ptr(), g_row_numel=b,
            ext=0 if ext is None else ext[r0:r1].data_ptr(), ext_numel=0 if ext is None else b,
            dext=0 if dext is None else dext[r0:r1].data_ptr(), dext_numel=0 if dext is None else b,
            ext_positive=ext_positive, write_grad=with_grad, nthreads=nt)

    d_rows = d_keys = None
    if with_grad and (need_dq or (self_mode and need_dk)):
        d_rows = torch.zeros_like(q) if self_mode else torch.empty_like(q)
    if with_grad:
        d_keys = d_rows if self_mode else (torch.zeros_like(k) if need_dk else None)
    row_sweep(q * s, k, kernel, d_rows=d_rows, d_keys=d_keys, row_alpha=s)
    loss = reduce_rows(row_loss, reduction, count, query.dtype)
    if not with_grad:
        return loss, None
    out_q = normalize_backward(d_rows, q, q_norm).to(query.dtype) if need_dq else query.new_empty(0)
    out_k = query.new_empty(0) if self_mode else key.new_empty(0)
    if need_dk and not self_mode:
        out_k = normalize_backward(d_keys, k, k_norm).to(key.dtype)
    out_p = dext.to(pos_logit.dtype) if (need_dpos and pos_logit is not None) else query.new_empty(0)
    return loss, (out_q, out_k, out_p, tensor_or_empty(gs[0] / s, scale, need_ds))
