"""The host side shared by the two GPU backends of the contrastive op (triton.py,
cuda.py): the same buffers, the same kernel contract.  The forward saves only the
row (and column) LSE; the backward recomputes S tiles for G K (with the per-program
sums of G S) and for G^T Q.  A backend module supplies launch_fwd and launch_bwd.
Under torch.use_deterministic_algorithms(True) the symmetric forward takes the column
LSE from a second one-sided pass instead of the lock-merged column partials."""
from __future__ import annotations

import math

import torch

from .._common import gpu_operand, operand_scale
from ._shared import col_lse_and_loss, empty_grads, finish_grads, key_rows, reduce, row_weights

PRECOMPUTES = False  # never: the backward recomputes S on the GPU


def operands(query, key, negatives, normalize):
    """(q, keys, q_norm, k_norm) in float32 for finish_grads, and the kernel operands
    q_op, k_op (k = [key; negatives]) in the input dtype."""
    q, q_norm, q_op = gpu_operand(query, normalize)
    keys_in = key if negatives is None else torch.cat([key, negatives.to(key.dtype)])
    keys, k_norm, k_op = gpu_operand(keys_in, normalize)
    return q, keys, q_norm, k_norm, q_op, k_op


def forward(launch_fwd, query, key, negatives, scale, symmetric, normalize, reduction, precompute, need):
    _, _, _, _, q_op, k_op = operands(query, key, negatives, normalize)
    n = q_op.shape[0]
    f32, dev = torch.float32, q_op.device
    lse, pos, row_loss = (torch.empty(n, dtype=f32, device=dev) for _ in range(3))
    col_max = torch.full((n,), -math.inf, dtype=f32, device=dev)
    col_sum = torch.zeros(n, dtype=f32, device=dev)
    if symmetric and torch.are_deterministic_algorithms_enabled():
        # the symmetric kernel merges column partials in whatever order programs take its
        # locks; deterministic instead: the column LSE is the row LSE of S^T, a one-sided
        # pass over (keys, queries) in a fixed order (one more N x N x D product)
        launch_fwd(q_op, k_op, lse, pos, row_loss, col_max, col_sum, float(scale), False)
        lse_col, col_pos, col_loss = (torch.empty(n, dtype=f32, device=dev) for _ in range(3))
        launch_fwd(k_op[:n], q_op, lse_col, col_pos, col_loss, col_max, col_sum, float(scale), False)
    else:
        launch_fwd(q_op, k_op, lse, pos, row_loss, col_max, col_sum, float(scale), symmetric)
        lse_col, col_loss = col_lse_and_loss(col_max, col_sum, pos) if symmetric else (lse.new_empty(0), None)
    loss = reduce((row_loss, col_loss), symmetric, reduction, query.dtype)
    return (loss, lse, lse_col) + empty_grads(query, key, scale)


def backward(launch_bwd, grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize, reduction,
             need):
    q, keys, q_norm, k_norm, q_op, k_op = operands(query, key, negatives, normalize)
    n, c = q_op.shape[0], k_op.shape[0]
    s = float(scale)
    g = row_weights(reduction, n, symmetric, grad, torch.float32, q_op.device)
    # |G| <= 2 max|g| (row and column terms): G goes into the products in q_op's dtype
    gscale = operand_scale(q_op.dtype, g)
    lse_row = lse_row.float().contiguous()
    lse_c = lse_col.float().contiguous() if symmetric else lse_row  # any length-N buffer
    gs = None
    dq, parts, dk = launch_bwd(q_op, k_op, lse_row, g * gscale if gscale != 1.0 else g, lse_c, s, symmetric,
                               need[0] or need[3], key_rows(n, c, need))
    if parts is not None:
        gs = parts.double().sum() / gscale
    if dk is not None:
        dk = (dk * (s / gscale)).to(keys.dtype)
    if dq is not None:
        dq = (dq / gscale if gscale != 1.0 else dq).to(q.dtype)
    return finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need)
