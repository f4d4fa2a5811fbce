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

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "ANILHead":
        """An ANILHead whose initial head is `linear` itself: ``head.linear is linear``, so
        its weight (C, D) and bias (C,) are the very Parameters (not copies) that the inner
        loop starts from and the meta-gradients flow into, and an optimizer (or a
        state_dict, key ``linear.weight`` / ``linear.bias``) that already holds them keeps
        working.  What learn2learn's ``MAML(nn.Linear(D, C), lr=fast_lr)`` becomes:
        ``ANILHead.from_linear(nn.Linear(D, C), lr=fast_lr, steps=adapt_steps)``.

        kwargs: ANILHead's own (lr, steps, learn_lr, per_param_lr, first_order, backend);
        in_features and n_way come from the Linear.  The step-size parameters are put on
        the Linear's device (float64 for a float64 Linear, float32 otherwise).

        A Linear without a bias is refused: the fused inner loop adapts a bias, and a
        zero one that stays zero needs its step size 0 (call meta.anil_loss with
        ``lr=(lr_weight, torch.zeros(C))`` and ``bias=torch.zeros(C)``)."""
        if not isinstance(linear, nn.Linear):
            hint = (" (learn2learn's MAML wrapper keeps it as .module: pass that)"
                    if isinstance(getattr(linear, "module", None), nn.Linear) else "")
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}{hint}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("linear is an uninitialised nn.LazyLinear: run one forward (or build an nn.Linear) "
                             "so that its in_features is known")
        if linear.bias is None:
            raise ValueError("linear has no bias (bias=False): ANILHead adapts a bias in the inner loop; build the "
                             "Linear with bias=True, or call meta.anil_loss with a zero bias and lr=(lr_weight, "
                             "zeros(C)) so that it stays zero")
        for name in ("in_features", "n_way"):
            if name in kwargs:
                raise TypeError(f"from_linear takes {name} from the Linear, got {name}={kwargs[name]!r} too")
        head = cls(linear.in_features, linear.out_features, **kwargs)
        dtype = torch.float64 if linear.weight.dtype == torch.float64 else torch.float32
        head.to(device=linear.weight.device, dtype=dtype)  # before the swap: `linear` is not touched
        head.linear = linear
        return head
