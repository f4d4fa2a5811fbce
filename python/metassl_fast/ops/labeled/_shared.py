"""What the backends of the labelled-row op share: the positive counts, the per-anchor
gradient weights, the reduction, the label buffers and the op's own shape rules."""
from __future__ import annotations

import torch
from torch import Tensor


def positives_per_row(labels: Tensor, key_labels: Tensor, self_col0: int | None) -> Tensor:
    """|P(i)| for every anchor in O((N + M) log M), without the N x M mask; anchor i's
    own column self_col0 + i (if not None) is not its positive."""
    uniq, counts = torch.unique(key_labels, return_counts=True)
    idx = torch.searchsorted(uniq, labels).clamp_max(uniq.numel() - 1)
    npos = torch.where(uniq[idx] == labels, counts[idx], torch.zeros_like(counts[idx]))
    if self_col0 is not None:
        own = key_labels[self_col0:self_col0 + labels.shape[0]]
        npos = npos - (own == labels).to(npos.dtype)
    return npos


def own_col0(key: Tensor | None, self_offset: int) -> int | None:
    """The column of anchor 0 itself (anchor i's is col0 + i), None if it is not a column."""
    return 0 if key is None else (self_offset if self_offset >= 0 else None)


def check_labeled(query: Tensor, key: Tensor | None, pos_logit: Tensor | None, self_offset: int,
                  pairwise: bool) -> None:
    """The op's own shape rules (every backend relies on them)."""
    n = query.shape[0]
    c = n if key is None else key.shape[0]
    col0 = own_col0(key, self_offset)
    if col0 is not None and col0 + n > c:
        raise ValueError(f"self_offset={self_offset}: the anchors' own columns [{col0}, {col0 + n}) "
                         f"are not all among the {c} keys")
    if pos_logit is not None and (pairwise or pos_logit.shape != (n,)):
        raise ValueError(f"pos_logit must have shape ({n},) and goes with the mean-positive loss only "
                         f"(pairwise=False), got shape {tuple(pos_logit.shape)}, pairwise={pairwise}")


def checked_labels(labels, key_labels, n, c):
    """(labels, key labels) contiguous; key_labels None means the keys are the queries.
    The kernels read them as raw int64 arrays of n and c entries."""
    y = labels.contiguous()
    yk = y if key_labels is None else key_labels.contiguous()
    if y.shape != (n,) or yk.shape != (c,) or y.dtype != torch.int64 or yk.dtype != torch.int64:
        raise ValueError("labels and key_labels must be int64 with one entry per row of query and key")
    return y, yk


def weights(reduction, pairwise, npos, grad, dtype):
    """dL/d(row loss) per anchor (rows without positives get a zero gradient from the
    kernel whatever their weight), and the divisor of the mean."""
    count = int(npos.sum()) if pairwise else int((npos > 0).sum())
    dev = npos.device
    if reduction == "none":
        g = torch.ones(npos.shape[0], dtype=dtype, device=dev) if grad is None else grad.to(dtype).contiguous()
        return g, count
    w = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    g = torch.full((npos.shape[0],), w, dtype=dtype, device=dev)
    return (g if grad is None else g * grad.to(dtype)), count


def reduce_rows(row_loss, reduction, count, dtype):
    if reduction == "mean":
        return (row_loss.sum() / max(count, 1)).to(dtype)
    if reduction == "sum":
        return row_loss.sum().to(dtype)
    return row_loss.to(dtype)
