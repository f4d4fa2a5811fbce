"""Reference inner loop: the per-task Python loop of autograd that learn2learn and
higher users run (torch.autograd.grad with create_graph=True).

    per task:  W_{k+1} = W_k - lr_w * dCE(X W_k^T + b_k, y)/dW_k,  b likewise
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def adapt_reference(support: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, lr_w: Tensor,
                    lr_b: Tensor, steps: int, first_order: bool) -> tuple[Tensor, Tensor]:
    """support (T, S, D), labels (T, S), weight (C, D), bias (C), lr_w (C, D) or scalar,
    lr_b (C,) or scalar.  Returns the adapted heads (T, C, D) and (T, C)."""
    Ws, bs = [], []
    graph = torch.is_grad_enabled()
    with torch.enable_grad():  # the inner gradients need autograd even under torch.no_grad
        for t in range(support.shape[0]):
            W, b = weight, bias
            for _ in range(steps):
                # a frozen weight or bias still adapts: differentiate with respect to a copy
                if not W.requires_grad:
                    W = W.detach().requires_grad_()
                if not b.requires_grad:
                    b = b.detach().requires_grad_()
                loss = F.cross_entropy(support[t] @ W.T + b, labels[t])
                gW, gb = torch.autograd.grad(loss, (W, b), create_graph=graph and not first_order)
                W, b = W - lr_w * gW, b - lr_b * gb
            Ws.append(W)
            bs.append(b)
    W_t, b_t = torch.stack(Ws), torch.stack(bs)
    return (W_t, b_t) if graph else (W_t.detach(), b_t.detach())
