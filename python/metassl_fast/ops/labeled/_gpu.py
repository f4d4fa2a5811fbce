"""The host side shared by the two GPU backends of the labelled-row op (triton.py,
cuda.py): the forward kernel stores per-row statistics; the gradient (during the
forward for a scalar loss, as on the CPU, or in backward) recomputes S in a row-outer
(dQ) and a column-outer (dK) kernel.  A backend module supplies a Launch class:
Launch(q_op, k_op, y, yk, s, col0, pairwise) with forward(ext, ext_positive, row_loss,
stat_a, stat_b) and backward(dk, g, stat_a, stat_b, out) -> per-block sums of G S."""
from __future__ import annotations

import torch

from .._common import gpu_operand, normalize_backward, operand_scale
from ._shared import checked_labels, own_col0, positives_per_row, reduce_rows, weights


def run(Launch, query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction,
        pairwise, grad_out, with_grad, need):
    q, q_norm, q_op = gpu_operand(query, normalize)
    self_mode = key is None
    k, k_norm, k_op = (q, q_norm, q_op) if self_mode else gpu_operand(key, normalize)
    col0 = own_col0(key, self_offset)
    n, d = q_op.shape
    c = k_op.shape[0]
    y, yk = checked_labels(labels, None if self_mode else key_labels, n, c)
    dev, f32 = q_op.device, torch.float32
    s = float(scale)
    ext = None if pos_logit is None else pos_logit.to(f32).contiguous()
    row_loss, stat_a, stat_b = (torch.empty(n, dtype=f32, device=dev) for _ in range(3))
    launch = Launch(q_op, k_op, y, yk, s, col0, pairwise)
    launch.forward(ext, ext_positive, row_loss, stat_a, stat_b)
    npos = positives_per_row(y, yk, col0) + (1 if ext is not None and ext_positive else 0)
    g, count = weights(reduction, pairwise, npos, grad_out, f32)
    loss = reduce_rows(row_loss, reduction, count, query.dtype)
    if not with_grad:
        return loss, None
    need_dq, need_dk, need_dpos, need_ds = need
    gscale = operand_scale(q_op.dtype, g)  # exact: see operand_scale
    gk = g * gscale if gscale != 1.0 else g
    dq = torch.empty(n, d, dtype=f32, device=dev)
    parts = launch.backward(False, gk, stat_a, stat_b, dq) / gscale
    dq = dq / gscale if gscale != 1.0 else dq
    dk = None
    if self_mode or need_dk:
        dk = torch.empty(c, d, dtype=f32, device=dev)
        launch.backward(True, gk, stat_a, stat_b, dk)
        dk = dk / gscale if gscale != 1.0 else dk
    out_q = query.new_empty(0)
    if need_dq:
        out_q = normalize_backward(s * (dq + dk) if self_mode else s * dq, q, q_norm).to(query.dtype)
    out_k = query.new_empty(0) if self_mode else key.new_empty(0)
    if need_dk and not self_mode:
        out_k = normalize_backward(s * dk, k, k_norm).to(key.dtype)
    out_p = query.new_empty(0)
    if need_dpos and ext is not None:
        p_ext = torch.exp(ext - stat_a)
        if ext_positive:
            p_ext = p_ext - 1.0 / npos.to(f32)
        # rows without positives have no loss and no gradient
        out_p = torch.where(npos > 0, g * p_ext, torch.zeros_like(p_ext)).to(pos_logit.dtype)
    out_s = (parts.double().sum() / s).to(scale.dtype) if need_ds else scale.new_empty(0)
    return loss, (out_q, out_k, out_p, out_s)
