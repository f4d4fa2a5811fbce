"""Reference contrastive loss: materialises the N x (N + M) logits.

    S = scale * Q K^T             K = [key; negatives]   (N + M, D)
    paired negatives (N, M, D): row i's extra columns are q_i . negatives[i, m] instead
    row_i = CE(S_i, i)            (InfoNCE; the positive of query i is key i)
    col_j = CE(S[:, j], j)        (symmetric only; over the N queries, key columns only)
    per-row loss = row_i, or (row_i + col_i) / 2 when symmetric
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(
    query: Tensor,
    key: Tensor,
    negatives: Tensor | None,
    scale: Tensor,
    symmetric: bool,
    normalize: bool,
    reduction: str,
) -> Tensor:
    """query (N, D), key (N, D), negatives (M, D), (N, M, D) (paired) or None, scale 0-dim.
    Returns a scalar, or (N,) for reduction="none", in the input dtype."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.to(acc), key.to(acc)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    keys = k
    paired = None
    if negatives is not None:
        n = negatives.to(acc)
        if normalize:
            n = F.normalize(n, dim=-1)
        if negatives.dim() == 3:
            paired = torch.bmm(n, q.unsqueeze(2)).squeeze(2)  # (N, M)
        else:
            keys = torch.cat([k, n])
    logits = q @ keys.T
    if paired is not None:
        logits = torch.cat([logits, paired], 1)
    logits = scale.to(acc) * logits
    n_rows = q.shape[0]
    labels = torch.arange(n_rows, device=q.device)
    per_row = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        per_row = 0.5 * (per_row + F.cross_entropy(logits[:, :n_rows].T, labels, reduction="none"))
    if reduction == "mean":
        out = per_row.mean()
    elif reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row
    return out.to(query.dtype)
