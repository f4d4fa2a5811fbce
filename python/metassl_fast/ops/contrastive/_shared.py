"""What the backends of the contrastive op share: operands, gradient weights, the
reduction and the finishing of the gradients (unscale, un-normalise, split)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import acc_dtype, check_op, normalize_backward, normalized


def check_contrastive(query: Tensor, key: Tensor, negatives: Tensor | None, scale: Tensor, reduction: str) -> None:
    """What the op assumes of a direct torch.ops call (the public functions ensure it): as
    check_op, key (N, D) row for row with query, negatives (M, D) or (N, M, D) with
    M >= 1, and one floating dtype for the features."""
    check_op(query, key, scale, reduction, negatives=negatives)
    n, d = query.shape
    if key.shape[0] != n:
        raise ValueError(f"key must be (N={n}, D={d}): row i is the positive of query row i, got {tuple(key.shape)}")
    if negatives is not None:
        ok = (negatives.dim() == 2 and negatives.shape[1] == d) or (negatives.dim() == 3 and negatives.shape[0] == n
                                                                      and negatives.shape[2] == d)
        if not ok or negatives.shape[-2] == 0:
            raise ValueError(f"negatives must be (M, D={d}) or (N={n}, M, D={d}) with M >= 1, got "
                             f"{tuple(negatives.shape)}")
    for name, t in (("query", query), ("key", key), ("negatives", negatives)):
        if t is not None and (not t.dtype.is_floating_point or t.dtype != query.dtype):
            raise TypeError(f"{name} has dtype {t.dtype}: query, key and negatives take one floating dtype")


def inputs(query, key, negatives, normalize):
    """Upcast to the accumulation dtype and normalise: (q, keys, q_norm, keys_norm),
    keys = [key; negatives], the norms None without normalisation."""
    acc = acc_dtype(query.dtype)
    q = query.to(acc)
    keys = key.to(acc) if negatives is None else torch.cat([key.to(acc), negatives.to(acc)])
    q_norm = k_norm = None
    if normalize:
        q, q_norm = normalized(q)
        keys, k_norm = normalized(keys)
    return q, keys, q_norm, k_norm


def key_rows(n, n_cols, need):
    """Rows [c0, c1) of [key; negatives] whose gradient is needed, or None: a frozen
    key tower or a MoCo queue without grad costs no GEMM."""
    _, need_dk, need_dneg, _ = need
    if not (need_dk or need_dneg):
        return None
    return (0 if need_dk else n, n_cols if need_dneg else n)


def col_lse_and_loss(col_max, col_sum, pos):
    """Column LSE and column loss (max - S_jj) + log sum: the loss without the
    cancellation of lse - S_jj when it is tiny."""
    log_sum = torch.log(col_sum)
    return col_max + log_sum, (col_max - pos) + log_sum


def row_weights(reduction: str, n: int, symmetric: bool, grad: Tensor | None, dtype, device) -> Tensor:
    """dL/d(row loss) for each row (the column weights are the same when symmetric);
    grad is dL/d(output), None for 1.  Stays on the device (no host sync)."""
    half = 0.5 if symmetric else 1.0
    if reduction == "none":
        return (half * grad).to(dtype).contiguous()
    w = half / n if reduction == "mean" else half
    if grad is None:
        return torch.full((n,), w, dtype=dtype, device=device)
    return (grad.to(dtype) * w).expand(n).contiguous()


def reduce(losses, symmetric, reduction, dtype):
    row_loss, col_loss = losses
    per_row = 0.5 * (row_loss + col_loss) if symmetric else row_loss
    if reduction == "mean":
        per_row = per_row.mean()
    elif reduction == "sum":
        per_row = per_row.sum()
    return per_row.to(dtype)


def empty_grads(query, key, scale):
    return query.new_empty(0), key.new_empty(0), query.new_empty(0), scale.new_empty(0)


def finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need):
    """Unscale, undo the normalisation, split keys/negatives, cast to input dtypes.  As the
    backends leave them: dq = G keys (N, D), dk = G^T (s q) for the key rows key_rows(need),
    gs = sum G S (0-dim)."""
    need_dq, need_dk, need_dneg, need_ds = need
    n = key.shape[0]
    rows = key_rows(n, keys.shape[0], need)
    out_q, out_k, out_n, out_s = empty_grads(query, key, scale)
    if need_dq:
        out_q = normalize_backward(dq * s, q, q_norm).to(query.dtype)
    if need_dk or need_dneg:
        c0, c1 = rows
        if k_norm is not None:
            dk = normalize_backward(dk, keys[c0:c1], k_norm[c0:c1])
        # a copy when both come from dk: two outputs must not share one buffer
        if need_dk:
            out_k = dk[:n].to(key.dtype, copy=need_dneg)
        if need_dneg:
            out_n = dk[n - c0:].to(negatives.dtype, copy=True)
    if need_ds:
        out_s = (gs / s).to(scale.dtype).reshape(())
    return out_q, out_k, out_n, out_s
