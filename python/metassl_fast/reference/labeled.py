"""Reference labelled-row loss: it materialises the N x M logits and uses autograd (the
float64 ground truth of the tests, and backend="torch").

Labelled rows (SupCon, NT-Xent, pytorch-metric-learning's pairwise NT-Xent), anchor i
with label y_i, column j with label c_j; with self-exclusion (query is key) column i is
in no set:
    P(i) = {j != i : c_j = y_i}        Neg(i) = {j : c_j != y_i}
    mean-positive:  l_i = LSE_{j != i} S_ij - mean_{p in P(i)} S_ip
    pairwise:       l_i = sum_{p in P(i)} softplus(LSE_{n in Neg(i)} S_in - S_ip)
An anchor without positives has l_i = 0.  reduction "mean" divides the sum by the number
of anchors with positives (mean-positive) or of positive pairs (pairwise); 0 if none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def labeled_contrastive_loss(query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None,
                             scale: Tensor, normalize: bool, reduction: str, pairwise: bool,
                             self_offset: int = -1) -> Tensor:
    """query (N, D), key (M, D) or None (key is query, self excluded), labels (N,),
    key_labels (M,) or None; self_offset >= 0: anchor i is key row self_offset + i and
    is excluded (keys gathered from every rank).  Returns a scalar, or (N,) for
    reduction="none"."""
    acc = _acc(query)
    q = query.to(acc)
    if normalize:
        q = F.normalize(q, dim=-1)
    if key is None:
        k, yk = q, labels
    else:
        k = F.normalize(key.to(acc), dim=-1) if normalize else key.to(acc)
        yk = key_labels
    S = scale.to(acc) * (q @ k.T)
    same = labels[:, None] == yk[None, :]
    excluded = torch.zeros_like(same)
    if key is None:
        excluded = torch.eye(q.shape[0], dtype=torch.bool, device=q.device)
    elif self_offset >= 0:
        rows = torch.arange(q.shape[0], device=q.device)
        excluded[rows, rows + self_offset] = True
    pos = same & ~excluded
    npos = pos.sum(1)
    if pairwise:
        neg = ~same
        has_neg = neg.any(1, keepdim=True)
        # rows without negatives: LSE over nothing is -inf, softplus(-inf) = 0; mask
        # so that autograd sees no NaN from a softmax over an empty set
        lse = torch.logsumexp(S.masked_fill(~neg, float("-inf")).masked_fill(~has_neg, 0.0), 1, keepdim=True)
        lse = torch.where(has_neg, lse, torch.full_like(lse, float("-inf")))
        terms = F.softplus(lse - S).masked_fill(~pos, 0.0)
        per_row = terms.sum(1)
        count = npos.sum()
    else:
        lse = torch.logsumexp(S.masked_fill(excluded, float("-inf")), 1)
        pos_mean = (S * pos).sum(1) / npos.clamp_min(1)
        per_row = torch.where(npos > 0, lse - pos_mean, torch.zeros_like(lse))
        count = (npos > 0).sum()
    if reduction == "mean":
        out = per_row.sum() / count.clamp_min(1)
    elif reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row
    return out.to(query.dtype)
