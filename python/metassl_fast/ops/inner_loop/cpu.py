"""CPU backend of the inner-loop op (csrc/cpu/inner_loop.cpp): the weight-space
recursion over T tasks in parallel, its closed-form reverse pass, the fused ANIL
meta-loss (support-space path when the step sizes need no gradient) and the apply
step of the one-pass training loss."""
from __future__ import annotations

import torch

from ... import _ext
from .._common import check_saved, fresh_like, nthreads, ptr_args, ptr_pairs
from ._shared import check_adapt_bwd, check_adapt_fwd, check_apply_shapes, check_cpu, check_cpu_layout


def adapt_forward(support, labels, weight, bias, lr_w, lr_b, steps):
    """-> (W_K (T, C, D), b_K (T, C), W_traj (T, K+1, C, D), b_traj (T, K+1, C))."""
    C_ext = _ext.require("_C")
    check_cpu((labels,), support=support, weight=weight, bias=bias, lr_w=lr_w, lr_b=lr_b)
    check_adapt_fwd(support, labels, weight, bias, lr_w, lr_b, triton_caps=False, label_values=False)
    T, S, D = support.shape
    C = weight.shape[0]
    W_traj = support.new_empty(T, steps + 1, C, D)
    b_traj = support.new_empty(T, steps + 1, C)
    C_ext.inner_loop_forward(
        dtype=_ext.DTYPE_CODE[support.dtype],
        **ptr_args(X=support, y=labels, W0=weight, b0=bias, aW=lr_w, ab=lr_b, W_traj=W_traj, b_traj=b_traj),
        T=T, S=S, D=D, C=C, K=steps, nthreads=nthreads())
    return W_traj[:, steps].clone(), b_traj[:, steps].clone(), W_traj, b_traj


def adapt_backward(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order):
    """-> (d support, d weight, d bias, d lr_w, d lr_b), head and lr gradients summed over tasks."""
    C_ext = _ext.require("_C")
    dW_K, db_K = dW_K.to(support.dtype).contiguous(), db_K.to(support.dtype).contiguous()
    check_cpu((labels,), support=support, lr_w=lr_w, lr_b=lr_b, W_traj=W_traj, b_traj=b_traj, dW_K=dW_K,
              db_K=db_K)
    check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, triton_caps=False, label_values=False)
    T, S, D = support.shape
    C = lr_w.shape[0]
    steps = W_traj.shape[1] - 1
    dX = fresh_like(support)
    dW0, daW = support.new_empty(T, C, D), support.new_empty(T, C, D)
    db0, dab = support.new_empty(T, C), support.new_empty(T, C)
    C_ext.inner_loop_backward(
        dtype=_ext.DTYPE_CODE[support.dtype],
        **ptr_args(X=support, y=labels, aW=lr_w, ab=lr_b, W_traj=W_traj, b_traj=b_traj, dW_K=dW_K, db_K=db_K, dX=dX,
                dW0=dW0, db0=db0, daW=daW, dab=dab),
        T=T, S=S, D=D, C=C, K=steps, first_order=first_order, nthreads=nthreads())
    return dX, dW0.sum(0), db0.sum(0), daW.sum(0), dab.sum(0)


def anil(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps, first_order,
         compute_grad, need_dlr=True, correct=None, defer=None):
    """-> (loss (T,), None or the gradients (dX, dXq, dW, db, d lr_w, d lr_b)); without
    need_dlr the step sizes' gradients are zeros (None with defer; and the kernel may take its
    support-space path, inner_loop.cpp gram_task).  correct (T,) in the support's dtype,
    or None: filled with each task's number of correctly classified queries.  defer =
    (coef, lamK, dzqT, WK): keep what dX and dXq are formed from (apply) instead of
    forming them."""
    check_cpu((labels, query_labels), support=support, query=query, weight=weight, bias=bias, lr_w=lr_w,
              lr_b=lr_b, **({"task_weight": task_weight} if task_weight is not None else {}))
    check_cpu_layout(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight)
    return anil_unchecked(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps,
                          first_order, compute_grad, need_dlr, correct, defer)


def anil_unchecked(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps, first_order,
                   compute_grad, need_dlr=True, correct=None, defer=None):
    """anil() without its Python checks, for callers whose inputs are known to satisfy them
    (meta.anil's prepared(): contiguous CPU tensors of one float dtype, int64 labels, the
    shapes above); the C++ side still checks every buffer's size and every label."""
    C_ext = _ext.require("_C")
    T, S, D = support.shape
    Q = query.shape[1]
    C = weight.shape[0]
    loss = support.new_empty(T)
    none = support.new_empty(0)
    coef = lamK = dzqT = WK = none
    if defer is not None:
        coef, lamK, dzqT, WK = defer
    if compute_grad and defer is not None:
        dX = dXq = none
        dW0, db0, daW, dab = support.new_empty(T, C, D), support.new_empty(T, C), none, none
    elif compute_grad:
        dX, dXq = fresh_like(support), fresh_like(query)
        dW0, db0 = support.new_empty(T, C, D), support.new_empty(T, C)
        daW, dab = (support.new_empty(T, C, D), support.new_empty(T, C)) if need_dlr else (none, none)
    else:
        dX = dXq = dW0 = daW = db0 = dab = task_weight = none
    # positional, in the binding's order (csrc/cpu/bindings.cpp anil_loss)
    C_ext.anil_loss(_ext.DTYPE_CODE[support.dtype],
                    *ptr_pairs(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, loss, dX,
                               dXq, dW0, db0, daW, dab),
                    T, S, Q, D, C, steps, first_order, compute_grad, need_dlr, defer is not None,
                    *ptr_pairs(coef, lamK, dzqT, WK), nthreads(), *ptr_pairs(none if correct is None else correct))
    if not compute_grad:
        return loss, None
    if need_dlr:
        dlw, dlb = daW.sum(0), dab.sum(0)
    elif defer is None:
        dlw, dlb = support.new_zeros(C, D), support.new_zeros(C)
    else:  # the one-pass op returns no step-size gradients
        dlw = dlb = None
    return loss, (dX, dXq, dW0.sum(0), db0.sum(0), dlw, dlb)


def apply(grad, support, query, weight, coef, lamK, dzqT, WK):
    """-> (d support (T, S, D), d query (T, Q, D)) of the one-pass training loss, times grad ()."""
    check_cpu((), support=support, query=query, weight=weight, coef=coef, lamK=lamK, dzqT=dzqT, WK=WK)
    check_apply_shapes(grad, support, query, weight, coef, lamK, dzqT, WK)
    return _apply_run(grad, support, query, weight, coef, lamK, dzqT, WK)


def apply_unchecked(grad, support, query, weight, coef, lamK, dzqT, WK):
    """apply() without its shape checks: the operands are anil_unchecked's own deferred
    outputs and the inputs it was given (the C++ side checks every size), as saved."""
    check_saved(support.dtype, support, query, weight, coef, lamK, dzqT, WK)
    return _apply_run(grad, support, query, weight, coef, lamK, dzqT, WK)


def _apply_run(grad, support, query, weight, coef, lamK, dzqT, WK):
    C_ext = _ext.require("_C")
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    dX, dXq = fresh_like(support), fresh_like(query)
    # positional, in the binding's order (csrc/cpu/bindings.cpp anil_apply)
    C_ext.anil_apply(_ext.DTYPE_CODE[support.dtype], *ptr_pairs(support, weight, coef, lamK, dzqT, WK), float(grad),
                     *ptr_pairs(dX, dXq), T, S, Q, D, C, nthreads())
    return dX, dXq
