"""Reference SigLIP loss: it materialises the N x M logits and uses autograd (the
float64 ground truth of the tests, and backend="torch").

    l = -(1/N) sum_ij log sigmoid(z_ij (s q_i.k_j + b)),  z = +1 on the diagonal, -1 elsewhere
(open_clip's SigLipLoss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def siglip_loss(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, diag_offset: int = 0) -> Tensor:
    """query (N, D), key (M, D) with query i's positive at key diag_offset + i; scale,
    bias 0-dim.  The sum over all N x M pairs divided by N, in the input dtype."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    logits = scale.to(acc) * (query.to(acc) @ key.to(acc).T) + bias.to(acc)
    n = query.shape[0]
    z = -torch.ones(n, key.shape[0], dtype=acc, device=query.device)
    rows = torch.arange(n, device=query.device)
    z[rows, rows + diag_offset] = 1.0
    return (-F.logsigmoid(z * logits).sum() / n).to(query.dtype)
