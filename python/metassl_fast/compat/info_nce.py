"""Drop-in for info-nce-pytorch (``from info_nce import InfoNCE, info_nce``).

Semantics of info-nce-pytorch 0.1.4: query, positive_key and negative_keys are
L2-normalised; without negatives the other rows' positive keys are the negatives
(in-batch, one-directional); with negatives they REPLACE the in-batch ones: row i's
logits are [q_i . p_i, q_i . negatives] / temperature, the positive first.
negative_mode "unpaired": negatives (M, D) shared by all queries; "paired": (N, M, D),
each query its own M negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from .. import functional as _f

__all__ = ["InfoNCE", "info_nce"]


class InfoNCE(nn.Module):
    """info_nce.InfoNCE(temperature=0.1, reduction='mean', negative_mode='unpaired');
    forward(query, positive_key, negative_keys=None)."""

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", negative_mode: str = "unpaired"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.negative_mode = negative_mode

    def forward(self, query: Tensor, positive_key: Tensor, negative_keys: Tensor | None = None) -> Tensor:
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature,
                        reduction=self.reduction, negative_mode=self.negative_mode)


def info_nce(query: Tensor, positive_key: Tensor, negative_keys: Tensor | None = None,
             temperature: float = 0.1, reduction: str = "mean", negative_mode: str = "unpaired") -> Tensor:
    """info_nce.info_nce with the same arguments and results; see the module docstring."""
    for name, x in (("query", query), ("positive_key", positive_key)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"<{name}> must have 2 dimensions, got shape {tuple(x.shape)}")
    if negative_mode not in ("unpaired", "paired"):
        raise ValueError(f"negative_mode must be 'unpaired' or 'paired', got {negative_mode!r}")
    if negative_keys is None:
        return _f.info_nce(query, positive_key, temperature=temperature, reduction=reduction)
    if not isinstance(negative_keys, Tensor):
        raise TypeError(f"negative_keys must be a torch.Tensor, got {type(negative_keys).__name__}")
    if negative_mode == "unpaired":
        if negative_keys.dim() != 2:
            raise ValueError("<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired', "
                             f"got shape {tuple(negative_keys.shape)}")
        return _f.info_nce_explicit(query, positive_key, negative_keys, temperature=temperature,
                                    reduction=reduction)
    return _paired(query, positive_key, negative_keys, temperature, reduction)


def _paired(query, positive_key, negative_keys, temperature, reduction):
    """Each query its own (M, D) negatives: the (N, 1 + M) logits are smaller than the
    (N, M, D) input itself, so this is already O(input) memory."""
    if negative_keys.dim() != 3:
        raise ValueError("<negative_keys> must have 3 dimensions if <negative_mode> == 'paired', "
                         f"got shape {tuple(negative_keys.shape)}")
    if negative_keys.shape[0] != query.shape[0] or positive_key.shape != query.shape \
            or negative_keys.shape[2] != query.shape[1]:
        raise ValueError(f"query {tuple(query.shape)}, positive_key {tuple(positive_key.shape)} and paired "
                         f"negative_keys {tuple(negative_keys.shape)} must agree: (N, D), (N, D), (N, M, D)")
    scale = _validate.inverse_temperature("temperature", temperature, query.device)
    _validate.reduction(reduction)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = F.normalize(query.to(acc), dim=-1)
    p = F.normalize(positive_key.to(acc), dim=-1)
    n = F.normalize(negative_keys.to(acc), dim=-1)
    logits = torch.cat([(q * p).sum(1, keepdim=True), torch.bmm(n, q.unsqueeze(2)).squeeze(2)], 1)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits * scale.to(acc), target, reduction=reduction).to(query.dtype)
