"""The labelled-row op (SupCon, NT-Xent, pytorch-metric-learning's pairwise NT-Xent,
InfoNCE against explicit negatives): torch.library custom ops metassl_fast::labeled_fwd
/ labeled_bwd, their fakes and autograd, and the entries of the public layer (loss,
explicit).  The math: reference/labeled.py and csrc/cpu/labeled.h.

Backends, one contract (run), one file each: cpu.py (csrc/cpu/labeled.cpp), triton.py
(kernels/labeled.py), cuda.py (csrc/cuda/labeled.cu); backend="torch" is
reference/labeled.py, plain autograd outside the custom ops.  For a scalar loss the
gradient is formed during the forward (3 GEMMs in one pass on the CPU) and backward
only rescales it; reduction="none" recomputes in backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import distributed as _dist
from ...reference.labeled import labeled_contrastive_loss as _reference
from .._common import (acc_dtype, backend_module, backward_op, call_op, check_op, eager_transformable,
                       func_transforms, needs, one_device,
                       refuse_create_graph, register_backward_op, scale_precomputed, transformable)
from ._shared import check_labeled, positives_per_row

__all__ = ["explicit", "gathered", "labeled_bwd", "labeled_fwd", "loss", "positives_per_row"]

_WHAT = "the contrastive family losses"


@torch.library.custom_op("metassl_fast::labeled_fwd", mutates_args=())
def labeled_fwd(
    query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None, pos_logit: Tensor | None,
    ext_positive: bool, scale: Tensor, self_offset: int, normalize: bool, reduction: str, pairwise: bool,
    precompute: bool, need_dq: bool, need_dk: bool, need_dpos: bool, need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dq, dk, dpos, dscale): the gradients of the reduced loss for grad_output = 1
    when precompute, else empty.  key None: the keys are the queries, self excluded.
    pos_logit (N,) or None: an extra logit per row, outside S (already scaled): a
    positive of its row when ext_positive, else a term of the row's LSE only.
    self_offset >= 0 (with a key): anchor i is key row self_offset + i, left out of every
    set (keys gathered from all ranks); -1: no anchor is among the keys."""
    one_device("labeled_fwd", query, key, labels, key_labels, pos_logit, scale)
    impl = backend_module(__name__, "labeled", backend)
    check_op(query, key, scale, reduction, labels=labels, key_labels=key_labels, pos_logit=pos_logit)
    check_labeled(query, key, pos_logit, self_offset, pairwise)
    need = (need_dq, need_dk and key is not None, need_dpos and pos_logit is not None, need_dscale)
    loss, grads = impl.run(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset,
                       normalize, reduction, pairwise, None, precompute, need)
    if grads is None:
        grads = (query.new_empty(0), (query if key is None else key).new_empty(0), query.new_empty(0),
                 scale.new_empty(0))
    return (loss,) + grads


@labeled_fwd.register_fake
def _(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction, pairwise,
      precompute, need_dq, need_dk, need_dpos, need_dscale, backend):
    one_device("labeled_fwd", query, key, labels, key_labels, pos_logit, scale)
    n = query.shape[0]
    k = query if key is None else key
    p = query if pos_logit is None else pos_logit

    def like(x, needed):
        return x.new_empty(x.shape if (precompute and needed) else (0,))

    return (query.new_empty((n,) if reduction == "none" else ()), like(query, need_dq),
            like(k, need_dk and key is not None), like(p, need_dpos and pos_logit is not None),
            like(scale, need_dscale))


@torch.library.custom_op("metassl_fast::labeled_bwd", mutates_args=())
def labeled_bwd(
    grad: Tensor, query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None,
    pos_logit: Tensor | None, ext_positive: bool, scale: Tensor, self_offset: int, normalize: bool, reduction: str,
    pairwise: bool, need_dq: bool, need_dk: bool, need_dpos: bool, need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward: (dq, dk, dpos, dscale), each empty where not needed."""
    one_device("labeled_bwd", grad, query, key, labels, key_labels, pos_logit, scale)
    impl = backend_module(__name__, "labeled", backend)
    check_op(query, key, scale, reduction, labels=labels, key_labels=key_labels, pos_logit=pos_logit, grad=grad)
    check_labeled(query, key, pos_logit, self_offset, pairwise)
    n = query.shape[0]
    if grad.shape != ((n,) if reduction == "none" else ()):
        raise ValueError(f"grad has shape {tuple(grad.shape)}, which does not match reduction={reduction!r}")
    need = (need_dq, need_dk and key is not None, need_dpos and pos_logit is not None, need_dscale)
    _, grads = impl.run(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize,
                    reduction, pairwise, grad, True, need)
    return grads


@labeled_bwd.register_fake
def _(grad, query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction,
      pairwise, need_dq, need_dk, need_dpos, need_dscale, backend):
    one_device("labeled_bwd", grad, query, key, labels, key_labels, pos_logit, scale)
    k = query if key is None else key
    p = query if pos_logit is None else pos_logit
    return (query.new_empty(query.shape if need_dq else (0,)),
            k.new_empty(k.shape if (need_dk and key is not None) else (0,)),
            p.new_empty(p.shape if (need_dpos and pos_logit is not None) else (0,)),
            scale.new_empty(() if need_dscale else (0,)))


def _setup(ctx, inputs, output):
    (query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction, pairwise,
     precompute, _ndq, _ndk, _ndp, _nds, backend) = inputs
    ctx.args = (self_offset, normalize, reduction, pairwise, backend)
    ctx.ext_positive = ext_positive
    ctx.precompute, ctx.has_key, ctx.has_pos = precompute, key is not None, pos_logit is not None
    if precompute:
        ctx.save_for_backward(*output[1:])
    else:
        # keys without grad (a memory bank, a queue) are saved as a copy: trainers update
        # them in place between the forward and the backward
        if key is not None and not key.requires_grad:
            key = key.clone()
        ctx.save_for_backward(query, key, labels, key_labels, pos_logit, scale)


def _backward(ctx, grad_loss, *_unused):
    nq, nk, _, _, npos, _, ns = ctx.needs_input_grad[:7]
    nk, npos = nk and ctx.has_key, npos and ctx.has_pos
    need = (nq, nk, npos, ns)
    if ctx.precompute:
        refuse_create_graph(_WHAT)
        dq, dk, dp, ds = scale_precomputed(ctx.saved_tensors, grad_loss, need)
    else:
        query, key, labels, key_labels, pos_logit, scale = ctx.saved_tensors
        outs = backward_op(labeled_bwd, _WHAT, grad_loss, query, key, labels, key_labels, pos_logit, ctx.ext_positive,
                           scale, *ctx.args[:4], *need, ctx.args[4], ctx=ctx)
        dq, dk, dp, ds = (o if nd else None for o, nd in zip(outs, need))
    return (dq, dk, None, None, dp, None, ds) + (None,) * 10


torch.library.register_autograd("metassl_fast::labeled_fwd", _backward, setup_context=_setup)
_Transformable = transformable(torch.ops.metassl_fast.labeled_fwd, _setup, _backward, "labeled_fwd")
_Eager = eager_transformable(labeled_fwd, _setup, _backward, "labeled_fwd_eager")
register_backward_op("metassl_fast::labeled_bwd", _WHAT)


# ---------------------------------------------------------------------------
# the entries of the public layer
# ---------------------------------------------------------------------------

def loss(query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None, scale: Tensor,
         normalize: bool, reduction: str, pairwise: bool, backend: str, pos_logit: Tensor | None = None,
         self_offset: int = -1, ext_positive: bool = True) -> Tensor:
    """The labelled-row loss of validated inputs on the resolved backend (see labeled_fwd)."""
    if backend == "torch":
        if pos_logit is not None:
            raise ValueError("an extra logit per row (pos_logit) runs on the cpu, triton or cuda backend")
        return _reference(query, key, labels, key_labels, scale, normalize, reduction, pairwise, self_offset)
    need_dq, need_dk, need_dp, need_ds = needs(query, key, pos_logit, scale)
    precompute = reduction != "none" and (need_dq or need_dk or need_dp or need_ds) and not func_transforms()
    return call_op(torch.ops.metassl_fast.labeled_fwd, _Transformable, query, key, labels, key_labels, pos_logit,
                   ext_positive, scale, self_offset, normalize, reduction, pairwise, precompute, need_dq, need_dk,
                   need_dp, need_ds, backend, eager=_Eager)[0]


def gathered(query: Tensor, labels: Tensor, scale: Tensor, normalize: bool, reduction: str, pairwise: bool,
             backend: str, world, query_name: str = "query", labels_name: str = "labels") -> Tensor:
    """This rank's anchors against the anchors of every rank (world = (rank, world size,
    group)): the features gathered with gradient, the labels without; the anchors' own
    columns start at rank * N."""
    rank, _, group = world
    keys = _dist.gather(query, query_name, group)
    key_labels = _dist.gather(labels, labels_name, group, with_grad=False)
    return loss(query, keys, labels, key_labels, scale, normalize, reduction, pairwise, backend,
                self_offset=rank * query.shape[0])


def explicit(query: Tensor, positive_key: Tensor, negatives: Tensor, scale: Tensor, normalize: bool,
             reduction: str, backend: str) -> Tensor:
    """InfoNCE against explicit negatives only: row i's logits are [s q_i . p_i, s q_i .
    negatives^T] with the positive first.  The positive logit is an O(N D) row-wise dot
    product, the (N, M) logits are streamed by the op as one extra positive logit per row."""
    acc = acc_dtype(query.dtype)
    q, p = query.to(acc), positive_key.to(acc)
    if normalize:
        q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    pos = scale.to(acc) * (q * p).sum(1)
    if backend == "torch":
        n = negatives.to(acc)
        if normalize:
            n = torch.nn.functional.normalize(n, dim=-1)
        logits = torch.cat([pos[:, None], scale.to(acc) * (q @ n.T)], 1)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction).to(query.dtype)
    # no column of the negatives is a positive: labels that never match
    y = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    yk = torch.ones(negatives.shape[0], dtype=torch.long, device=query.device)
    return loss(query, negatives, y, yk, scale, normalize, reduction, False, backend, pos_logit=pos)
