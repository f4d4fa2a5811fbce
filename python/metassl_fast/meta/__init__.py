"""Batched few-shot meta-learning heads: many tasks adapted in one fused call.

Shapes: T tasks, S support and Q query examples per task, D features, C classes.
    support (T, S, D), support_labels (T, S) integers in [0, C)
    query (T, Q, D), query_labels (T, Q)
    weight (C, D), bias (C): the shared head initialisation (nn.Linear layout)
    lr: a float, a 0-dim tensor, or a pair (lr_weight (C, D), lr_bias (C,)) for
        Meta-SGD; a tensor may require grad (a learned step size).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, _validate
from ..reference.inner_loop import adapt_reference

_KERNEL_BACKENDS = ("cpu", "triton", "cuda")  # csrc/cpu, kernels/inner_loop.py, csrc/cuda/inner_loop.cu


def _int_labels(name: str, labels: object, shape: tuple, n_classes: int | None,
                device: torch.device | None = None) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if n_classes is not None and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{name} must lie in [0, {n_classes}), got values in [{lo}, {hi}]")
    return labels.long()


def _features3(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (T, n, D), got {tuple(x.shape)}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def _head(support: Tensor, weight: object, bias: object) -> tuple[int, int]:
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        raise TypeError("weight and bias must be torch.Tensors")
    D = support.shape[2]
    if weight.dim() != 2 or weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (C, D={D}), got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (C={weight.shape[0]},), got {tuple(bias.shape)}")
    for name, x in (("weight", weight), ("bias", bias)):
        _validate.same_dtype_device("support", support, name, x)
    return weight.shape[0], D


def _lrs(lr: object, C: int, D: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """lr as per-parameter step sizes (C, D) and (C,), differentiable where lr is."""
    if isinstance(lr, (tuple, list)):
        if len(lr) != 2 or not all(isinstance(x, Tensor) for x in lr):
            raise TypeError("lr as a pair must be (lr_weight (C, D) tensor, lr_bias (C,) tensor)")
        lr_w, lr_b = lr
        if lr_w.shape != (C, D):
            raise ValueError(f"lr_weight must have shape (C, D) = ({C}, {D}), got {tuple(lr_w.shape)}")
        if lr_b.shape != (C,):
            raise ValueError(f"lr_bias must have shape (C,) = ({C},), got {tuple(lr_b.shape)}")
        for name, x in (("lr_weight", lr_w), ("lr_bias", lr_b)):
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
            if x.device != like.device:
                raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
            if not torch.compiler.is_compiling() and not bool(torch.isfinite(x.detach()).all()):
                raise ValueError(f"{name} must be finite")
        return lr_w.to(like), lr_b.to(like)
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            raise ValueError(f"lr must be a float, a 0-dim tensor or a (lr_weight, lr_bias) pair; "
                             f"got a tensor of shape {tuple(lr.shape)}")
        if not lr.dtype.is_floating_point:
            raise TypeError(f"lr must be a floating tensor, got {lr.dtype}")
        if not torch.compiler.is_compiling() and not math.isfinite(float(lr.detach())):
            raise ValueError(f"lr must be finite, got {float(lr.detach())}")
        lr = lr.to(like)
        return lr.expand(C, D), lr.expand(C)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float, a 0-dim tensor or a pair of tensors, got {type(lr).__name__}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr}")
    full = torch.full((), float(lr), dtype=like.dtype, device=like.device)
    return full.expand(C, D), full.expand(C)


def _steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps


def _prepared(support, support_labels, weight, bias, lr, steps, first_order):
    """Validated kernel inputs: (X, labels, W, b, lr_w (C, D), lr_b (C), steps), contiguous,
    in the accumulation dtype (float64 stays float64, the rest float32)."""
    _features3("support", support)
    C, D = _head(support, weight, bias)
    T, S, _ = support.shape
    labels = _int_labels("support_labels", support_labels, (T, S), C, support.device).contiguous()
    steps = _steps(steps)
    _validate.flag("first_order", first_order)
    acc = torch.float64 if support.dtype == torch.float64 else torch.float32
    X, W, b = (x.to(acc).contiguous() for x in (support, weight, bias))
    lr_w, lr_b = _lrs(lr, C, D, X)
    return X, labels, W, b, lr_w.contiguous(), lr_b.contiguous(), steps


def adapt_linear_head(support: Tensor, support_labels: Tensor, weight: Tensor, bias: Tensor, *,
                      lr: float | Tensor | tuple[Tensor, Tensor] = 0.5, steps: int = 5,
                      first_order: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Adapt the head (weight (C, D), bias (C)) to each task by `steps` SGD steps on the
    mean cross-entropy of its support set, all tasks in one fused call.

    Returns (W_t (T, C, D), b_t (T, C)), differentiable with respect to support,
    weight, bias and lr: exact second-order meta-gradients (or first-order MAML
    semantics with first_order=True, the inner gradients treated as constants).
    backend: None (best available), "cpu" (the fused C++ kernel), "triton" (one program
    per task, float32 inside; opt-in) or "torch" (the per-task autograd loop); also
    METASSL_FAST_BACKEND.
    """
    X, labels, W, b, lr_w, lr_b, steps = _prepared(support, support_labels, weight, bias, lr, steps,
                                                   first_order)
    which = _backend.resolve(backend, support.device)
    if which == "torch":
        W_t, b_t = adapt_reference(X, labels, W, b, lr_w, lr_b, steps, first_order)
    elif which in _KERNEL_BACKENDS:
        W_t, b_t, _, _ = torch.ops.metassl_fast.inner_loop_fwd(X, labels, W, b, lr_w, lr_b, steps,
                                                               first_order, which)
    else:
        raise RuntimeError(f"backend={which!r}: the inner-loop kernel has no {which} implementation "
                           "in this version; use 'cpu' or 'torch'")
    return W_t.to(support.dtype), b_t.to(support.dtype)


def _query_ce(query: Tensor, query_labels: Tensor, W_t: Tensor, b_t: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the adapted heads on the queries: (per query (T*Q,), logits (T, Q, C)),
    in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    logits = torch.baddbmm(b_t.to(acc).unsqueeze(1), query.to(acc), W_t.to(acc).transpose(1, 2))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), query_labels.reshape(-1), reduction="none")
    return ce, logits


def _check_query(support: Tensor, query: object, query_labels: object, C: int | None) -> Tensor:
    _features3("query", query)
    if query.shape[0] != support.shape[0] or query.shape[2] != support.shape[2]:
        raise ValueError(f"query must have shape (T={support.shape[0]}, Q, D={support.shape[2]}), "
                         f"got {tuple(query.shape)}")
    _validate.same_dtype_device("support", support, "query", query)
    return _int_labels("query_labels", query_labels, query.shape[:2], C, support.device)


def _reduce_tasks(per_example: Tensor, T: int, reduction: str) -> Tensor:
    per_task = per_example.view(T, -1).mean(1)
    if reduction == "mean":
        return per_task.mean()
    if reduction == "none":
        return per_task
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def anil_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor,
              weight: Tensor, bias: Tensor, *, lr: float | Tensor | tuple[Tensor, Tensor] = 0.5,
              steps: int = 5, first_order: bool = False, reduction: str = "mean",
              backend: str | None = None) -> Tensor:
    """ANIL / Meta-SGD meta-loss: adapt the head on each task's support set
    (adapt_linear_head), then the cross-entropy of the adapted head on the queries,
    averaged over queries, then over tasks ("mean") or per task ("none", shape (T,)).
    loss.backward() gives exact second-order meta-gradients into weight, bias, lr (if it
    requires grad), support and query."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    which = _backend.resolve(backend, support.device)
    if which not in _KERNEL_BACKENDS:
        W_t, b_t = adapt_linear_head(support, support_labels, weight, bias, lr=lr, steps=steps,
                                     first_order=first_order, backend=which)
        q_labels = _check_query(support, query, query_labels, weight.shape[0])
        ce, _ = _query_ce(query, q_labels, W_t, b_t)
        return _reduce_tasks(ce, query.shape[0], reduction).to(query.dtype)
    # the fused kernel: inner loop and query loss in one call (and the gradient in one more)
    X, labels, W, b, lr_w, lr_b, steps = _prepared(support, support_labels, weight, bias, lr, steps,
                                                   first_order)
    q_labels = _check_query(support, query, query_labels, W.shape[0]).contiguous()
    if _one_pass(which, reduction, lr, (support, query, weight, bias)):
        from ..ops.inner_loop import anil_loss_train_call

        loss = anil_loss_train_call(X, labels, query.to(X.dtype).contiguous(), q_labels, W, b, lr_w, lr_b, steps,
                                    first_order)
        return loss.to(query.dtype)
    loss = torch.ops.metassl_fast.anil_loss_fwd(X, labels, query.to(X.dtype).contiguous(), q_labels, W, b,
                                                lr_w, lr_b, steps, first_order, reduction, which)
    return loss.to(query.dtype)


def _one_pass(which: str, reduction: str, lr: object, inputs: tuple) -> bool:
    """Training with a step size that is one number and needs no gradient: the CPU
    kernel forms the gradient during the forward (ops/inner_loop.py, anil_loss_train)
    instead of re-running the inner loop in the backward.  Taken whenever grad mode is
    on and an input requires grad, so a forward that is never backpropagated (an
    evaluation loop without torch.no_grad) pays for the gradient too."""
    scalar_lr = isinstance(lr, (int, float)) or (isinstance(lr, Tensor) and not lr.requires_grad)
    return (which == "cpu" and reduction == "mean" and scalar_lr and torch.is_grad_enabled()
            and any(t.requires_grad for t in inputs))


def proto_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor, *,
               n_way: int | None = None, reduction: str = "mean") -> Tensor:
    """Prototypical-network loss with squared Euclidean distance: prototypes are the
    class means of each task's support set, logits_qc = -|x_q - c_c|^2 (computed as
    2 x.c - |c|^2 - |x|^2, no (Q, C, D) tensor).  n_way defaults to max label + 1.
    Every class must have a support example in every task.  Runs as torch ops: the
    work is O(T (S + Q) C D), far below the contrastive losses' N^2."""
    _features3("support", support)
    T, S, D = support.shape
    if n_way is None:
        n_way = int(support_labels.max()) + 1 if isinstance(support_labels, Tensor) else 0
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be a positive int, got {n_way!r}")
    labels = _int_labels("support_labels", support_labels, (T, S), n_way, support.device)
    q_labels = _check_query(support, query, query_labels, n_way)
    acc = torch.float64 if support.dtype == torch.float64 else torch.float32
    onehot = F.one_hot(labels, n_way).to(acc)  # (T, S, C)
    counts = onehot.sum(1)  # (T, C)
    if not torch.compiler.is_compiling() and bool((counts == 0).any()):
        t, c = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"support_labels: class {c} has no support example in task {t}")
    protos = onehot.transpose(1, 2) @ support.to(acc) / counts.unsqueeze(-1)  # (T, C, D)
    q = query.to(acc)
    logits = 2 * q @ protos.transpose(1, 2) - (protos * protos).sum(-1).unsqueeze(1) \
        - (q * q).sum(-1, keepdim=True)
    ce = F.cross_entropy(logits.reshape(-1, n_way), q_labels.reshape(-1), reduction="none")
    return _reduce_tasks(ce, T, reduction).to(query.dtype)


class ANILHead(nn.Module):
    """A linear head adapted per task in the inner loop (ANIL; Meta-SGD with
    per_param_lr=True).  forward(support (T, S, D), support_labels (T, S),
    query (T, Q, D), query_labels (T, Q)) -> (loss, accuracy on the queries)."""

    def __init__(self, in_features: int, n_way: int, lr: float = 0.5, steps: int = 5,
                 learn_lr: bool = False, per_param_lr: bool = False, first_order: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.linear = nn.Linear(in_features, n_way)
        self.steps = _steps(steps)
        self.first_order = _validate.flag("first_order", first_order)
        self.per_param_lr = _validate.flag("per_param_lr", per_param_lr)
        if per_param_lr:
            self.lr_weight = nn.Parameter(torch.full((n_way, in_features), float(lr)), requires_grad=learn_lr)
            self.lr_bias = nn.Parameter(torch.full((n_way,), float(lr)), requires_grad=learn_lr)
        else:
            self.lr = nn.Parameter(torch.tensor(float(lr)), requires_grad=learn_lr)
        self.backend = backend

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor):
        lr = (self.lr_weight, self.lr_bias) if self.per_param_lr else self.lr
        W_t, b_t = adapt_linear_head(support, support_labels, self.linear.weight, self.linear.bias,
                                     lr=lr, steps=self.steps, first_order=self.first_order,
                                     backend=self.backend)
        q_labels = _check_query(support, query, query_labels, self.linear.out_features)
        ce, logits = _query_ce(query, q_labels, W_t, b_t)
        acc = (logits.argmax(-1) == q_labels).float().mean()
        return ce.mean().to(query.dtype), acc


__all__ = ["ANILHead", "adapt_linear_head", "anil_loss", "proto_loss"]
