"""Triton kernels of the labelled-row contrastive losses: SupCon, NT-Xent (SimCLR),
pytorch-metric-learning's pairwise NT-Xent and explicit positives.  The math is the
CPU kernel's (csrc/cpu/labeled.h, python/metassl_fast/reference/).

S = s Q K^T, anchor i with label yq_i, column j with label yk_j; with SELF, column
i + self_col0 is the anchor itself and in no set:
    valid_ij = not self,  pos_ij = valid and yk_j == yq_i,  neg_ij = yk_j != yq_i
  mean-positive:  l_i = LSE_valid S_i - mean_pos S_i          (+ one extra logit EXT_i,
                  outside S, when HAS_EXT: a positive if EXT_POS, else only in the LSE)
                  G_ij = g_i (exp(S_ij - lse_i) [valid] - [pos] / npos_i)
  pairwise:       l_i = sum_pos softplus(lse_neg_i - S_ip)
                  G_ip = -g_i sigmoid(lse_neg_i - S_ip),  G_in = g_i sig_i exp(S_in - lse_neg_i)
                  with sig_i = sum_pos sigmoid(lse_neg_i - S_ip)
  An anchor without positives has l_i = 0 and G_i = 0.
The forward kernel stores per row the loss and the statistics the backward needs
(lse and npos, or lse_neg and sig); the backward recomputes S tiles in a row-outer
(dQ, sum G S per program) and a column-outer (dK) kernel, each program owning one
BLOCK_DO chunk of the output's D (grid axis 1), no atomics.  S is summed over D in
BLOCK_K chunks (kernels/_tiles.py).  GEMM-equivalents, R = ceil(D / BLOCK_DO):
1 (forward; pairwise 2) + (R + 1) + (R + 1); floor 3, so 2R over it (pairwise 2R + 1).

Limits as kernels/contrastive.py: any D, fp32/fp16/bf16 operands, fp32 accumulation,
labels int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import _chunk, _s_tile, _sigmoid, _softplus, _span, _store_rows


@triton.jit
def _labeled_s(Q, K, YK, rows, cols, row_ok, col_ok, yq, D, stride_q, stride_k, scale, self_col0,
               SELF: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The S tile and its (valid, pos, neg) masks."""
    yk = tl.load(YK + cols, mask=col_ok, other=0)
    s = _s_tile(Q, K, rows, cols, row_ok, col_ok, D, stride_q, stride_k, scale, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    ok = row_ok[:, None] & col_ok[None, :]
    valid = ok
    if SELF:
        valid = ok & (cols[None, :] != rows[:, None] + self_col0)
    same = yq[:, None] == yk[None, :]
    return s, valid, valid & same, ok & (same == 0)


@triton.jit
def labeled_fwd_kernel(Q, K, YQ, YK, EXT, LOSS, STAT_A, STAT_B, N, C, D, stride_q, stride_k, scale, self_col0,
                       SELF: tl.constexpr, PAIRWISE: tl.constexpr, HAS_EXT: tl.constexpr, EXT_POS: tl.constexpr,
                       PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: LOSS, STAT_A = lse (pairwise: lse over the negatives), STAT_B = npos
    (pairwise: sum of the positives' sigmoids)."""
    pid = tl.program_id(0)
    rows, row_ok = _span(pid * BLOCK_M, BLOCK_M, N)
    yq = tl.load(YQ + rows, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos_sum = tl.zeros([BLOCK_M], tl.float32)
    npos = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols, col_ok = _span(start, BLOCK_N, C)
        s, valid, pos, neg = _labeled_s(Q, K, YK, rows, cols, row_ok, col_ok, yq, D, stride_q, stride_k, scale,
                                        self_col0, SELF, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        npos += tl.sum(tl.where(pos, 1.0, 0.0), 1)
        if PAIRWISE:
            in_lse = neg
        else:
            in_lse = valid
            pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
        sl = tl.where(in_lse, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sl, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing in its LSE yet
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sl - m_safe[:, None]), 1)
        m_i = m_new
    has = l_i > 0  # padded rows, and anchors with nothing in their LSE, have l_i = 0
    log_l = tl.where(has, tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    if PAIRWISE:
        # the positives' terms need the finished lse over the negatives: a second sweep
        lse = m_i + log_l
        total = tl.zeros([BLOCK_M], tl.float32)
        sig = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, C, BLOCK_N):
            cols, col_ok = _span(start, BLOCK_N, C)
            s, _valid, pos, _neg = _labeled_s(Q, K, YK, rows, cols, row_ok, col_ok, yq, D, stride_q, stride_k,
                                              scale, self_col0, SELF, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            t = lse[:, None] - s
            total += tl.sum(tl.where(pos, _softplus(t), 0.0), 1)
            sig += tl.sum(tl.where(pos, _sigmoid(t), 0.0), 1)
        tl.store(LOSS + rows, tl.where(npos > 0, total, 0.0), mask=row_ok)
        tl.store(STAT_A + rows, lse, mask=row_ok)
        tl.store(STAT_B + rows, sig, mask=row_ok)
    else:
        if HAS_EXT:
            ext = tl.load(EXT + rows, mask=row_ok, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, ext)
            l_i = l_i * tl.exp(m_i - m_new) + tl.exp(ext - m_new)
            m_i = m_new
            if EXT_POS:
                pos_sum += ext
                npos += 1.0
            log_l = tl.log(l_i)
        loss = (m_i - pos_sum / tl.maximum(npos, 1.0)) + log_l
        tl.store(LOSS + rows, tl.where(npos > 0, loss, 0.0), mask=row_ok)
        tl.store(STAT_A + rows, m_i + log_l, mask=row_ok)
        tl.store(STAT_B + rows, npos, mask=row_ok)


@triton.jit
def _anchors(YQ, G, STAT_A, STAT_B, rows, row_ok):
    """(label, weight, stat_a, stat_b) of a block of anchors."""
    return (tl.load(YQ + rows, mask=row_ok, other=0), tl.load(G + rows, mask=row_ok, other=0.0),
            tl.load(STAT_A + rows, mask=row_ok, other=0.0), tl.load(STAT_B + rows, mask=row_ok, other=0.0))


@triton.jit
def _labeled_g(Q, K, YK, rows, cols, row_ok, col_ok, yq, g, stat_a, stat_b, D, stride_q, stride_k, scale,
               self_col0, SELF: tl.constexpr, PAIRWISE: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(S, G) of a tile; g, stat_a, stat_b are the anchors' (len(rows),)."""
    s, valid, pos, neg = _labeled_s(Q, K, YK, rows, cols, row_ok, col_ok, yq, D, stride_q, stride_k, scale,
                                    self_col0, SELF, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    g = g[:, None]
    stat_a = stat_a[:, None]
    stat_b = stat_b[:, None]
    # an anchor whose LSE ran over nothing (stat_a = -inf) has no column that uses this
    # exp: keep it finite so that the unselected branch of tl.where holds no inf * 0
    e = tl.exp(tl.where(stat_a == float("-inf"), 0.0, s - stat_a))
    if PAIRWISE:
        gp = -g * _sigmoid(stat_a - s)
        gn = g * stat_b * e
        gt = tl.where(pos, gp, tl.where(neg, gn, 0.0))
    else:
        gv = g * e - tl.where(pos, g / tl.maximum(stat_b, 1.0), 0.0)
        gt = tl.where(valid & (stat_b > 0), gv, 0.0)
    return s, gt


@triton.jit
def labeled_bwd_dq_kernel(Q, K, YQ, YK, G, STAT_A, STAT_B, DQ, DS_PART, N, C, D, stride_q, stride_k, stride_dq,
                          scale, self_col0, SELF: tl.constexpr, PAIRWISE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_DO: tl.constexpr):
    """G K for a block of anchors and one BLOCK_DO chunk of D (times s later), and (chunk
    0) the block's sum G S."""
    pid = tl.program_id(0)
    rows, row_ok = _span(pid * BLOCK_M, BLOCK_M, N)
    d, d_ok = _span(tl.program_id(1) * BLOCK_DO, BLOCK_DO, D)
    yq, g, a, b = _anchors(YQ, G, STAT_A, STAT_B, rows, row_ok)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    gs = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, C, BLOCK_N):
        cols, col_ok = _span(start, BLOCK_N, C)
        s, gt = _labeled_g(Q, K, YK, rows, cols, row_ok, col_ok, yq, g, a, b, D, stride_q, stride_k, scale,
                           self_col0, SELF, PAIRWISE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        gs += tl.sum(gt * s, 1)
        k = _chunk(K, cols, col_ok, d, d_ok, stride_k)
        acc = tl.dot(gt.to(k.dtype), k, acc, input_precision=PRECISION)
    _store_rows(DQ, rows, row_ok, d, d_ok, stride_dq, acc)
    if tl.program_id(1) == 0:
        tl.store(DS_PART + pid, tl.sum(gs, 0))


@triton.jit
def labeled_bwd_dk_kernel(Q, K, YQ, YK, G, STAT_A, STAT_B, DK, N, C, D, stride_q, stride_k, stride_dk, scale,
                          self_col0, SELF: tl.constexpr, PAIRWISE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_DO: tl.constexpr):
    """G^T Q for a block of columns and one BLOCK_DO chunk of D (times s later)."""
    pid = tl.program_id(0)
    cols, col_ok = _span(pid * BLOCK_N, BLOCK_N, C)
    d, d_ok = _span(tl.program_id(1) * BLOCK_DO, BLOCK_DO, D)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows, row_ok = _span(start, BLOCK_M, N)
        yq, g, a, b = _anchors(YQ, G, STAT_A, STAT_B, rows, row_ok)
        _s, gt = _labeled_g(Q, K, YK, rows, cols, row_ok, col_ok, yq, g, a, b, D, stride_q, stride_k, scale,
                            self_col0, SELF, PAIRWISE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        q = _chunk(Q, rows, row_ok, d, d_ok, stride_q)
        acc = tl.dot(tl.trans(gt).to(q.dtype), q, acc, input_precision=PRECISION)
    _store_rows(DK, cols, col_ok, d, d_ok, stride_dk, acc)
