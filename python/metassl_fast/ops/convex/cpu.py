"""CPU backend of the convex-head ops (csrc/cpu/convex.cpp): tasks in parallel, the
solvers in float64, the D-long products in the input's dtype."""
from __future__ import annotations

import torch

from ... import _ext
from .._common import check_saved, fresh_like, nthreads, ptr_pairs
from ._shared import KIND_CODE, check_cpu_buffers


def _run_forward(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg, tol,
                 max_iter):
    check_cpu_buffers(support, n_way, query, labels=labels,
                      **({} if query is None else {"query_labels": query_labels}))
    return forward_unchecked(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg,
                             tol, max_iter)


def forward_unchecked(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg, tol,
                      max_iter):
    """forward() without its Python checks, for inputs known to pass them (meta/convex.py's
    _prepare: contiguous CPU tensors in float32 / float64, int64 labels); the C++ side
    still checks every element count and label."""
    C_ext = _ext.require("_C")
    T, S, D = support.shape
    f64 = torch.float64
    A = support.new_empty(T, S, n_way, dtype=f64)
    b = support.new_empty(T, n_way, dtype=f64)
    W = support.new_empty(T, n_way, D)
    residual = support.new_empty(T, dtype=f64)
    none = support.new_empty(0)
    if query is not None:
        fac = support.new_empty(T, S, S, dtype=f64)
        logits = support.new_empty(T, query.shape[1], n_way)
        loss, correct = support.new_empty(T), support.new_empty(T)
        q, ql = query, query_labels
    else:
        fac = logits = loss = correct = q = ql = none
    # positional, in the binding's order (csrc/cpu/bindings.cpp convex_forward)
    C_ext.convex_forward(_ext.DTYPE_CODE[support.dtype],
                         *ptr_pairs(support, labels, q, ql, A, b, W, fac, logits, loss, correct, residual),
                         T, S, 0 if query is None else query.shape[1], D, n_way, KIND_CODE[kind], reg, scale,
                         label_smoothing, dual_reg, tol, max_iter, nthreads())
    return loss, correct, A, b, W, fac, logits, residual


def forward(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg, tol, max_iter):
    """-> (loss (T,), correct (T,), A, b, W, factor, logits, residual); see ops/convex."""
    return _run_forward(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg,
                        tol, max_iter)


def fit(support, labels, reg, kind, n_way, dual_reg, tol, max_iter):
    """-> (W (T, C, D), b (T, C) in the support's dtype, residual (T,))."""
    _, _, _, b, W, _, _, residual = _run_forward(support, labels, None, None, reg, 1.0, kind, n_way, 0.0, dual_reg,
                                                 tol, max_iter)
    return W, b.to(support.dtype), residual


def backward(grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
             label_smoothing, dual_reg):
    """-> (d support, d query, d reg (), d scale ()) of sum_t grad_t loss_t."""
    check_cpu_buffers(support, n_way, query, labels=labels, query_labels=query_labels, A=A, b=b, W=W, factor=factor,
                      logits=logits)
    return _backward_run(grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
                         label_smoothing, dual_reg)


def backward_unchecked(grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
                       label_smoothing, dual_reg):
    """backward() without its shape checks: A .. logits are forward_unchecked's own outputs
    for these inputs (the C++ side checks every element count), as saved."""
    check_saved(support.dtype, support, query, W, logits)
    check_saved(torch.float64, A, b, factor)
    check_saved(torch.int64, labels, query_labels)
    return _backward_run(grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
                         label_smoothing, dual_reg)


def _backward_run(grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
                  label_smoothing, dual_reg):
    C_ext = _ext.require("_C")
    T, S, D = support.shape
    g = grad.to(support.dtype).expand(T).contiguous() if grad.dim() == 0 else grad.to(support.dtype).contiguous()
    dX, dXq = fresh_like(support), fresh_like(query)
    dreg = support.new_empty(T, dtype=torch.float64)
    dscale = support.new_empty(T, dtype=torch.float64)
    # positional, in the binding's order (csrc/cpu/bindings.cpp convex_backward)
    C_ext.convex_backward(_ext.DTYPE_CODE[support.dtype],
                          *ptr_pairs(support, labels, query, query_labels, A, b, W, factor, logits, g, dX, dXq, dreg,
                                     dscale),
                          T, S, query.shape[1], D, n_way, KIND_CODE[kind], reg, scale, label_smoothing, dual_reg,
                          nthreads())
    return dX, dXq, dreg.sum(), dscale.sum()
