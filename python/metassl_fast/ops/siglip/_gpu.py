"""The host side shared by the two GPU backends of the SigLIP op (triton.py, cuda.py).
A backend module supplies a Launch class: Launch(q_op, k_op, s, b, diag_offset) with
forward(row_loss) and backward(dk, w, out) -> per-block (sum dL/dx S, sum dL/dx)."""
from __future__ import annotations

import torch

from .._common import gpu_operand, operand_scale


def run(Launch, query, key, scale, bias, diag_offset, grad_out, with_grad, need):
    _, _, q_op = gpu_operand(query, False)
    _, _, k_op = gpu_operand(key, False)
    n, d = q_op.shape
    c = k_op.shape[0]
    dev, f32 = q_op.device, torch.float32
    s = float(scale)
    launch = Launch(q_op, k_op, s, float(bias), diag_offset)
    row_loss = torch.empty(n, dtype=f32, device=dev)
    launch.forward(row_loss)
    loss = (row_loss.double().sum() / n).to(query.dtype)
    if not with_grad:
        return loss, None
    need_dq, need_dk, need_ds, need_db = need
    w = (1.0 if grad_out is None else float(grad_out)) / n
    gscale = operand_scale(q_op.dtype, w)  # |dL/dx| <= |w|; exact: see operand_scale
    dq = torch.empty(n, d, dtype=f32, device=dev)
    parts = launch.backward(False, w * gscale, dq)
    dq = dq / gscale if gscale != 1.0 else dq
    out_k = key.new_empty(0)
    if need_dk:
        dk = torch.empty(c, d, dtype=f32, device=dev)
        launch.backward(True, w * gscale, dk)
        out_k = (s / gscale * dk).to(key.dtype)
    tot = parts.double().sum(0) / gscale
    return loss, ((s * dq).to(query.dtype) if need_dq else query.new_empty(0), out_k,
                  tot[0].to(scale.dtype) if need_ds else scale.new_empty(0),
                  tot[1].to(bias.dtype) if need_db else bias.new_empty(0))
