"""Triton kernel of the fused ANIL meta-loss: the inner loop of a linear head, the query
cross-entropy and (optionally) the exact second- or first-order reverse pass, one
program per task.  The math is csrc/cpu/inner_loop.h's:

    forward, k < K:  Z = X W_k^T + b_k,  P = softmax(Z),  R = (P - onehot(y)) / S
                     W_{k+1} = W_k - aW * R^T X,  b_{k+1} = b_k - ab * colsum(R)
    query:           loss = mean_q CE(Xq W_K^T + b_K, yq);  dZq = w (Pq - onehot(yq)) / Q
                     dXq = dZq W_K,  Lambda = dZq^T Xq,  lambda = colsum(dZq)
    reverse, k = K-1 .. 0:
                     daW -= Lambda * R^T X,  dab -= lambda * colsum(R)
                     (second order) V = aW * Lambda, v = ab * lambda,  U = X V^T + v,
                     M = P * (U - rowsum(P * U)),  dX -= R V + M W_k / S,
                     Lambda -= M^T X / S,  lambda -= colsum(M) / S
                     dW0 = Lambda, db0 = lambda

The small (S x C) matrices live in registers (BLOCK_S x BLOCK_C, padded rows and
classes masked); everything of width D is streamed in BLOCK_D chunks through global
memory (the task's support block stays in L1/L2).  The trajectory W_0 .. W_K is
written to a (T, K+1, C, D) buffer (b_k to (T, K+1, C)); dW0 doubles as Lambda's
storage.  anil_kernel is the whole meta-loss; adapt_fwd_kernel / adapt_bwd_kernel are
adapt_linear_head's forward (the trajectory) and backward (from dL/dW_K, dL/db_K).  Each
phase that reads what another thread of the program wrote is separated by a barrier.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _xwt(X, W, rows, row_ok, cls, cls_ok, D, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
         BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """X W^T over all of D: (BLOCK_S, BLOCK_C) fp32; X, W point at row-major (., D) blocks."""
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        x = tl.load(X + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cls[:, None] * D + d[None, :], mask=cls_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _softmax_rows(z, cls_ok, row_ok):
    z = tl.where(cls_ok[None, :], z, float("-inf"))
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])
    p = e / tl.sum(e, 1)[:, None]
    return tl.where(row_ok[:, None] & cls_ok[None, :], p, 0.0)


@triton.jit
def _forward_probs(X, Y, Wk, bk, rows, row_ok, cls, cls_ok, S, D, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """(P, R) of one inner step from W_k (global) and b_k (registers)."""
    z = _xwt(X, Wk, rows, row_ok, cls, cls_ok, D, BLOCK_S, BLOCK_C, BLOCK_D, PRECISION) + bk[None, :]
    p = _softmax_rows(z, cls_ok, row_ok)
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    onehot = tl.where(y[:, None] == cls[None, :], 1.0, 0.0)
    r = tl.where(row_ok[:, None] & cls_ok[None, :], (p - onehot) / S, 0.0)
    return p, r


@triton.jit
def _copy_cd(SRC, DST, cls, cls_ok, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """DST (C, D) = SRC (C, D) in float32."""
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        msk = cls_ok[:, None] & (d < D)[None, :]
        w = tl.load(SRC + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
        tl.store(DST + cls[:, None] * D + d[None, :], w.to(tl.float32), mask=msk)


@triton.jit
def _forward_steps(X, Y, W0, B0, AW, AB, TRAJ, BTRAJ, rows, row_ok, cls, cls_ok, S, D, C, K,
                   PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """W_0 .. W_K into TRAJ (K+1, C, D) and b_0 .. b_K into BTRAJ (K+1, C); returns b_K."""
    ab = tl.load(AB + cls, mask=cls_ok, other=0.0).to(tl.float32)
    b = tl.load(B0 + cls, mask=cls_ok, other=0.0).to(tl.float32)
    _copy_cd(W0, TRAJ, cls, cls_ok, D, BLOCK_C, BLOCK_D)
    tl.debug_barrier()
    for k in range(0, K):
        Wk = TRAJ + k * C * D
        tl.store(BTRAJ + k * C + cls, b, mask=cls_ok)
        p, r = _forward_probs(X, Y, Wk, b, rows, row_ok, cls, cls_ok, S, D, BLOCK_S, BLOCK_C, BLOCK_D, PRECISION)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            x = tl.load(X + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            gw = tl.dot(tl.trans(r), x.to(tl.float32), input_precision=PRECISION)
            msk = cls_ok[:, None] & d_ok[None, :]
            w = tl.load(Wk + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
            aw = tl.load(AW + cls[:, None] * D + d[None, :], mask=msk, other=0.0).to(tl.float32)
            tl.store(Wk + C * D + cls[:, None] * D + d[None, :], w - aw * gw, mask=msk)
        b = b - ab * tl.sum(r, 0)
        tl.debug_barrier()
    tl.store(BTRAJ + K * C + cls, b, mask=cls_ok)
    return b


@triton.jit
def _zero_grads(DX, DAW, rows, row_ok, cls, cls_ok, D, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr):
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        tl.store(DAW + cls[:, None] * D + d[None, :], tl.zeros([BLOCK_C, BLOCK_D], tl.float32),
                 mask=cls_ok[:, None] & d_ok[None, :])
        tl.store(DX + rows[:, None] * D + d[None, :], tl.zeros([BLOCK_S, BLOCK_D], tl.float32),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _reverse_steps(X, Y, AW, AB, TRAJ, BTRAJ, LAM, lam, DX, DAW, rows, row_ok, cls, cls_ok, S, D, C, K,
                   FIRST_ORDER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """The reverse pass over a stored trajectory.  LAM (C, D) holds dL/dW_K on entry and
    dL/dW_0 on exit (lam: dL/db_K in, dL/db_0 out); DX and DAW must hold zeros on entry.
    Returns (lam, dab)."""
    ab = tl.load(AB + cls, mask=cls_ok, other=0.0).to(tl.float32)
    dab = tl.zeros([BLOCK_C], tl.float32)
    for kk in range(0, K):
        k = K - 1 - kk
        bk = tl.load(BTRAJ + k * C + cls, mask=cls_ok, other=0.0)
        Wk = TRAJ + k * C * D
        p, r = _forward_probs(X, Y, Wk, bk, rows, row_ok, cls, cls_ok, S, D, BLOCK_S, BLOCK_C, BLOCK_D,
                              PRECISION)
        dab -= lam * tl.sum(r, 0)
        if not FIRST_ORDER:
            # U = X V^T + v with V = aW * Lambda (the current Lambda, before this step's update)
            u = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                msk = cls_ok[:, None] & d_ok[None, :]
                x = tl.load(X + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)
                aw = tl.load(AW + cls[:, None] * D + d[None, :], mask=msk, other=0.0).to(tl.float32)
                lm = tl.load(LAM + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
                u = tl.dot(x.to(tl.float32), tl.trans(aw * lm), u, input_precision=PRECISION)
            u += (ab * lam)[None, :]
            mm = p * (u - tl.sum(p * u, 1)[:, None])
            tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            msk = cls_ok[:, None] & d_ok[None, :]
            xmsk = row_ok[:, None] & d_ok[None, :]
            x = tl.load(X + rows[:, None] * D + d[None, :], mask=xmsk, other=0.0).to(tl.float32)
            lm = tl.load(LAM + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
            gw = tl.dot(tl.trans(r), x, input_precision=PRECISION)
            daw = tl.load(DAW + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
            tl.store(DAW + cls[:, None] * D + d[None, :], daw - lm * gw, mask=msk)
            if not FIRST_ORDER:
                aw = tl.load(AW + cls[:, None] * D + d[None, :], mask=msk, other=0.0).to(tl.float32)
                w = tl.load(Wk + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
                dx = tl.load(DX + rows[:, None] * D + d[None, :], mask=xmsk, other=0.0)
                dx -= tl.dot(r, aw * lm, input_precision=PRECISION) + tl.dot(mm, w, input_precision=PRECISION) / S
                tl.store(DX + rows[:, None] * D + d[None, :], dx, mask=xmsk)
                tl.store(LAM + cls[:, None] * D + d[None, :],
                         lm - tl.dot(tl.trans(mm), x, input_precision=PRECISION) / S, mask=msk)
        if not FIRST_ORDER:
            lam -= tl.sum(mm, 0) / S
        tl.debug_barrier()
    return lam, dab


@triton.jit
def anil_kernel(X, Y, XQ, YQ, W0, B0, AW, AB, TASK_W, LOSS, CORRECT, TRAJ, BTRAJ, DX, DXQ, DW0, DB0, DAW, DAB,
                S, Q, D, C, K, COMPUTE_GRAD: tl.constexpr, FIRST_ORDER: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole meta-loss of task t: inner loop, query loss, the number of queries whose
    first largest logit is their label (CORRECT) and, with COMPUTE_GRAD, the reverse pass
    (per-task dW0, db0, daW, dab; dX, dXq)."""
    t = tl.program_id(0).to(tl.int64)
    X = X + t * S * D
    Y = Y + t * S
    XQ = XQ + t * Q * D
    YQ = YQ + t * Q
    TRAJ = TRAJ + t * (K + 1) * C * D
    BTRAJ = BTRAJ + t * (K + 1) * C
    rows = tl.arange(0, BLOCK_S)
    row_ok = rows < S
    cls = tl.arange(0, BLOCK_C)
    cls_ok = cls < C
    b = _forward_steps(X, Y, W0, B0, AW, AB, TRAJ, BTRAJ, rows, row_ok, cls, cls_ok, S, D, C, K, PRECISION,
                       BLOCK_S, BLOCK_C, BLOCK_D)
    # ---- query loss
    WK = TRAJ + K * C * D
    qrows = tl.arange(0, BLOCK_Q)
    q_ok = qrows < Q
    zq = _xwt(XQ, WK, qrows, q_ok, cls, cls_ok, D, BLOCK_Q, BLOCK_C, BLOCK_D, PRECISION) + b[None, :]
    zq = tl.where(cls_ok[None, :], zq, float("-inf"))
    mq = tl.max(zq, 1)
    lse = mq + tl.log(tl.sum(tl.exp(zq - mq[:, None]), 1))
    yq = tl.load(YQ + qrows, mask=q_ok, other=-1)
    onehot_q = yq[:, None] == cls[None, :]
    zy = tl.sum(tl.where(onehot_q, zq, 0.0), 1)
    tl.store(LOSS + t, tl.sum(tl.where(q_ok, lse - zy, 0.0), 0) / Q)
    pred = tl.argmax(zq, 1, tie_break_left=True)
    tl.store(CORRECT + t, tl.sum(tl.where(q_ok & (pred == yq), 1.0, 0.0), 0))
    if COMPUTE_GRAD:
        wt = tl.load(TASK_W + t).to(tl.float32)
        pq = tl.where(q_ok[:, None] & cls_ok[None, :], tl.exp(zq - lse[:, None]), 0.0)
        dzq = tl.where(q_ok[:, None] & cls_ok[None, :], (pq - tl.where(onehot_q, 1.0, 0.0)) * (wt / Q), 0.0)
        DXQ = DXQ + t * Q * D
        LAM = DW0 + t * C * D
        DX = DX + t * S * D
        DAW = DAW + t * C * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            msk = cls_ok[:, None] & d_ok[None, :]
            w = tl.load(WK + cls[:, None] * D + d[None, :], mask=msk, other=0.0)
            tl.store(DXQ + qrows[:, None] * D + d[None, :], tl.dot(dzq, w, input_precision=PRECISION),
                     mask=q_ok[:, None] & d_ok[None, :])
            xq = tl.load(XQ + qrows[:, None] * D + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            tl.store(LAM + cls[:, None] * D + d[None, :],
                     tl.dot(tl.trans(dzq), xq.to(tl.float32), input_precision=PRECISION), mask=msk)
        _zero_grads(DX, DAW, rows, row_ok, cls, cls_ok, D, BLOCK_S, BLOCK_C, BLOCK_D)
        tl.debug_barrier()
        lam, dab = _reverse_steps(X, Y, AW, AB, TRAJ, BTRAJ, LAM, tl.sum(dzq, 0), DX, DAW, rows, row_ok, cls,
                                  cls_ok, S, D, C, K, FIRST_ORDER, PRECISION, BLOCK_S, BLOCK_C, BLOCK_D)
        tl.store(DB0 + t * C + cls, lam, mask=cls_ok)
        tl.store(DAB + t * C + cls, dab, mask=cls_ok)


@triton.jit
def adapt_fwd_kernel(X, Y, W0, B0, AW, AB, TRAJ, BTRAJ, S, D, C, K, PRECISION: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """adapt_linear_head's forward: the trajectory of task t (W_K, b_K are its last entries)."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_S)
    cls = tl.arange(0, BLOCK_C)
    _forward_steps(X + t * S * D, Y + t * S, W0, B0, AW, AB, TRAJ + t * (K + 1) * C * D, BTRAJ + t * (K + 1) * C,
                   rows, rows < S, cls, cls < C, S, D, C, K, PRECISION, BLOCK_S, BLOCK_C, BLOCK_D)


@triton.jit
def adapt_bwd_kernel(X, Y, AW, AB, TRAJ, BTRAJ, DWK, DBK, DX, DW0, DB0, DAW, DAB, S, D, C, K,
                     FIRST_ORDER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """adapt_linear_head's backward from dL/dW_K, dL/db_K of task t (per-task outputs)."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_S)
    row_ok = rows < S
    cls = tl.arange(0, BLOCK_C)
    cls_ok = cls < C
    LAM = DW0 + t * C * D
    DX = DX + t * S * D
    DAW = DAW + t * C * D
    _copy_cd(DWK + t * C * D, LAM, cls, cls_ok, D, BLOCK_C, BLOCK_D)
    _zero_grads(DX, DAW, rows, row_ok, cls, cls_ok, D, BLOCK_S, BLOCK_C, BLOCK_D)
    tl.debug_barrier()
    lam = tl.load(DBK + t * C + cls, mask=cls_ok, other=0.0).to(tl.float32)
    lam, dab = _reverse_steps(X + t * S * D, Y + t * S, AW, AB, TRAJ + t * (K + 1) * C * D, BTRAJ + t * (K + 1) * C,
                              LAM, lam, DX, DAW, rows, row_ok, cls, cls_ok, S, D, C, K, FIRST_ORDER, PRECISION,
                              BLOCK_S, BLOCK_C, BLOCK_D)
    tl.store(DB0 + t * C + cls, lam, mask=cls_ok)
    tl.store(DAB + t * C + cls, dab, mask=cls_ok)
