"""The batched linear-head inner loop (ANIL / Meta-SGD): torch.library custom ops, their
fakes and autograd, and the entries of the public layer (adapt, anil).

    per task:  Z = X W^T + b,  P = softmax(Z),  W_{k+1} = W_k - lr_w (P - Y)^T X / S, b likewise
    ANIL loss: CE(Xq W_K^T + b_K, yq), averaged over queries, then tasks

Ops: inner_loop_fwd / _bwd (adapt: the trajectory W_0 .. W_K (T, K+1, C, D) is kept,
memory O(T K C D), no autograd graph of the inner loop; backward is the closed-form
reverse pass, exact to second order, or first order); anil_loss_fwd / _bwd (the whole
meta-loss in one kernel call, the backward runs it again with the upstream per-task
weights and forms every gradient in that one call); anil_loss_train / anil_apply (the
one-pass training loss of the CPU kernel, below).

Backends, one contract (adapt_forward, adapt_backward, anil), one file each: cpu.py
(csrc/cpu/inner_loop.cpp), triton.py (kernels/inner_loop.py), cuda.py
(csrc/cuda/inner_loop.cu); backend="torch" is reference/inner_loop.py, the per-task
autograd loop, outside the custom ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...reference.inner_loop import adapt_reference
from .._common import (backend_module, backward_op, call_op, eager_function, func_transforms, one_device,
                       refuse_later, register_backward_op, scale_precomputed, transformable)
from ._shared import check_op_sizes

_WHAT = "the fused inner loop (a Hessian of the meta-loss)"


def _impl(backend: str):
    return backend_module(__package__, "inner_loop", backend)


@torch.library.custom_op("metassl_fast::inner_loop_fwd", mutates_args=())
def inner_loop_fwd(support: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, lr_w: Tensor,
                   lr_b: Tensor, steps: int, first_order: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """support (T, S, D), labels (T, S) int64, weight (C, D), bias (C), lr_w (C, D), lr_b (C)
    -> (W_K (T, C, D), b_K (T, C), W_traj (T, K+1, C, D), b_traj (T, K+1, C))."""
    one_device("inner_loop_fwd", support, labels, weight, bias, lr_w, lr_b)
    check_op_sizes(support, weight, steps)
    return _impl(backend).adapt_forward(support, labels, weight, bias, lr_w, lr_b, steps)


@inner_loop_fwd.register_fake
def _(support, labels, weight, bias, lr_w, lr_b, steps, first_order, backend):
    one_device("inner_loop_fwd", support, labels, weight, bias, lr_w, lr_b)
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
    one_device("inner_loop_bwd", dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj)
    return _impl(backend).adapt_backward(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order)


@inner_loop_bwd.register_fake
def _(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, first_order, backend):
    one_device("inner_loop_bwd", dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj)
    C, D = lr_w.shape
    return (torch.empty_like(support), support.new_empty(C, D), support.new_empty(C),
            support.new_empty(C, D), support.new_empty(C))


def _adapt_setup(ctx, inputs, output):
    support, labels, _w, _b, lr_w, lr_b, _steps, first_order, backend = inputs
    _, _, W_traj, b_traj = output
    ctx.first_order, ctx.backend = first_order, backend
    ctx.save_for_backward(support, labels, lr_w, lr_b, W_traj, b_traj)


def _adapt_backward(ctx, dW_K, db_K, _dWt, _dbt):
    support, labels, lr_w, lr_b, W_traj, b_traj = ctx.saved_tensors
    dX, dW0, db0, daW, dab = backward_op(inner_loop_bwd, _WHAT, dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj,
                                            ctx.first_order, ctx.backend)
    return dX, None, dW0, db0, daW, dab, None, None, None


torch.library.register_autograd("metassl_fast::inner_loop_fwd", _adapt_backward, setup_context=_adapt_setup)
_AdaptTransformable = transformable(torch.ops.metassl_fast.inner_loop_fwd, _adapt_setup, _adapt_backward,
                                   "inner_loop_fwd")
register_backward_op("metassl_fast::inner_loop_bwd", _WHAT)


def _grad_fakes(support, query, weight):
    C, D = weight.shape
    shapes = (support.shape, query.shape, (C, D), (C,), (C, D), (C,))
    return tuple(support.new_empty(shape) for shape in shapes)


@torch.library.custom_op("metassl_fast::anil_loss_fwd", mutates_args=())
def anil_loss_fwd(support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, weight: Tensor,
                  bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool, reduction: str,
                  backend: str) -> tuple[Tensor, Tensor]:
    """-> (the loss: a scalar ("mean" over queries, then tasks) or (T,) ("none"); correct
    (T,): each task's number of queries the adapted head classifies right, from the
    logits the loss forms anyway; not differentiable)."""
    one_device("anil_loss_fwd", support, labels, query, query_labels, weight, bias, lr_w, lr_b)
    check_op_sizes(support, weight, steps)
    correct = support.new_empty(support.shape[0])  # every task writes its count
    loss_t, _ = _impl(backend).anil(support, labels, query, query_labels, weight, bias, lr_w, lr_b, None, steps,
                                    first_order, False, True, correct)
    return (loss_t.mean() if reduction == "mean" else loss_t), correct


@anil_loss_fwd.register_fake
def _(support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, reduction,
      backend):
    one_device("anil_loss_fwd", support, labels, query, query_labels, weight, bias, lr_w, lr_b)
    return support.new_empty(() if reduction == "mean" else (support.shape[0],)), support.new_empty(support.shape[0])


@torch.library.custom_op("metassl_fast::anil_loss_bwd", mutates_args=())
def anil_loss_bwd(grad: Tensor, support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor,
                  weight: Tensor, bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool,
                  reduction: str, backend: str, need_dlr: bool = True
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward: gradients of sum_t w_t loss_t with w = grad (per task) or grad / T.
    need_dlr=False: the step sizes need no gradient (zeros are returned for them)."""
    one_device("anil_loss_bwd", grad, support, labels, query, query_labels, weight, bias, lr_w, lr_b)
    check_op_sizes(support, weight, steps)
    T = support.shape[0]
    weights = (grad.to(support.dtype).contiguous() if reduction == "none"
               else (grad.to(support.dtype) / T).expand(T).contiguous())
    _, grads = _impl(backend).anil(support, labels, query, query_labels, weight, bias, lr_w, lr_b, weights, steps,
                                   first_order, True, need_dlr)
    return grads


@anil_loss_bwd.register_fake
def _(grad, support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, reduction,
      backend, need_dlr=True):
    one_device("anil_loss_bwd", grad, support, labels, query, query_labels, weight, bias, lr_w, lr_b)
    return _grad_fakes(support, query, weight)


def _anil_setup(ctx, inputs, output):
    (support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, reduction,
     backend) = inputs
    ctx.steps, ctx.first_order, ctx.reduction, ctx.backend = steps, first_order, reduction, backend
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(support, labels, query, query_labels, weight, bias, lr_w, lr_b)


def _anil_backward(ctx, grad, _grad_correct):
    need_dlr = bool(ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
    dX, dXq, dW, db, dlw, dlb = backward_op(anil_loss_bwd, _WHAT, grad, *ctx.saved_tensors, ctx.steps, ctx.first_order,
                                              ctx.reduction, ctx.backend, need_dlr)
    return dX, None, dXq, None, dW, db, dlw, dlb, None, None, None, None


torch.library.register_autograd("metassl_fast::anil_loss_fwd", _anil_backward, setup_context=_anil_setup)
_AnilTransformable = transformable(torch.ops.metassl_fast.anil_loss_fwd, _anil_setup, _anil_backward, "anil_loss_fwd")
register_backward_op("metassl_fast::anil_loss_bwd", _WHAT)


# ---------------------------------------------------------------------------
# One pass for training (reduction "mean", a step size constant along D that needs no
# gradient, the CPU kernel): the forward runs the support-space kernel with the
# gradient, keeps dW/db (C x D) and the per-task coefficients of dX and dXq (O(T (S^2
# + C D)), csrc/cpu/inner_loop.h AnilDeferred), and the backward only forms dX and dXq
# from them, scaled by grad_output: no second run of the inner loop, and the two big
# gradients are allocated once, in the backward, where autograd takes them as .grad.
# (Forming them during the forward measured faster but held a second copy of dX and
# dXq: autograd copies gradients the op still references.)
# ---------------------------------------------------------------------------

def _train_impl(support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, weight: Tensor,
                bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (mean loss (), dW (C, D), db (C) for grad_output = 1, coef (T, S + 2C, S),
    lamK (T, C, D), dzqT (T, C, Q), WK (T, C, D), correct (T,)): coef .. WK feed
    anil_apply; correct counts each task's correctly classified queries."""
    one_device("anil_loss_train", support, labels, query, query_labels, weight, bias, lr_w, lr_b)
    check_op_sizes(support, weight, steps)
    return _train_run(support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order,
                      _impl("cpu").anil)


def _train_run(support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order, run):
    """_train_impl after its checks; run: the CPU backend's anil (checked) or anil_unchecked."""
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    defer = (support.new_empty(T, S + 2 * C, S), support.new_empty(T, C, D), support.new_empty(T, C, Q),
             support.new_empty(T, C, D))
    weights = support.new_full((T,), 1.0 / T)
    correct = support.new_empty(T)  # every task writes its count
    loss_t, (_, _, dW, db, _, _) = run(support, labels, query, query_labels, weight, bias, lr_w, lr_b, weights, steps,
                                       first_order, True, False, correct, defer)
    return (loss_t.mean(), dW, db) + defer + (correct,)


anil_loss_train = torch.library.custom_op("metassl_fast::anil_loss_train", _train_impl, mutates_args=())


@anil_loss_train.register_fake
def _(support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order):
    one_device("anil_loss_train", support, labels, query, query_labels, weight, bias, lr_w, lr_b)
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    return (support.new_empty(()), support.new_empty(C, D), support.new_empty(C),
            support.new_empty(T, S + 2 * C, S), support.new_empty(T, C, D), support.new_empty(T, C, Q),
            support.new_empty(T, C, D), support.new_empty(T))


def _apply_impl(grad: Tensor, support: Tensor, query: Tensor, weight: Tensor, coef: Tensor, lamK: Tensor,
                dzqT: Tensor, WK: Tensor) -> tuple[Tensor, Tensor]:
    """-> (d support (T, S, D), d query (T, Q, D)) of anil_loss_train's loss, times grad ()."""
    one_device("anil_apply", grad, support, query, weight, coef, lamK, dzqT, WK)
    return _impl("cpu").apply(grad, support, query, weight, coef, lamK, dzqT, WK)


anil_apply = torch.library.custom_op("metassl_fast::anil_apply", _apply_impl, mutates_args=())


@anil_apply.register_fake
def _(grad, support, query, weight, coef, lamK, dzqT, WK):
    one_device("anil_apply", grad, support, query, weight, coef, lamK, dzqT, WK)
    return torch.empty_like(support), torch.empty_like(query)


def _train_setup(ctx, inputs, output):
    support, _labels, query, _ql, weight = inputs[:5]
    _, dW, db, coef, lamK, dzqT, WK, _correct = output
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
register_backward_op("metassl_fast::anil_apply", _WHAT)


# anil_loss_train's forward and backward without the dispatcher and without the Python
# checks of a direct op call (the entry's inputs come from meta.anil.prepared, which
# ensures what they check; the C++ side checks every size and label): in eager mode the
# custom op's dispatch cost ~0.2 ms a call, and each layer of checks tens of microseconds
# at T=1 (bench/RESULTS.md, fixed per-call cost).  Same kernels and autograd formula;
# torch.compile gets the op.  (Its type name holds "_AnilTrainEager": the tests tell the
# one-pass path by its grad_fn.)
_AnilTrainEager = eager_function(
    lambda *inputs: _train_run(*inputs, _impl("cpu").anil_unchecked), _train_setup,
    lambda ctx, grad, *_unused: _train_backward(ctx, grad, apply=_impl("cpu").apply_unchecked), "_AnilTrainEager")


# ---------------------------------------------------------------------------
# the entries of the public layer: route once, then one op call
# ---------------------------------------------------------------------------

def adapt(support: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, lr_w: Tensor, lr_b: Tensor, steps: int,
          first_order: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The adapted heads (T, C, D), (T, C) of validated inputs (in the accumulation dtype,
    contiguous) on the resolved backend."""
    if steps == 0:  # no inner step: the support does not enter (d support is 0, not 0 * inf = NaN)
        support = support.detach()
    if backend == "torch":
        return adapt_reference(support, labels, weight, bias, lr_w, lr_b, steps, first_order)
    W_t, b_t, _, _ = call_op(torch.ops.metassl_fast.inner_loop_fwd, _AdaptTransformable, support, labels, weight, bias,
                             lr_w, lr_b, steps, first_order, backend)
    return W_t, b_t


def query_ce(query: Tensor, query_labels: Tensor, W_t: Tensor, b_t: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the adapted heads on the queries: (per query (T*Q,), logits (T, Q, C)),
    in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    logits = torch.baddbmm(b_t.to(acc).unsqueeze(1), query.to(acc), W_t.to(acc).transpose(1, 2))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), query_labels.reshape(-1), reduction="none")
    return ce, logits


def reduce_tasks(per_example: Tensor, T: int, reduction: str) -> Tensor:
    per_task = per_example.view(T, -1).mean(1)
    return per_task.mean() if reduction == "mean" else per_task


def one_pass(backend: str, reduction: str, lr_is_constant: bool, inputs: tuple) -> bool:
    """Training with a step size that is one number and needs no gradient: the CPU
    kernel forms the gradient during the forward (anil_loss_train) instead of re-running
    the inner loop in the backward.  Taken whenever grad mode is on and an input
    requires grad, so a forward that is never backpropagated (an evaluation loop without
    torch.no_grad) pays for the gradient too.  Not under torch.func (func_transforms): its
    apply step reads raw pointers, which functorch's wrapper tensors do not have."""
    return (backend == "cpu" and reduction == "mean" and lr_is_constant and torch.is_grad_enabled()
            and any(t.requires_grad for t in inputs) and not func_transforms())


def _fused_fits(backend: str, S: int, Q: int, C: int) -> bool:
    """Whether the GPU kernels of the fused loss take Q query rows per task: Triton keeps
    them on chip (at most MAX_TRITON_ROWS), the CUDA kernel's shared memory holds
    (3 S + Q) C + 3 C + 2 Q floats (48 KiB).  adapt_linear_head's kernels have no Q."""
    if backend == "triton":
        from ._shared import MAX_TRITON_ROWS

        return Q <= MAX_TRITON_ROWS
    if backend == "cuda":
        return ((3 * S + Q) * C + 3 * C + 2 * Q) * 4 <= 48 * 1024
    return True


def _unfused(W_t, b_t, query, query_labels, reduction, head_dtype):
    """The query loss and correct counts of adapted heads, in torch (the heads rounded to
    the input dtype first, as adapt_linear_head returns them)."""
    ce, logits = query_ce(query, query_labels, W_t.to(head_dtype), b_t.to(head_dtype))
    correct = (logits.detach().argmax(-1) == query_labels).sum(1).to(query.dtype)
    return reduce_tasks(ce, query.shape[0], reduction), correct


def anil(support: Tensor, labels: Tensor, query: Tensor, query_labels: Tensor, weight: Tensor, bias: Tensor,
         lr_w: Tensor, lr_b: Tensor, steps: int, first_order: bool, reduction: str, backend: str, *,
         lr_is_constant: bool, head_dtype: torch.dtype, any_query_count: bool = False) -> tuple[Tensor, Tensor]:
    """The ANIL meta-loss of validated inputs (meta.anil.prepared: accumulation dtype,
    contiguous, one device, int64 labels; the one-pass CPU path hands them to the kernel
    without checking them again) on the resolved backend, and each task's number of
    correctly classified queries (T,): the per-task autograd loop for "torch", else one
    fused op call (the one-pass training op where one_pass says so; lr_is_constant: the
    step size is one number that needs no gradient).  head_dtype: the caller's input dtype
    (the reference rounds the adapted heads to it).  any_query_count (ANILHead): where the GPU kernel of the fused loss
    cannot hold the query rows, adapt with the kernel and score the queries in torch."""
    if steps == 0:  # no inner step: the support does not enter (d support is 0, not 0 * inf = NaN)
        support = support.detach()
    if backend == "torch":
        W_t, b_t = adapt_reference(support, labels, weight, bias, lr_w, lr_b, steps, first_order)
        return _unfused(W_t, b_t, query, query_labels, reduction, head_dtype)
    if any_query_count and not _fused_fits(backend, support.shape[1], query.shape[1], weight.shape[0]):
        W_t, b_t = adapt(support, labels, weight, bias, lr_w, lr_b, steps, first_order, backend)
        return _unfused(W_t, b_t, query, query_labels, reduction, head_dtype)
    if one_pass(backend, reduction, lr_is_constant, (support, query, weight, bias)):
        inputs = (support, labels, query, query_labels, weight, bias, lr_w, lr_b, steps, first_order)
        out = anil_loss_train(*inputs) if torch.compiler.is_compiling() else _AnilTrainEager.apply(*inputs)
        return out[0], out[-1]
    return call_op(torch.ops.metassl_fast.anil_loss_fwd, _AnilTransformable, support, labels, query, query_labels,
                   weight, bias, lr_w, lr_b, steps, first_order, reduction, backend)
