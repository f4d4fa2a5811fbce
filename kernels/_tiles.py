"""@triton.jit pieces shared by the contrastive-family kernels (contrastive.py, labeled.py,
siglip.py): index spans with their masks, the S tile, the output-chunk operand, row-block
stores, softplus and sigmoid.

    S tile = scale * A[a_idx] B[b_idx]^T, fp32, summed over D in BLOCK_K chunks
    softplus(x) = max(x, 0) + log(1 + exp(-|x|))      sigmoid without overflow for any x

D is streamed in BLOCK_K chunks (the innermost loop, which Triton software-pipelines
with cp.async / TMA over num_stages buffers), so no tile holds all of D and any D fits
shared memory.  The backward kernels own one BLOCK_DO-wide chunk of their output's D
(a second grid axis) and load only that chunk of the other operand.  Rows are contiguous
(column stride 1), row strides are arguments.  Every helper is inlined by Triton.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _span(start, BLOCK: tl.constexpr, bound):
    """Indices start .. start + BLOCK and their mask (< bound)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < bound


@triton.jit
def _s_tile(a_ptr, b_ptr, a_idx, b_idx, a_mask, b_mask, D, stride_a, stride_b, scale, PRECISION: tl.constexpr,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """scale * A[a_idx] B[b_idx]^T as an fp32 (BLOCK_A, BLOCK_B) tile, D in BLOCK_K chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        d, d_ok = _span(k0, BLOCK_K, D)
        a = tl.load(a_ptr + a_idx[:, None] * stride_a + d[None, :], mask=a_mask[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_idx[:, None] * stride_b + d[None, :], mask=b_mask[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def _chunk(ptr, idx, ok, d, d_ok, stride):
    """ptr[idx, d] in the operand dtype (0 outside the masks): the output chunk's operand."""
    return tl.load(ptr + idx[:, None] * stride + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, rows, row_ok, d, d_ok, stride, acc):
    """ptr[rows, d] = acc (an fp32 (len(rows), len(d)) accumulator)."""
    tl.store(ptr + rows[:, None] * stride + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
