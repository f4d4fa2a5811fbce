"""Convex few-shot heads (ridge, Crammer-Singer SVM, logistic regression), batched over
tasks: torch.library custom ops, their fakes and autograd, and the entries the public
layer (meta/convex.py) calls.

    per task: A (S, C) from the support's Gram matrix K = X X^T and one-hot labels Y,
              W = A^T X (C, D), b (C); loss = mean_q CE(scale (Xq W^T + b), yq)

Ops: convex_fwd (per task: loss, correct count, and what the backward needs: A, b, W,
the Cholesky factor (ridge) or K (svm, logreg) in float64, the query logits,
and the solver's final residual), convex_bwd (the exact gradient of sum_t g_t loss_t:
closed form for ridge, implicit differentiation at the solution for svm and logreg)
and convex_fit (the heads alone).  Memory O(T (S^2 + S C + C D + Q C)) beyond the
inputs and their gradients.

Backends: cpu.py (csrc/cpu/convex.cpp); backend="torch" is reference/convex.py
(autograd through an exact solve), outside the custom ops.  No GPU kernel: a CUDA
tensor takes the reference (torch's batched solvers).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ...reference.convex import head_loss as reference_loss, head_weights as reference_weights
from .._common import (backend_module, backward_op, eager_function, func_transforms, one_device, refuse_later,
                       register_backward_op, transformable)
from ._shared import KIND_CODE, check_convex

_WHAT = "a convex head (an implicit derivative)"

# (tol, max_iter) when the caller gives none: ridge has no iteration.
DEFAULTS = {"ridge": (1e-6, 1), "svm": (1e-6, 1000), "logreg": (1e-7, 50)}


def _impl(backend: str):
    if backend != "cpu":
        raise RuntimeError(f"metassl_fast::convex has no {backend!r} kernel (kernel: 'cpu'; backend='torch' is the "
                           "reference, outside the custom ops)")
    return backend_module(__package__, "convex", backend)


def _fwd_impl(support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, reg: Tensor, scale: Tensor,
               kind: str, n_way: int, label_smoothing: float, dual_reg: float, tol: float, max_iter: int,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """support (T, S, D), labels (T, S) int64, query (T, Q, D), query_labels (T, Q), reg and
    scale 0-dim -> (loss (T,), correct (T,), A (T, S, C) f64, b (T, C) f64, W (T, C, D),
    factor (T, S, S) f64, query logits before the scale (T, Q, C), residual (T,) f64)."""
    one_device("convex_fwd", support, labels, query, query_labels, reg, scale)
    check_convex(support, labels, query, query_labels, kind, n_way, reg, scale, label_smoothing, dual_reg, tol,
                 max_iter)
    return _impl(backend).forward(support, labels, query, query_labels, float(reg), float(scale), kind, n_way,
                                  label_smoothing, dual_reg, tol, max_iter)


def _fwd_unchecked(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg, tol,
                   max_iter, backend):
    """_fwd_impl for the eager entry, whose inputs meta/convex.py has validated (with named
    errors) and laid out: the CPU kernel without the op's own checks."""
    return _impl(backend).forward_unchecked(support, labels, query, query_labels, float(reg), float(scale), kind,
                                            n_way, label_smoothing, dual_reg, tol, max_iter)


convex_fwd = torch.library.custom_op("metassl_fast::convex_fwd", _fwd_impl, mutates_args=())


def _fwd_fakes(support, query, n_way):
    T, S, D = support.shape
    Q = query.shape[1]
    f64 = torch.float64
    return (support.new_empty(T), support.new_empty(T), support.new_empty(T, S, n_way, dtype=f64),
            support.new_empty(T, n_way, dtype=f64), support.new_empty(T, n_way, D),
            support.new_empty(T, S, S, dtype=f64), support.new_empty(T, Q, n_way), support.new_empty(T, dtype=f64))


@convex_fwd.register_fake
def _(support, labels, query, query_labels, reg, scale, kind, n_way, label_smoothing, dual_reg, tol, max_iter,
      backend):
    one_device("convex_fwd", support, labels, query, query_labels, reg, scale)
    return _fwd_fakes(support, query, n_way)


def _bwd_impl(grad: Tensor, support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, reg: Tensor,
               scale: Tensor, A: Tensor, b: Tensor, W: Tensor, factor: Tensor, logits: Tensor, kind: str,
               n_way: int, label_smoothing: float, dual_reg: float, backend: str
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradient of sum_t grad_t loss_t: (d support (T, S, D), d query (T, Q, D), d reg (),
    d scale ())."""
    one_device("convex_bwd", grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits)
    check_convex(support, labels, query, query_labels, kind, n_way, reg, scale, label_smoothing, dual_reg, 0.5, 1,
                 grad=grad, A=A, b=b, W=W, factor=factor, logits=logits)
    return _bwd_run(_impl(backend).backward, grad, support, labels, query, query_labels, reg, scale, A, b, W, factor,
                    logits, kind, n_way, label_smoothing, dual_reg)


def _bwd_run(run, grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
             label_smoothing, dual_reg, backend=None):
    """run: the CPU backend's backward (checked) or backward_unchecked (the eager entry's,
    on its own forward's outputs)."""
    dX, dXq, dreg, dscale = run(grad, support, labels, query, query_labels, float(reg), float(scale), A, b, W, factor,
                                logits, kind, n_way, label_smoothing, dual_reg)
    return dX, dXq, dreg.to(reg.dtype), dscale.to(scale.dtype)


convex_bwd = torch.library.custom_op("metassl_fast::convex_bwd", _bwd_impl, mutates_args=())


@convex_bwd.register_fake
def _(grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits, kind, n_way,
      label_smoothing, dual_reg, backend):
    one_device("convex_bwd", grad, support, labels, query, query_labels, reg, scale, A, b, W, factor, logits)
    return torch.empty_like(support), torch.empty_like(query), reg.new_empty(()), scale.new_empty(())


def _setup(ctx, inputs, output):
    support, labels, query, query_labels, reg, scale, kind, n_way, ls, dual_reg, _tol, _it, backend = inputs
    _, _, A, b, W, factor, logits, _ = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.kind, ctx.n_way, ctx.ls, ctx.dual_reg, ctx.backend = kind, n_way, ls, dual_reg, backend
    ctx.save_for_backward(support, labels, query, query_labels, reg, scale, A, b, W, factor, logits)


def _backward(ctx, grad, *_unused, bwd=None):
    run = bwd or partial(backward_op, convex_bwd, _WHAT)
    dX, dXq, dreg, dscale = run(grad, *ctx.saved_tensors, ctx.kind, ctx.n_way, ctx.ls,
                                ctx.dual_reg, ctx.backend)
    need = ctx.needs_input_grad
    return (dX if need[0] else None, None, dXq if need[2] else None, None, dreg if need[4] else None,
            dscale if need[5] else None, None, None, None, None, None, None, None)


torch.library.register_autograd("metassl_fast::convex_fwd", _backward, setup_context=_setup)
_ConvexTransformable = transformable(torch.ops.metassl_fast.convex_fwd, _setup, _backward, "convex_fwd")
register_backward_op("metassl_fast::convex_bwd", _WHAT)
# Eager mode without the dispatcher (its Python path costs ~0.1 ms a call here, as much as
# the whole kernel at 5-shot) and without the op's own checks (meta/convex.py validated the
# inputs; the C++ side still checks sizes and labels): the same kernels and formula;
# torch.compile and the torch.func transforms get the op.
def _eager_backward(ctx, grad, *_unused):
    grads = _backward(ctx, grad, bwd=partial(_bwd_run, _impl(ctx.backend).backward_unchecked))
    # create_graph=True: the gradient is usable, differentiating it again raises (it is formed in
    # closed form, a constant to autograd: a Hessian through it would silently miss terms)
    dX, dXq, dreg, dscale = refuse_later(_WHAT, ctx.saved_tensors[:6], grads[0], grads[2], grads[4], grads[5])
    return (dX, None, dXq, None, dreg, dscale) + grads[6:]


_ConvexEager = eager_function(_fwd_unchecked, _setup, _eager_backward, "_ConvexEager")


# reduction "mean" in the same Function: its first output is the mean over tasks, and the
# backward weights every task by grad / T (no separate mean node: about 15 us a call).
def _fwd_mean(*args):
    out = _fwd_unchecked(*args)
    return (out[0].mean(),) + out[1:]


def _mean_setup(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.tasks = inputs[0].shape[0]


def _mean_backward(ctx, grad, *unused):
    return _eager_backward(ctx, grad / ctx.tasks, *unused)


_ConvexEagerMean = eager_function(_fwd_mean, _mean_setup, _mean_backward, "_ConvexEagerMean")


def _fit_impl(support: Tensor, labels: Tensor, reg: Tensor, kind: str, n_way: int, dual_reg: float, tol: float,
               max_iter: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (W (T, C, D), b (T, C), residual (T,) f64): the fitted heads, no gradient."""
    one_device("convex_fit", support, labels, reg)
    check_convex(support, labels, None, None, kind, n_way, reg, reg.new_ones(()), 0.0, dual_reg, tol, max_iter)
    return _impl(backend).fit(support, labels, float(reg), kind, n_way, dual_reg, tol, max_iter)


convex_fit = torch.library.custom_op("metassl_fast::convex_fit", _fit_impl, mutates_args=())


@convex_fit.register_fake
def _(support, labels, reg, kind, n_way, dual_reg, tol, max_iter, backend):
    one_device("convex_fit", support, labels, reg)
    T, _, D = support.shape
    return support.new_empty(T, n_way, D), support.new_empty(T, n_way), support.new_empty(T, dtype=torch.float64)


# ---------------------------------------------------------------------------
# the entries of the public layer
# ---------------------------------------------------------------------------

def head_loss(kind: str, X: Tensor, y: Tensor, Xq: Tensor, yq: Tensor, reg: Tensor, scale: Tensor, n_way: int,
              label_smoothing: float, dual_reg: float, tol: float, max_iter: int, backend: str, reduction: str
              ) -> tuple[Tensor, Tensor]:
    """The query loss (its mean over tasks, or per task (T,) for reduction "none") and the
    correct counts (T,) of validated inputs (meta/convex.py's _prepare: accumulation dtype,
    contiguous, one device, int64 labels) on the resolved backend.  The eager CPU path
    hands them to the kernel without checking them again."""
    mean = reduction == "mean"
    if backend == "torch":
        reg = reg.to(X.dtype)
        loss_t, correct = reference_loss(kind, X, y, Xq, yq, n_way, scale.to(X.dtype), label_smoothing,
                                         lam=reg if kind != "svm" else None, C_box=reg if kind == "svm" else None,
                                         dual_reg=dual_reg)
        return (loss_t.mean() if mean else loss_t), correct
    args = (X, y, Xq, yq, reg, scale, kind, n_way, label_smoothing, dual_reg, tol, max_iter, backend)
    if torch.compiler.is_compiling():
        out = convex_fwd(*args)
    elif func_transforms():
        out = _ConvexTransformable.apply(*args)
    else:
        out = (_ConvexEagerMean if mean else _ConvexEager).apply(*args)
        return out[0], out[1]
    return (out[0].mean() if mean else out[0]), out[1]


def fit(kind: str, X: Tensor, y: Tensor, reg: Tensor, n_way: int, dual_reg: float, tol: float, max_iter: int,
        backend: str) -> tuple[Tensor, Tensor]:
    """The fitted heads (W (T, C, D), b (T, C)) of validated inputs, without gradient."""
    if backend == "torch":
        reg = reg.to(X.dtype)
        return reference_weights(kind, X, y, n_way, lam=reg if kind != "svm" else None,
                                 C_box=reg if kind == "svm" else None, dual_reg=dual_reg)
    # eager: the implementation itself (the dispatcher's first call alone costs about a second)
    fit_fn = convex_fit if torch.compiler.is_compiling() else _fit_impl
    W, b, _ = fit_fn(X, y, reg, kind, n_way, dual_reg, tol, max_iter, backend)
    return W, b


__all__ = ["DEFAULTS", "KIND_CODE", "convex_bwd", "convex_fit", "convex_fwd", "fit", "head_loss"]
