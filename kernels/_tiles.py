"""@triton.jit pieces shared by the contrastive-family kernels (contrastive.py, labeled.py,
siglip.py): index spans with their masks, the S tile, row-block stores, softplus and sigmoid.

    S tile = scale * A[a_idx] B[b_idx]^T, fp32, operands loaded in their own dtype
    softplus(x) = max(x, 0) + log(1 + exp(-|x|))      sigmoid without overflow for any x

Limits: a tile holds all of D (BLOCK_D >= D, a power of two); rows are contiguous
(column stride 1), row strides are arguments.  Every helper is inlined by Triton, so a
kernel written with them compiles to what it would be with the code written out.
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
def _s_tile(a_ptr, b_ptr, a_idx, b_idx, a_mask, b_mask, d, d_mask, stride_a, stride_b, scale,
            PRECISION: tl.constexpr):
    """scale * A[a_idx] B[b_idx]^T as an fp32 (len(a_idx), len(b_idx)) tile, plus the operands."""
    a = tl.load(a_ptr + a_idx[:, None] * stride_a + d[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    b = tl.load(b_ptr + b_idx[:, None] * stride_b + d[None, :], mask=b_mask[:, None] & d_mask[None, :], other=0.0)
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
    return s, a, b


@triton.jit
def _store_rows(ptr, rows, row_ok, d, d_ok, stride, acc):
    """ptr[rows, :D] = acc (an fp32 (len(rows), BLOCK_D) accumulator)."""
    tl.store(ptr + rows[:, None] * stride + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
