"""ANIL / Meta-SGD: a linear head adapted per task in the inner loop, many tasks in one
fused call (the op: ops/inner_loop).

Shapes: T tasks, S support and Q query examples per task, D features, C classes.
    support (T, S, D), support_labels (T, S) integers in [0, C)
    query (T, Q, D), query_labels (T, Q)
    weight (C, D), bias (C): the shared head initialisation (nn.Linear layout)
    lr: a float, a 0-dim tensor, or a pair (lr_weight (C, D), lr_bias (C,)) for
        Meta-SGD; a tensor may require grad (a learned step size).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate
from ..ops import inner_loop as _op


def prepared(support, support_labels, weight, bias, lr, steps, first_order):
    """Validated kernel inputs: (X, labels, W, b, lr_w (C, D), lr_b (C), steps, lr is one
    number without grad), contiguous, in the accumulation dtype (float64 stays float64,
    the rest float32)."""
    _validate.tasks("support", support)
    C, D = _validate.head(support, weight, bias)
    T, S, _ = support.shape
    labels = _validate.int_labels("support_labels", support_labels, (T, S), C, support.device).contiguous()
    steps = _validate.steps(steps)
    _validate.flag("first_order", first_order)
    acc = torch.float64 if support.dtype == torch.float64 else torch.float32
    X, W, b = (x.to(acc).contiguous() for x in (support, weight, bias))
    lr_w, lr_b, constant = _validate.step_sizes(lr, C, D, X)
    return X, labels, W, b, lr_w.contiguous(), lr_b.contiguous(), steps, constant


def adapt_linear_head(support: Tensor, support_labels: Tensor, weight: Tensor, bias: Tensor, *,
                      lr: float | Tensor | tuple[Tensor, Tensor] = 0.5, steps: int = 5,
                      first_order: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Adapt the head (weight (C, D), bias (C)) to each task by `steps` SGD steps on the
    mean cross-entropy of its support set, all tasks in one fused call.

    Returns (W_t (T, C, D), b_t (T, C)), differentiable with respect to support,
    weight, bias and lr: exact second-order meta-gradients (or first-order MAML
    semantics with first_order=True, the inner gradients treated as constants).
    backend: None (best available), "cpu" (the fused C++ kernel), "triton" (one program
    per task, float32 inside; opt-in), "cuda" or "torch" (the per-task autograd loop);
    also METASSL_FAST_BACKEND.
    """
    X, labels, W, b, lr_w, lr_b, steps, _ = prepared(support, support_labels, weight, bias, lr, steps, first_order)
    which = _validate.backend(backend, support.device)
    W_t, b_t = _op.adapt(X, labels, W, b, lr_w, lr_b, steps, first_order, which)
    return W_t.to(support.dtype), b_t.to(support.dtype)


def anil_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor,
              weight: Tensor, bias: Tensor, *, lr: float | Tensor | tuple[Tensor, Tensor] = 0.5,
              steps: int = 5, first_order: bool = False, reduction: str = "mean",
              backend: str | None = None) -> Tensor:
    """ANIL / Meta-SGD meta-loss: adapt the head on each task's support set
    (adapt_linear_head), then the cross-entropy of the adapted head on the queries,
    averaged over queries, then over tasks ("mean", a scalar) or per task ("none", (T,)).
    loss.backward() gives exact second-order meta-gradients into weight, bias, lr (if it
    requires grad), support and query.  The inner loop and the query loss run in one
    fused kernel call (the gradient in one more, or during the forward when training
    with a constant step size on the CPU)."""
    return fused_anil(support, support_labels, query, query_labels, weight, bias, lr, steps, first_order, reduction,
                      backend)[0]


def fused_anil(support, support_labels, query, query_labels, weight, bias, lr, steps, first_order, reduction,
               backend, any_query_count=False) -> tuple[Tensor, Tensor]:
    """anil_loss and each task's number of correctly classified queries (T,), from one
    fused call (ANILHead's forward; any_query_count: see ops.inner_loop.anil)."""
    _validate.task_reduction(reduction)
    X, labels, W, b, lr_w, lr_b, steps, constant = prepared(support, support_labels, weight, bias, lr, steps,
                                                            first_order)
    q_labels = _validate.query_set(support, query, query_labels, W.shape[0]).contiguous()
    which = _validate.backend(backend, support.device)
    loss, correct = _op.anil(X, labels, query.to(X.dtype).contiguous(), q_labels, W, b, lr_w, lr_b, steps,
                             first_order, reduction, which, lr_is_constant=constant, head_dtype=support.dtype,
                             any_query_count=any_query_count)
    return loss.to(query.dtype), correct
