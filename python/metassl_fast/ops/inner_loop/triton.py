"""Triton backend of the inner-loop op (kernels/inner_loop.py): one program per task,
float32 inside (float64 inputs are rounded), results in the input dtype."""
from __future__ import annotations

import torch

from .._common import check_int32_offsets
from ._shared import check_adapt_bwd, check_adapt_fwd, check_anil_shapes, f32


def _block(n):
    return max(16, 1 << (max(1, n) - 1).bit_length())


def _offsets(S, Q, C, D, steps):
    """Within a task the kernels offset in 32 bits (the task's base is 64-bit)."""
    check_int32_offsets("backend='triton'", ("support or query rows x D", max(S, Q) * D),
                        ("(steps + 1) x C x D", (steps + 1) * C * D))


def _blocks(S, Q, C):
    """(BLOCK_S, BLOCK_Q, BLOCK_C, BLOCK_D) and the launch options: powers of two, at least
    16 (tl.dot's smallest tile).  The (S x C) matrices of the reverse pass live in
    registers, so the warps grow with max(BLOCK_S, BLOCK_Q) x BLOCK_C; D streams in 16-wide chunks with
    one stage (no prefetch buffers): bench/aot/ shows every block size up to the caps
    within 78 KB of shared memory on sm_80 and sm_90, and where spills remain (the
    reverse pass with 64- or 128-row blocks: 0.3-2.7 KB per thread)."""
    bs, bq, bc = _block(S), _block(Q), _block(C)
    cells = max(bs, bq) * bc  # the support's and the query's (rows x C) blocks
    warps = 4 if cells <= 1024 else 8 if cells <= 4096 else 16
    return bs, bq, bc, 16, dict(num_warps=warps, num_stages=1)


def adapt_forward(support, labels, weight, bias, lr_w, lr_b, steps):
    from ...kernels import inner_loop as tk

    check_adapt_fwd(support, labels, weight, bias, lr_w, lr_b)
    X, W, b, aW, ab = f32(support, weight, bias, lr_w, lr_b)
    T, S, D = X.shape
    C = W.shape[0]
    _offsets(S, 1, C, D, steps)
    traj = torch.empty(T, steps + 1, C, D, dtype=torch.float32, device=X.device)
    btraj = torch.empty(T, steps + 1, C, dtype=torch.float32, device=X.device)
    bs, _, bc, bd, launch = _blocks(S, 1, C)
    tk.adapt_fwd_kernel[(T,)](X, labels.contiguous(), W, b, aW, ab, traj, btraj, S, D, C, steps, PRECISION="ieee",
                              BLOCK_S=bs, BLOCK_C=bc, BLOCK_D=bd, **launch)
    dt = support.dtype
    return traj[:, steps].to(dt, copy=True), btraj[:, steps].to(dt, copy=True), traj.to(dt), btraj.to(dt)


def adapt_backward(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order):
    from ...kernels import inner_loop as tk

    T, S, D, C, steps = check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj)
    X, aW, ab, Wt, bt, dWK, dbK = f32(support, lr_w, lr_b, W_traj, b_traj, dW_K, db_K)
    _offsets(S, 1, C, D, steps)
    new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=X.device)  # noqa: E731
    dX, dW0, db0, daW, dab = torch.empty_like(X), new(T, C, D), new(T, C), new(T, C, D), new(T, C)
    bs, _, bc, bd, launch = _blocks(S, 1, C)
    tk.adapt_bwd_kernel[(T,)](X, labels.contiguous(), aW, ab, Wt, bt, dWK, dbK, dX, dW0, db0, daW, dab, S, D, C, steps,
                              FIRST_ORDER=first_order, PRECISION="ieee", BLOCK_S=bs, BLOCK_C=bc, BLOCK_D=bd, **launch)
    dt = support.dtype
    return dX.to(dt), dW0.sum(0).to(dt), db0.sum(0).to(dt), daW.sum(0).to(dt), dab.sum(0).to(dt)


def anil(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps, first_order,
         compute_grad, need_dlr=True, correct=None):
    """-> (loss (T,), None or (dX, dXq, dW, db, d lr_w, d lr_b)); the kernel always forms
    the step sizes' gradients (need_dlr is the CPU kernel's shortcut).  correct (T,) or
    None: gets each task's number of correctly classified queries."""
    from ...kernels import inner_loop as tk

    check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight)
    dtype = support.dtype
    X, Xq, W, b, aW, ab = f32(support, query, weight, bias, lr_w, lr_b)
    y, yq = labels.contiguous(), query_labels.contiguous()
    T, S, D = X.shape
    Q, C = Xq.shape[1], W.shape[0]
    _offsets(S, Q, C, D, steps)
    new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=X.device)  # noqa: E731
    loss, hits = new(T), new(T)
    traj, btraj = new(T, steps + 1, C, D), new(T, steps + 1, C)
    if compute_grad:
        tw = f32(task_weight)[0]
        dX, dXq = torch.empty_like(X), torch.empty_like(Xq)
        dW0, daW, db0, dab = new(T, C, D), new(T, C, D), new(T, C), new(T, C)
    else:
        tw = dX = dXq = dW0 = daW = db0 = dab = loss  # not touched without COMPUTE_GRAD
    bs, bq, bc, bd, launch = _blocks(S, Q, C)
    tk.anil_kernel[(T,)](X, y, Xq, yq, W, b, aW, ab, tw, loss, hits, traj, btraj, dX, dXq, dW0, db0, daW, dab,
                         S, Q, D, C, steps, COMPUTE_GRAD=compute_grad, FIRST_ORDER=first_order,
                         PRECISION="ieee", BLOCK_S=bs, BLOCK_Q=bq, BLOCK_C=bc, BLOCK_D=bd, **launch)
    loss = loss.to(dtype)
    if correct is not None:
        correct.copy_(hits)
    if not compute_grad:
        return loss, None
    return loss, (dX.to(dtype), dXq.to(dtype), dW0.sum(0).to(dtype), db0.sum(0).to(dtype),
                  daW.sum(0).to(dtype), dab.sum(0).to(dtype))
