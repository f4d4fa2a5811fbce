"""nn.Module of the meta-learning heads."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from .anil import fused_anil


class ANILHead(nn.Module):
    """A linear head adapted per task in the inner loop (ANIL; Meta-SGD with
    per_param_lr=True).  forward(support (T, S, D), support_labels (T, S),
    query (T, Q, D), query_labels (T, Q)) -> (loss, accuracy on the queries)."""

    def __init__(self, in_features: int, n_way: int, lr: float = 0.5, steps: int = 5,
                 learn_lr: bool = False, per_param_lr: bool = False, first_order: bool = False,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("n_way", n_way)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise TypeError(f"lr must be a float, got {type(lr).__name__}")
        _validate.scalar("lr", lr, torch.device("cpu"))  # finite (a huge int, NaN or inf: ValueError)
        self.linear = nn.Linear(in_features, n_way)
        self.steps = _validate.steps(steps)
        self.first_order = _validate.flag("first_order", first_order)
        self.per_param_lr = _validate.flag("per_param_lr", per_param_lr)
        if per_param_lr:
            self.lr_weight = nn.Parameter(torch.full((n_way, in_features), float(lr)), requires_grad=learn_lr)
            self.lr_bias = nn.Parameter(torch.full((n_way,), float(lr)), requires_grad=learn_lr)
        else:
            self.lr = nn.Parameter(torch.tensor(float(lr)), requires_grad=learn_lr)
        self.backend = backend

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor):
        """-> (the meta-loss (mean over tasks and queries), the accuracy on the queries):
        one fused call (anil_loss's), which also counts the correct queries."""
        lr = (self.lr_weight, self.lr_bias) if self.per_param_lr else self.lr
        loss, correct = fused_anil(support, support_labels, query, query_labels, self.linear.weight,
                                   self.linear.bias, lr, self.steps, self.first_order, "mean", self.backend,
                                   any_query_count=True)
        return loss, (correct.sum() / query_labels.numel()).float()
