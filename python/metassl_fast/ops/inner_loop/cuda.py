"""CUDA C++ backend of the inner-loop op (csrc/cuda/inner_loop.cu): one block per task,
float32 inside, the same weight-space recursion as the CPU kernel; the trajectory in a
global buffer."""
from __future__ import annotations

import torch

from .._common import ptr_args, cuda_call
from ._shared import check_adapt_bwd, check_adapt_fwd, check_anil_shapes, f32


def _inner(mode, X, y, W_traj, b_traj, T, S, D, C, K, *, Xq=None, yq=None, W0=None, b0=None, aW, ab,
           tw=None, dWK=None, dbK=None, loss=None, dX=None, dXq=None, dW0=None, db0=None, daW=None, dab=None,
           correct=None, grad=False, first_order=False, need_dlr=False):
    """_C_cuda.inner_loop in mode 0 (the ANIL loss), 1 (adapt forward) or 2 (adapt backward)."""
    none = X.new_empty(0)
    bufs = dict(X=X, y=y, Xq=Xq, yq=yq, W0=W0, b0=b0, aW=aW, ab=ab, task_weight=tw, dWK=dWK, dbK=dbK, loss=loss,
                dX=dX, dXq=dXq, dW0=dW0, db0=db0, daW=daW, dab=dab, W_traj=W_traj, b_traj=b_traj, correct=correct)
    cuda_call("inner_loop", X.device, mode=mode, **ptr_args(**{k: (none if v is None else v) for k, v in bufs.items()}),
              T=T, S=S, Q=0 if Xq is None else Xq.shape[1], D=D, C=C, K=K, grad=grad, first_order=first_order,
              need_dlr=need_dlr)


def _new(like):
    return lambda *shape: torch.empty(*shape, dtype=torch.float32, device=like.device)


def adapt_forward(support, labels, weight, bias, lr_w, lr_b, steps):
    check_adapt_fwd(support, labels, weight, bias, lr_w, lr_b, triton_caps=False)
    X, W, b, aW, ab = f32(support, weight, bias, lr_w, lr_b)
    T, S, D = X.shape
    C = W.shape[0]
    new = _new(X)
    traj, btraj = new(T, steps + 1, C, D), new(T, steps + 1, C)
    _inner(1, X, labels.contiguous(), traj, btraj, T, S, D, C, steps, W0=W, b0=b, aW=aW, ab=ab)
    dt = support.dtype
    return traj[:, steps].to(dt, copy=True), btraj[:, steps].to(dt, copy=True), traj.to(dt), btraj.to(dt)


def adapt_backward(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order):
    T, S, D, C, steps = check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, triton_caps=False)
    X, aW, ab, Wt, bt, dWK, dbK = f32(support, lr_w, lr_b, W_traj, b_traj, dW_K, db_K)
    new = _new(X)
    dX, dW0, db0, daW, dab = torch.empty_like(X), new(T, C, D), new(T, C), new(T, C, D), new(T, C)
    _inner(2, X, labels.contiguous(), Wt, bt, T, S, D, C, steps, aW=aW, ab=ab, dWK=dWK, dbK=dbK, dX=dX,
           dW0=dW0, db0=db0, daW=daW, dab=dab, grad=True, first_order=first_order, need_dlr=True)
    dt = support.dtype
    return dX.to(dt), dW0.sum(0).to(dt), db0.sum(0).to(dt), daW.sum(0).to(dt), dab.sum(0).to(dt)


def anil(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps, first_order,
         compute_grad, need_dlr=True, correct=None):
    """-> (loss (T,), None or (dX, dXq, dW, db, d lr_w, d lr_b)); correct (T,) or None: gets
    each task's number of correctly classified queries."""
    check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight,
                      triton_caps=False)
    dtype = support.dtype
    X, Xq, W, b, aW, ab = f32(support, query, weight, bias, lr_w, lr_b)
    T, S, D = X.shape
    C = W.shape[0]
    new = _new(X)
    loss, hits = new(T), new(T)
    traj, btraj = new(T, steps + 1, C, D), new(T, steps + 1, C)
    grads = {}
    if compute_grad:
        grads = dict(tw=f32(task_weight)[0], dX=torch.empty_like(X), dXq=torch.empty_like(Xq), dW0=new(T, C, D),
                     db0=new(T, C))
        if need_dlr:
            grads.update(daW=new(T, C, D), dab=new(T, C))
    _inner(0, X, labels.contiguous(), traj, btraj, T, S, D, C, steps, Xq=Xq, yq=query_labels.contiguous(),
           W0=W, b0=b, aW=aW, ab=ab, loss=loss, correct=hits, grad=compute_grad, first_order=first_order,
           need_dlr=need_dlr, **grads)
    if correct is not None:
        correct.copy_(hits)
    if not compute_grad:
        return loss.to(dtype), None
    dlw = grads["daW"].sum(0) if need_dlr else W.new_zeros(C, D)
    dlb = grads["dab"].sum(0) if need_dlr else W.new_zeros(C)
    out = (grads["dX"], grads["dXq"], grads["dW0"].sum(0), grads["db0"].sum(0), dlw, dlb)
    return loss.to(dtype), tuple(g.to(dtype) for g in out)
