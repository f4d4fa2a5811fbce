"""The batched linear-head inner loop (ANIL / Meta-SGD) as torch.library custom ops.

Forward runs K SGD steps of a linear head on T tasks in one call and keeps the
trajectory W_0 .. W_K (T, K+1, C, D): memory O(T K C D), no autograd graph of the
inner loop.  Backward is the closed-form reverse pass (Hessian-vector products and
the mixed X term, csrc/cpu/inner_loop.h), exact to second order, or first order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ._autograd import refuse_double_backward, refuse_later, scale_precomputed

_WHAT = "the fused inner loop (a Hessian of the meta-loss)"
MAX_TRITON_ROWS = 128  # support / query rows per task on the Triton backend
MAX_TRITON_CLASSES = 64


def _check(labels: tuple, **tensors) -> None:
    """The kernels read raw memory: every float tensor must be contiguous and of one
    dtype (float32 or float64), labels contiguous int64, all on the CPU.  The public
    functions guarantee this; a direct call of the op gets an error instead of a read
    past a buffer."""
    dtype = None
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor")
        if t.numel() == 0:
            continue
        if t.dtype not in _ext.DTYPE_CODE or (dtype is not None and t.dtype != dtype):
            raise TypeError(f"{name} has dtype {t.dtype}: the kernel takes one of float32/float64 for all")
        dtype = t.dtype
    for i, t in enumerate(labels):
        if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError(f"labels argument {i} must be a contiguous int64 CPU tensor, got {t.dtype}")


@torch.library.custom_op("metassl_fast::inner_loop_fwd", mutates_args=())
def inner_loop_fwd(support: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, lr_w: Tensor,
                   lr_b: Tensor, steps: int, first_order: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """support (T, S, D), labels (T, S) int64, weight (C, D), bias (C), lr_w (C, D), lr_b (C)
    -> (W_K (T, C, D), b_K (T, C), W_traj (T, K+1, C, D), b_traj (T, K+1, C))."""
    if backend == "triton":
        return _adapt_fwd_triton(support, labels, weight, bias, lr_w, lr_b, steps)
    if backend == "cuda":
        return _adapt_fwd_cuda(support, labels, weight, bias, lr_w, lr_b, steps)
    C_ext = _ext.require("_C")
    _check((labels,), support=support, weight=weight, bias=bias, lr_w=lr_w, lr_b=lr_b)
    T, S, D = support.shape
    C = weight.shape[0]
    W_traj = support.new_empty(T, steps + 1, C, D)
    b_traj = support.new_empty(T, steps + 1, C)
    C_ext.inner_loop_forward(
        dtype=_ext.DTYPE_CODE[support.dtype], X=support.data_ptr(), X_numel=support.numel(),
        y=labels.data_ptr(), y_numel=labels.numel(), W0=weight.data_ptr(), W0_numel=weight.numel(),
        b0=bias.data_ptr(), b0_numel=bias.numel(), aW=lr_w.data_ptr(), aW_numel=lr_w.numel(),
        ab=lr_b.data_ptr(), ab_numel=lr_b.numel(), W_traj=W_traj.data_ptr(), W_traj_numel=W_traj.numel(),
        b_traj=b_traj.data_ptr(), b_traj_numel=b_traj.numel(), T=T, S=S, D=D, C=C, K=steps,
        nthreads=max(1, torch.get_num_threads()))
    return W_traj[:, steps].clone(), b_traj[:, steps].clone(), W_traj, b_traj


@inner_loop_fwd.register_fake
def _(support, labels, weight, bias, lr_w, lr_b, steps, first_order, backend):
    T, _, D = support.shape
    C = weight.shape[0]
    return (support.new_empty(T, C, D), support.new_empty(T, C), support.new_empty(T, steps + 1, C, D),
            support.new_empty(T, steps + 1, C))


@torch.library.custom_op("metassl_fast::inner_loop_bwd", mutates_args=())
def inner_loop_bwd(dW_K: Tensor, db_K: Tensor, support: Tensor, labels: Tensor, lr_w: Tensor, lr_b: Tensor,
                   W_traj: Tensor, b_traj: Tensor, first_order: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (d support (T, S, D), d weight (C, D), d bias (C), d lr_w (C, D), d lr_b (C)),
    the head and lr gradients summed over tasks."""
    if backend == "triton":
        return _adapt_bwd_triton(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order)
    if backend == "cuda":
        return _adapt_bwd_cuda(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order)
    C_ext = _ext.require("_C")
    dW_K, db_K = dW_K.to(support.dtype).contiguous(), db_K.to(support.dtype).contiguous()
    _check((labels,), support=support, lr_w=lr_w, lr_b=lr_b, W_traj=W_traj, b_traj=b_traj, dW_K=dW_K,
           db_K=db_K)
    T, S, D = support.shape
    C = lr_w.shape[0]
    steps = W_traj.shape[1] - 1
    dX = torch.empty_like(support)
    dW0, daW = support.new_empty(T, C, D), support.new_empty(T, C, D)
    db0, dab = support.new_empty(T, C), support.new_empty(T, C)
    C_ext.inner_loop_backward(
        dtype=_ext.DTYPE_CODE[support.dtype], X=support.data_ptr(), X_numel=support.numel(),
        y=labels.data_ptr(), y_numel=labels.numel(), aW=lr_w.data_ptr(), aW_numel=lr_w.numel(),
        ab=lr_b.data_ptr(), ab_numel=lr_b.numel(), W_traj=W_traj.data_ptr(), W_traj_numel=W_traj.numel(),
        b_traj=b_traj.data_ptr(), b_traj_numel=b_traj.numel(), dW_K=dW_K.data_ptr(),
        dW_K_numel=dW_K.numel(), db_K=db_K.data_ptr(), db_K_numel=db_K.numel(), dX=dX.data_ptr(),
        dX_numel=dX.numel(), dW0=dW0.data_ptr(), dW0_numel=dW0.numel(), db0=db0.data_ptr(),
        db0_numel=db0.numel(), daW=daW.data_ptr(), daW_numel=daW.numel(), dab=dab.data_ptr(),
        dab_numel=dab.numel(), T=T, S=S, D=D, C=C, K=steps, first_order=first_order,
        nthreads=max(1, torch.get_num_threads()))
    return dX, dW0.sum(0), db0.sum(0), daW.sum(0), dab.sum(0)


@inner_loop_bwd.register_fake
def _(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order, backend):
    C, D = lr_w.shape
    return (torch.empty_like(support), support.new_empty(C, D), support.new_empty(C),
            support.new_empty(C, D), support.new_empty(C))


def _setup_context(ctx, inputs, output):
    support, labels, _w, _b, lr_w, lr_b, _steps, first_order, backend = inputs
    _, _, W_traj, b_traj = output
    ctx.first_order, ctx.backend = first_order, backend
    ctx.save_for_backward(support, labels, lr_w, lr_b, W_traj, b_traj)


def _backward(ctx, dW_K, db_K, _dWt, _dbt):
    support, labels, lr_w, lr_b, W_traj, b_traj = ctx.saved_tensors
    dX, dW0, db0, daW, dab = inner_loop_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj,
                                            ctx.first_order, ctx.backend)
    return dX, None, dW0, db0, daW, dab, None, None, None


torch.library.register_autograd("metassl_fast::inner_loop_fwd", _backward, setup_context=_setup_context)


torch.library.register_autograd("metassl_fast::inner_loop_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------
# The whole ANIL meta-loss in one kernel call: inner loop and query cross-entropy in
# the forward; the backward runs the kernel again with the upstream per-task weights
# and forms every gradient in that one call.  (Forming them during the forward, as
# the contrastive CPU path does, measured faster but held a second copy of dX and
# dXq: autograd copies gradients the op still references.)
# ---------------------------------------------------------------------------

def _blocks(S, Q, C):
    """(BLOCK_S, BLOCK_Q, BLOCK_C, BLOCK_D) of the Triton kernels: powers of two, at least
    16 (tl.dot's smallest tile); a small D chunk under the interpreter."""
    from .. import _backend

    def block(n):
        return max(16, 1 << (max(1, n) - 1).bit_length())

    return block(S), block(Q), block(C), 16 if _backend.interpreting() else 64


def _adapt_fwd_triton(support, labels, weight, bias, lr_w, lr_b, steps):
    from ..kernels import inner_loop as tk

    _check_anil_shapes(support, labels, support[:, :1], labels[:, :1], weight, bias, lr_w, lr_b, None)
    f32 = torch.float32
    X, W, b, aW, ab = (x.to(f32).contiguous() for x in (support, weight, bias, lr_w, lr_b))
    T, S, D = X.shape
    C = W.shape[0]
    traj = torch.empty(T, steps + 1, C, D, dtype=f32, device=X.device)
    btraj = torch.empty(T, steps + 1, C, dtype=f32, device=X.device)
    bs, _, bc, bd = _blocks(S, 1, C)
    tk.adapt_fwd_kernel[(T,)](X, labels.contiguous(), W, b, aW, ab, traj, btraj, S, D, C, steps, PRECISION="ieee",
                              BLOCK_S=bs, BLOCK_C=bc, BLOCK_D=bd, num_warps=4)
    dt = support.dtype
    return traj[:, steps].to(dt, copy=True), btraj[:, steps].to(dt, copy=True), traj.to(dt), btraj.to(dt)


def _check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, triton_caps=True):
    """The GPU kernels read these raw: -> (T, S, D, C, steps) once every shape is checked."""
    T, S, D = support.shape
    C = lr_w.shape[0]
    steps = W_traj.shape[1] - 1
    _check_anil_shapes(support, labels, support[:, :1], labels[:, :1], lr_w, lr_b, lr_w, lr_b, None,
                       triton_caps=triton_caps)
    for name, t, shape in (("dW_K", dW_K, (T, C, D)), ("db_K", db_K, (T, C)), ("W_traj", W_traj, (T, steps + 1, C, D)),
                           ("b_traj", b_traj, (T, steps + 1, C))):
        if tuple(t.shape) != shape or t.device != support.device:
            raise ValueError(f"{name} must have shape {shape} on {support.device}, got {tuple(t.shape)} on {t.device}")
    return T, S, D, C, steps


def _adapt_bwd_triton(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order):
    from ..kernels import inner_loop as tk

    T, S, D, C, steps = _check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj)
    f32 = torch.float32
    X, aW, ab, Wt, bt, dWK, dbK = (x.to(f32).contiguous() for x in (support, lr_w, lr_b, W_traj, b_traj, dW_K, db_K))
    dev = X.device
    dX = torch.empty_like(X)
    dW0, daW = torch.empty(T, C, D, dtype=f32, device=dev), torch.empty(T, C, D, dtype=f32, device=dev)
    db0, dab = torch.empty(T, C, dtype=f32, device=dev), torch.empty(T, C, dtype=f32, device=dev)
    bs, _, bc, bd = _blocks(S, 1, C)
    tk.adapt_bwd_kernel[(T,)](X, labels.contiguous(), aW, ab, Wt, bt, dWK, dbK, dX, dW0, db0, daW, dab, S, D, C, steps,
                              FIRST_ORDER=first_order, PRECISION="ieee", BLOCK_S=bs, BLOCK_C=bc, BLOCK_D=bd,
                              num_warps=4)
    dt = support.dtype
    return dX.to(dt), dW0.sum(0).to(dt), db0.sum(0).to(dt), daW.sum(0).to(dt), dab.sum(0).to(dt)


def _check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight,
                       triton_caps=True):
    """The C++ kernel checks every buffer's size itself; the Triton kernel cannot, so a
    direct call of the op is checked here: shapes, one device, float features, int64
    labels in [0, C)."""
    if support.dim() != 3 or query.dim() != 3 or weight.dim() != 2:
        raise ValueError("support (T, S, D), query (T, Q, D) and weight (C, D) have the wrong rank")
    T, S, D = support.shape
    C = weight.shape[0]
    want = {"labels": (labels, (T, S)), "query": (query, (T, query.shape[1], D)),
            "query_labels": (query_labels, (T, query.shape[1])), "weight": (weight, (C, D)), "bias": (bias, (C,)),
            "lr_w": (lr_w, (C, D)), "lr_b": (lr_b, (C,))}
    if task_weight is not None:
        want["task_weight"] = (task_weight, (T,))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != support.device:
            raise ValueError(f"{name} is on {t.device} but support is on {support.device}")
    if min(T, S, D, C, query.shape[1]) < 1:
        raise ValueError(f"every dimension must be >= 1, got T={T} S={S} D={D} C={C} Q={query.shape[1]}")
    # the (S x C) and (Q x C) blocks live in registers and shared memory: beyond these the
    # backward kernel does not fit an A100's shared memory (the CUDA kernel checks its own)
    caps = (("support", S, MAX_TRITON_ROWS), ("query", query.shape[1], MAX_TRITON_ROWS),
            ("weight", C, MAX_TRITON_CLASSES)) if triton_caps else ()
    for name, n, cap in caps:
        if n > cap:
            raise ValueError(f"{name}: backend='triton' takes at most {cap} {'classes' if name == 'weight' else 'rows'}"
                             f" per task, got {n}; use backend='cpu' or 'torch'")
    for name, y in (("labels", labels), ("query_labels", query_labels)):
        if y.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {y.dtype}")
        if bool((y < 0).any() | (y >= C).any()):
            raise ValueError(f"{name} must be in [0, {C})")


def _anil_call_triton(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps,
                      first_order, compute_grad):
    """kernels/inner_loop.py: one program per task; float32 inside (float64 inputs are
    rounded), results in the input dtype."""
    from ..kernels import inner_loop as tk

    _check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight)
    dtype = support.dtype
    f32 = torch.float32
    X, Xq, W, b, aW, ab = (x.to(f32).contiguous() for x in (support, query, weight, bias, lr_w, lr_b))
    y, yq = labels.contiguous(), query_labels.contiguous()
    T, S, D = X.shape
    Q, C = Xq.shape[1], W.shape[0]
    dev = X.device
    loss = torch.empty(T, dtype=f32, device=dev)
    traj = torch.empty(T, steps + 1, C, D, dtype=f32, device=dev)
    btraj = torch.empty(T, steps + 1, C, dtype=f32, device=dev)
    if compute_grad:
        tw = task_weight.to(f32).contiguous()
        dX, dXq = torch.empty_like(X), torch.empty_like(Xq)
        dW0, daW = torch.empty(T, C, D, dtype=f32, device=dev), torch.empty(T, C, D, dtype=f32, device=dev)
        db0, dab = torch.empty(T, C, dtype=f32, device=dev), torch.empty(T, C, dtype=f32, device=dev)
    else:
        tw = dX = dXq = dW0 = daW = db0 = dab = loss  # not touched without COMPUTE_GRAD

    bs, bq, bc, bd = _blocks(S, Q, C)
    tk.anil_kernel[(T,)](X, y, Xq, yq, W, b, aW, ab, tw, loss, traj, btraj, dX, dXq, dW0, db0, daW, dab,
                         S, Q, D, C, steps, COMPUTE_GRAD=compute_grad, FIRST_ORDER=first_order,
                         PRECISION="ieee", BLOCK_S=bs, BLOCK_Q=bq, BLOCK_C=bc, BLOCK_D=bd, num_warps=4)
    loss = loss.to(dtype)
    if not compute_grad:
        return loss, None
    return loss, (dX.to(dtype), dXq.to(dtype), dW0.sum(0).to(dtype), db0.sum(0).to(dtype),
                  daW.sum(0).to(dtype), dab.sum(0).to(dtype))


# ---------------------------------------------------------------------------
# CUDA C++ backend (csrc/cuda/inner_loop.cu): one block per task, float32 inside, the
# same weight-space recursion as the CPU kernel; the trajectory in a global buffer.
# ---------------------------------------------------------------------------

def _cuda_inner(mode, X, y, W_traj, b_traj, T, S, D, C, K, *, Xq=None, yq=None, W0=None, b0=None, aW, ab,
                tw=None, dWK=None, dbK=None, loss=None, dX=None, dXq=None, dW0=None, db0=None, daW=None, dab=None,
                grad=False, first_order=False, need_dlr=False):
    from . import contrastive as _c

    none = X.new_empty(0)
    bufs = dict(X=X, y=y, Xq=Xq, yq=yq, W0=W0, b0=b0, aW=aW, ab=ab, task_weight=tw, dWK=dWK, dbK=dbK, loss=loss,
                dX=dX, dXq=dXq, dW0=dW0, db0=db0, daW=daW, dab=dab, W_traj=W_traj, b_traj=b_traj)
    _c.cuda_call("inner_loop", X.device, mode=mode, **_c._cuda_args(**{k: (none if v is None else v)
                                                                      for k, v in bufs.items()}),
                 T=T, S=S, Q=0 if Xq is None else Xq.shape[1], D=D, C=C, K=K, grad=grad, first_order=first_order,
                 need_dlr=need_dlr)


def _f32(*xs):
    return tuple(x.to(torch.float32).contiguous() for x in xs)


def _anil_call_cuda(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps,
                    first_order, compute_grad, need_dlr):
    _check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight,
                       triton_caps=False)
    dtype = support.dtype
    X, Xq, W, b, aW, ab = _f32(support, query, weight, bias, lr_w, lr_b)
    T, S, D = X.shape
    C = W.shape[0]
    new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=X.device)  # noqa: E731
    loss = new(T)
    traj, btraj = new(T, steps + 1, C, D), new(T, steps + 1, C)
    grads = {}
    if compute_grad:
        grads = dict(tw=_f32(task_weight)[0], dX=torch.empty_like(X), dXq=torch.empty_like(Xq), dW0=new(T, C, D),
                     db0=new(T, C))
        if need_dlr:
            grads.update(daW=new(T, C, D), dab=new(T, C))
    _cuda_inner(0, X, labels.contiguous(), traj, btraj, T, S, D, C, steps, Xq=Xq, yq=query_labels.contiguous(),
                W0=W, b0=b, aW=aW, ab=ab, loss=loss, grad=compute_grad, first_order=first_order, need_dlr=need_dlr,
                **grads)
    if not compute_grad:
        return loss.to(dtype), None
    dlw = grads["daW"].sum(0) if need_dlr else W.new_zeros(C, D)
    dlb = grads["dab"].sum(0) if need_dlr else W.new_zeros(C)
    out = (grads["dX"], grads["dXq"], grads["dW0"].sum(0), grads["db0"].sum(0), dlw, dlb)
    return loss.to(dtype), tuple(g.to(dtype) for g in out)


def _adapt_fwd_cuda(support, labels, weight, bias, lr_w, lr_b, steps):
    _check_anil_shapes(support, labels, support[:, :1], labels[:, :1], weight, bias, lr_w, lr_b, None,
                       triton_caps=False)
    X, W, b, aW, ab = _f32(support, weight, bias, lr_w, lr_b)
    T, S, D = X.shape
    C = W.shape[0]
    traj = torch.empty(T, steps + 1, C, D, dtype=torch.float32, device=X.device)
    btraj = torch.empty(T, steps + 1, C, dtype=torch.float32, device=X.device)
    _cuda_inner(1, X, labels.contiguous(), traj, btraj, T, S, D, C, steps, W0=W, b0=b, aW=aW, ab=ab)
    dt = support.dtype
    return traj[:, steps].to(dt, copy=True), btraj[:, steps].to(dt, copy=True), traj.to(dt), btraj.to(dt)


def _adapt_bwd_cuda(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order):
    T, S, D, C, steps = _check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, triton_caps=False)
    X, aW, ab, Wt, bt, dWK, dbK = _f32(support, lr_w, lr_b, W_traj, b_traj, dW_K, db_K)
    new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=X.device)  # noqa: E731
    dX, dW0, db0, daW, dab = torch.empty_like(X), new(T, C, D), new(T, C), new(T, C, D), new(T, C)
    _cuda_inner(2, X, labels.contiguous(), Wt, bt, T, S, D, C, steps, aW=aW, ab=ab, dWK=dWK, dbK=dbK, dX=dX,
                dW0=dW0, db0=db0, daW=daW, dab=dab, grad=True, first_order=first_order, need_dlr=True)
    dt = support.dtype
    return dX.to(dt), dW0.sum(0).to(dt), db0.sum(0).to(dt), daW.sum(0).to(dt), dab.sum(0).to(dt)


def _anil_call(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps,
               first_order, compute_grad, backend="cpu", need_dlr=True, defer=None):
    """-> (loss (T,), None or the gradients (dX, dXq, dW, db, d lr_w, d lr_b)); without
    need_dlr the step sizes' gradients are zeros (and the C++ kernel may take its
    support-space path, inner_loop.cpp gram_task)."""
    if backend == "triton":
        return _anil_call_triton(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight,
                                 steps, first_order, compute_grad)
    if backend == "cuda":
        return _anil_call_cuda(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, steps,
                               first_order, compute_grad, need_dlr)
    C_ext = _ext.require("_C")
    _check((labels, query_labels), support=support, query=query, weight=weight, bias=bias, lr_w=lr_w,
           lr_b=lr_b, **({"task_weight": task_weight} if task_weight is not None else {}))
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
        dX, dXq = torch.empty_like(support), torch.empty_like(query)
        dW0, db0 = support.new_empty(T, C, D), support.new_empty(T, C)
        daW, dab = (support.new_empty(T, C, D), support.new_empty(T, C)) if need_dlr else (none, none)
    else:
        dX = dXq = dW0 = daW = db0 = dab = task_weight = none
    C_ext.anil_loss(
        dtype=_ext.DTYPE_CODE[support.dtype], X=support.data_ptr(), X_numel=support.numel(),
        y=labels.data_ptr(), y_numel=labels.numel(), Xq=query.data_ptr(), Xq_numel=query.numel(),
        yq=query_labels.data_ptr(), yq_numel=query_labels.numel(), W0=weight.data_ptr(),
        W0_numel=weight.numel(), b0=bias.data_ptr(), b0_numel=bias.numel(), aW=lr_w.data_ptr(),
        aW_numel=lr_w.numel(), ab=lr_b.data_ptr(), ab_numel=lr_b.numel(),
        task_weight=task_weight.data_ptr(), task_weight_numel=task_weight.numel(), loss=loss.data_ptr(),
        loss_numel=loss.numel(), dX=dX.data_ptr(), dX_numel=dX.numel(), dXq=dXq.data_ptr(),
        dXq_numel=dXq.numel(), dW0=dW0.data_ptr(), dW0_numel=dW0.numel(), db0=db0.data_ptr(),
        db0_numel=db0.numel(), daW=daW.data_ptr(), daW_numel=daW.numel(), dab=dab.data_ptr(),
        dab_numel=dab.numel(), T=T, S=S, Q=Q, D=D, C=C, K=steps, first_order=first_order,
        compute_grad=compute_grad, need_dlr=need_dlr, defer=defer is not None, coef=coef.data_ptr(),
        coef_numel=coef.numel(), lamK=lamK.data_ptr(), lamK_numel=lamK.numel(), dzqT=dzqT.data_ptr(),
        dzqT_numel=dzqT.numel(), WK=WK.data_ptr(), WK_numel=WK.numel(), nthreads=max(1, torch.get_num_threads()))
    if not compute_grad:
        return loss, None
    if need_dlr:
        dlw, dlb = daW.sum(0), dab.sum(0)
    else:
        dlw, dlb = support.new_zeros(C, D), support.new_zeros(C)
    return loss, (dX, dXq, dW0.sum(0), db0.sum(0), dlw, dlb)


def _grad_fakes(support, query, weight):
    C, D = weight.shape
    shapes = (support.shape, query.shape, (C, D), (C,), (C, D), (C,))
    return tuple(support.new_empty(shape) for shape in shapes)


@torch.library.custom_op("metassl_fast::anil_loss_fwd", mutates_args=())
def anil_loss_fwd(support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, weight: Tensor,
                  bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool, reduction: str,
                  backend: str) -> Tensor:
    """-> the loss: a scalar ("mean" over queries, then tasks) or (T,) ("none")."""
    loss_t, _ = _anil_call(support, labels, query, query_labels, weight, bias, lr_w, lr_b, None, steps,
                           first_order, False, backend)
    return loss_t.mean() if reduction == "mean" else loss_t


@anil_loss_fwd.register_fake
def _(support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, reduction,
      backend):
    return support.new_empty(() if reduction == "mean" else (support.shape[0],))


@torch.library.custom_op("metassl_fast::anil_loss_bwd", mutates_args=())
def anil_loss_bwd(grad: Tensor, support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor,
                  weight: Tensor, bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool,
                  reduction: str, backend: str, need_dlr: bool = True
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward: gradients of sum_t w_t loss_t with w = grad (per task) or grad / T.
    need_dlr=False: the step sizes need no gradient (zeros are returned for them)."""
    T = support.shape[0]
    weights = (grad.to(support.dtype).contiguous() if reduction == "none"
               else (grad.to(support.dtype) / T).expand(T).contiguous())
    _, grads = _anil_call(support, labels, query, query_labels, weight, bias, lr_w, lr_b, weights, steps,
                          first_order, True, backend, need_dlr)
    return grads


@anil_loss_bwd.register_fake
def _(grad, support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, reduction,
      backend, need_dlr=True):
    return _grad_fakes(support, query, weight)


def _anil_setup(ctx, inputs, output):
    (support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, reduction,
     backend) = inputs
    ctx.steps, ctx.first_order, ctx.reduction, ctx.backend = steps, first_order, reduction, backend
    ctx.save_for_backward(support, labels, query, query_labels, weight, bias, lr_w, lr_b)


def _anil_backward(ctx, grad):
    need_dlr = bool(ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
    dX, dXq, dW, db, dlw, dlb = anil_loss_bwd(grad, *ctx.saved_tensors, ctx.steps, ctx.first_order,
                                              ctx.reduction, ctx.backend, need_dlr)
    return dX, None, dXq, None, dW, db, dlw, dlb, None, None, None, None


torch.library.register_autograd("metassl_fast::anil_loss_fwd", _anil_backward, setup_context=_anil_setup)
torch.library.register_autograd("metassl_fast::anil_loss_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------
# One pass for training (reduction "mean", a step size constant along D that needs no
# gradient, the CPU kernel): the forward runs the support-space kernel with the
# gradient, keeps dW/db (C x D) and the per-task coefficients of dX and dXq (O(T (S^2
# + C D)), csrc/cpu/inner_loop.h AnilDeferred), and the backward only forms dX and dXq
# from them, scaled by grad_output: no second run of the inner loop, and the two big
# gradients are allocated once, in the backward, where autograd takes them as .grad.
# ---------------------------------------------------------------------------

def _train_impl(support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, weight: Tensor,
                    bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (mean loss (), dW (C, D), db (C) for grad_output = 1, coef (T, S + 2C, S),
    lamK (T, C, D), dzqT (T, C, Q), WK (T, C, D)): the last four feed anil_apply."""
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    defer = (support.new_empty(T, S + 2 * C, S), support.new_empty(T, C, D), support.new_empty(T, C, Q),
             support.new_empty(T, C, D))
    weights = support.new_full((T,), 1.0 / T)
    loss_t, (_, _, dW, db, _, _) = _anil_call(support, labels, query, query_labels, weight, bias, lr_w, lr_b,
                                             weights, steps, first_order, True, "cpu", False, defer)
    return (loss_t.mean(), dW, db) + defer


anil_loss_train = torch.library.custom_op("metassl_fast::anil_loss_train", _train_impl, mutates_args=())


@anil_loss_train.register_fake
def _(support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order):
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    return (support.new_empty(()), support.new_empty(C, D), support.new_empty(C),
            support.new_empty(T, S + 2 * C, S), support.new_empty(T, C, D), support.new_empty(T, C, Q),
            support.new_empty(T, C, D))


def _apply_impl(grad: Tensor, support: Tensor, query: Tensor, weight: Tensor, coef: Tensor, lamK: Tensor,
               dzqT: Tensor, WK: Tensor) -> tuple[Tensor, Tensor]:
    """-> (d support (T, S, D), d query (T, Q, D)) of anil_loss_train's loss, times grad ()."""
    C_ext = _ext.require("_C")
    _check((), support=support, query=query, weight=weight, coef=coef, lamK=lamK, dzqT=dzqT, WK=WK)
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    dX, dXq = torch.empty_like(support), torch.empty_like(query)
    C_ext.anil_apply(
        dtype=_ext.DTYPE_CODE[support.dtype], X=support.data_ptr(), X_numel=support.numel(), W0=weight.data_ptr(),
        W0_numel=weight.numel(), coef=coef.data_ptr(), coef_numel=coef.numel(), lamK=lamK.data_ptr(),
        lamK_numel=lamK.numel(), dzqT=dzqT.data_ptr(), dzqT_numel=dzqT.numel(), WK=WK.data_ptr(),
        WK_numel=WK.numel(), g=float(grad), dX=dX.data_ptr(), dX_numel=dX.numel(), dXq=dXq.data_ptr(),
        dXq_numel=dXq.numel(), T=T, S=S, Q=Q, D=D, C=C, nthreads=max(1, torch.get_num_threads()))
    return dX, dXq


anil_apply = torch.library.custom_op("metassl_fast::anil_apply", _apply_impl, mutates_args=())


@anil_apply.register_fake
def _(grad, support, query, weight, coef, lamK, dzqT, WK):
    return torch.empty_like(support), torch.empty_like(query)


def _train_setup(ctx, inputs, output):
    support, _labels, query, _ql, weight = inputs[:5]
    _, dW, db, coef, lamK, dzqT, WK = output
    ctx.mark_non_differentiable(*output[1:])  # internal state for the backward, not results
    ctx.save_for_backward(support, query, weight, dW, db, coef, lamK, dzqT, WK)


def _train_backward(ctx, grad, *_unused, apply=anil_apply):
    support, query, weight, dW, db, coef, lamK, dzqT, WK = ctx.saved_tensors
    need = ctx.needs_input_grad
    dX = dXq = None
    if need[0] or need[2]:
        dX, dXq = apply(grad, support, query, weight, coef, lamK, dzqT, WK)
    dW, db = scale_precomputed((dW, db), grad, (need[4], need[5]))
    # create_graph=True: these first-order gradients are usable, differentiating them raises
    dX, dXq, dW, db = refuse_later(_WHAT, (support, query, weight), dX if need[0] else None,
                                   dXq if need[2] else None, dW, db)
    return (dX, None, dXq, None, dW, db, None, None, None, None)


torch.library.register_autograd("metassl_fast::anil_loss_train", _train_backward, setup_context=_train_setup)
torch.library.register_autograd("metassl_fast::anil_apply", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


class _AnilTrainEager(torch.autograd.Function):
    """anil_loss_train's forward and backward without the dispatcher: in eager mode the
    custom op's Python dispatch costs ~0.2 ms a call here, a tenth of the whole step at
    the benchmark's shape.  Same implementation functions; torch.compile gets the op."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _train_impl(*inputs)
        _train_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad, *_unused):
        return _train_backward(ctx, grad, apply=_apply_impl)


def anil_loss_train_call(*inputs) -> Tensor:
    """The one-pass training loss: the custom op while torch.compile traces, the
    equivalent autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return anil_loss_train(*inputs)[0]
    return _AnilTrainEager.apply(*inputs)[0]
