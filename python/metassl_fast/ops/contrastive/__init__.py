"""The contrastive op (InfoNCE, symmetric InfoNCE, CLIP): torch.library custom ops
metassl_fast::contrastive_fwd / contrastive_bwd, their fakes and autograd, and the one
entry the public layer calls (loss), which routes each call once.

    S = s Q K^T,  K = [key; negatives]  (C = N + M columns; columns < N are keys)
    row_i = lse_j S_ij - S_ii             col_j = lse_i S_ij - S_jj   (j < N, symmetric)
    G_ij  = g_row_i (softmax_row(S)_ij - [i = j]) + [j < N] g_col_j (softmax_col(S)_ij - [i = j])
    dQ = s G K,  dK = s G^T Q,  ds = sum_ij G_ij S_ij / s
    with normalisation q = x / |x|:  dx = (dq - q (q . dq)) / |x|

Backends, one contract (forward / backward / PRECOMPUTES), one file each: cpu.py
(csrc/cpu/contrastive.cpp), triton.py (kernels/contrastive.py), cuda.py
(csrc/cuda/contrastive.cu); backend="torch" is reference/contrastive.py, plain autograd
outside the custom ops (it keeps double backward).  Paired negatives and keys gathered
across ranks are served by the labelled-row op (ops/labeled), exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import distributed as _dist
from ...reference.contrastive import contrastive_loss as _reference
from .. import labeled as _labeled
from .._common import (acc_dtype, backend_module, backward_op, call_op, eager_transformable,
                       func_transforms, needs, one_device,
                       refuse_create_graph, register_backward_op, scale_precomputed, transformable)
from ._shared import check_contrastive

_WHAT = "the contrastive losses"


@torch.library.custom_op("metassl_fast::contrastive_fwd", mutates_args=())
def contrastive_fwd(
    query: Tensor, key: Tensor, negatives: Tensor | None, scale: Tensor, symmetric: bool,
    normalize: bool, reduction: str, precompute: bool, need_dq: bool, need_dk: bool,
    need_dneg: bool, need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, lse_row (N,), lse_col (N,) or (0,), dq, dk, dneg, dscale); the
    four gradients are those of the reduced loss for grad_output = 1 when precompute
    and the backend precomputes (cpu), else empty."""
    one_device("contrastive_fwd", query, key, negatives, scale)
    check_contrastive(query, key, negatives, scale, reduction)
    impl = backend_module(__name__, "contrastive", backend)
    need = (need_dq, need_dk, need_dneg, need_dscale)
    return impl.forward(query, key, negatives, scale, symmetric, normalize, reduction,
                        precompute and impl.PRECOMPUTES, need)


def _precomputes(backend: str, precompute: bool) -> bool:
    return precompute and backend_module(__name__, "contrastive", backend).PRECOMPUTES


@contrastive_fwd.register_fake
def _(query, key, negatives, scale, symmetric, normalize, reduction, precompute, need_dq, need_dk,
      need_dneg, need_dscale, backend):
    one_device("contrastive_fwd", query, key, negatives, scale)
    n = query.shape[0]
    acc = acc_dtype(query.dtype)
    precompute = _precomputes(backend, precompute)
    loss = query.new_empty((n,) if reduction == "none" else ())
    lse_row = query.new_empty((n,), dtype=acc)
    lse_col = query.new_empty((n,) if symmetric else (0,), dtype=acc)

    def grad_like(x, needed):
        return x.new_empty(x.shape if (precompute and needed) else (0,))

    return (loss, lse_row, lse_col, grad_like(query, need_dq), grad_like(key, need_dk),
            grad_like(negatives if negatives is not None else query, need_dneg and negatives is not None),
            grad_like(scale, need_dscale))


@torch.library.custom_op("metassl_fast::contrastive_bwd", mutates_args=())
def contrastive_bwd(
    grad: Tensor, query: Tensor, key: Tensor, negatives: Tensor | None, scale: Tensor,
    lse_row: Tensor, lse_col: Tensor, symmetric: bool, normalize: bool, reduction: str,
    need_dq: bool, need_dk: bool, need_dneg: bool, need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward (used when the forward did not precompute): (dq, dk, dneg,
    dscale), each empty where not needed."""
    one_device("contrastive_bwd", grad, query, key, negatives, scale, lse_row, lse_col)
    check_contrastive(query, key, negatives, scale, reduction)
    impl = backend_module(__name__, "contrastive", backend)
    n, acc = query.shape[0], acc_dtype(query.dtype)
    for name, t, want in (("lse_row", lse_row, n), ("lse_col", lse_col, n if symmetric else None)):
        if want is not None and (t.shape != (want,) or t.dtype != acc):
            raise ValueError(f"{name} must be the forward's ({want},) {acc} statistics, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if grad.shape != ((n,) if reduction == "none" else ()):
        raise ValueError(f"grad has shape {tuple(grad.shape)}, which does not match reduction={reduction!r}")
    need = (need_dq, need_dk, need_dneg, need_dscale)
    return impl.backward(grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize, reduction,
                         need)


@contrastive_bwd.register_fake
def _(grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize, reduction,
      need_dq, need_dk, need_dneg, need_dscale, backend):
    one_device("contrastive_bwd", grad, query, key, negatives, scale, lse_row, lse_col)
    def like(x, needed):
        return x.new_empty(x.shape if needed else (0,))

    return (like(query, need_dq), like(key, need_dk),
            like(negatives if negatives is not None else query, need_dneg and negatives is not None),
            like(scale, need_dscale))


def _setup_context(ctx, inputs, output):
    (query, key, negatives, scale, symmetric, normalize, reduction, precompute,
     _ndq, _ndk, _ndn, _nds, backend) = inputs
    _, lse_row, lse_col, dq, dk, dneg, ds = output
    ctx.symmetric, ctx.normalize, ctx.reduction = symmetric, normalize, reduction
    ctx.precompute, ctx.backend = _precomputes(backend, precompute), backend
    ctx.has_negatives = negatives is not None
    if ctx.precompute:
        ctx.save_for_backward(dq, dk, dneg, ds)
    else:
        # A queue without grad is saved as a copy: MoCo-style trainers enqueue into it in
        # place between the forward and the backward.
        if negatives is not None and not negatives.requires_grad:
            negatives = negatives.clone()
        ctx.save_for_backward(query, key, negatives, scale, lse_row, lse_col)


def _backward(ctx, grad_loss, *_unused):
    nq, nk, nn, ns = ctx.needs_input_grad[:4]
    nn = nn and ctx.has_negatives
    if ctx.precompute:
        refuse_create_graph(_WHAT)
        outs = scale_precomputed(ctx.saved_tensors, grad_loss, (nq, nk, nn, ns))
    else:
        query, key, negatives, scale, lse_row, lse_col = ctx.saved_tensors
        dq, dk, dneg, ds = backward_op(
            contrastive_bwd, _WHAT, grad_loss, query, key, negatives, scale, lse_row, lse_col, ctx.symmetric,
            ctx.normalize, ctx.reduction, nq, nk, nn, ns, ctx.backend, ctx=ctx)
        outs = (dq if nq else None, dk if nk else None, dneg if nn else None, ds if ns else None)
    return outs + (None,) * 9


torch.library.register_autograd("metassl_fast::contrastive_fwd", _backward, setup_context=_setup_context)
_Transformable = transformable(torch.ops.metassl_fast.contrastive_fwd, _setup_context, _backward, "contrastive_fwd")
_Eager = eager_transformable(contrastive_fwd, _setup_context, _backward, "contrastive_fwd_eager")
register_backward_op("metassl_fast::contrastive_bwd", _WHAT)


# ---------------------------------------------------------------------------
# the entry of the public layer: routes once, then one op call
# ---------------------------------------------------------------------------

def loss(query: Tensor, key: Tensor, negatives: Tensor | None, scale: Tensor, *, symmetric: bool, normalize: bool,
         reduction: str, backend: str, world=(0, 1, None), key_name: str = "key", query_name: str = "query"
         ) -> Tensor:
    """The loss of validated inputs on the resolved backend: query, key (N, D); negatives
    None, (M, D) (a queue: more key columns that are no row's positive) or (N, M, D)
    (paired); scale 0-dim; world = (rank, world size, process group) of gather_distributed."""
    rank, ws, group = world
    paired = negatives is not None and negatives.dim() == 3
    if ws > 1:
        n, dev = query.shape[0], query.device
        keys = _dist.gather(key, key_name, group)
        queries = _dist.gather(query, query_name, group) if symmetric else None
        return _rows_against(backend, query, key, keys, queries, rank * n + torch.arange(n, device=dev),
                             torch.arange(ws * n, device=dev), negatives, scale, symmetric, normalize, reduction)
    if backend == "torch":
        return _reference(query, key, negatives, scale, symmetric, normalize, reduction)
    if paired:
        ids = torch.arange(query.shape[0], device=query.device)
        return _rows_against(backend, query, key, key, query, ids, ids, negatives, scale, symmetric, normalize,
                             reduction)
    need_dq, need_dk, need_dneg, need_ds = needs(query, key, negatives, scale)
    # the CPU backend forms the gradient of a scalar loss during the forward (one pass)
    precompute = reduction != "none" and (need_dq or need_dk or need_dneg or need_ds) and not func_transforms()
    return call_op(torch.ops.metassl_fast.contrastive_fwd, _Transformable, query, key, negatives, scale, symmetric,
                   normalize, reduction, precompute, need_dq, need_dk, need_dneg, need_ds, backend, eager=_Eager)[0]


def _paired_lse(query, negatives, scale, normalize):
    """LSE_m s q_i . negatives[i, m] per row, differentiable: the (N, M) logits are
    smaller than the (N, M, D) negatives themselves."""
    acc = acc_dtype(query.dtype)
    with torch.autocast(query.device.type, enabled=False):  # accumulate in acc, as the fused row does
        q, n = query.to(acc), negatives.to(acc)
        if normalize:
            q, n = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(n, dim=-1)
        return torch.logsumexp(scale.to(acc) * torch.bmm(n, q.unsqueeze(2)).squeeze(2), 1)


def _rows_against(backend, query, key, keys, queries, ids, all_ids, negatives, scale, symmetric, normalize,
                  reduction):
    """InfoNCE of these rows (labels ids) against `keys` (labels all_ids: every rank's keys,
    or just `key`) on the labelled-row op, plus the negatives: an (M, D) queue as more key
    rows that are no row's positive, or (N, M, D) paired negatives as one extra logit per
    row, the LSE of its paired logits, which is exact: LSE(S_i, P_i) = LSE(S_i, LSE(P_i)).
    Symmetric: also `key`'s rows against `queries`, and the mean of the two."""
    y_keys, ext = all_ids, None
    if negatives is not None and negatives.dim() == 3:
        if backend == "torch":
            raise ValueError("gather_distributed with paired negatives runs on the cpu or triton backend")
        ext = _paired_lse(query, negatives, scale, normalize)
    elif negatives is not None:
        keys = torch.cat([keys, negatives])
        y_keys = torch.cat([all_ids, torch.full((negatives.shape[0],), -1, dtype=torch.long, device=ids.device)])
    row = _labeled.loss(query, keys, ids, y_keys, scale, normalize, reduction, False, backend, pos_logit=ext,
                        ext_positive=False)
    if not symmetric:
        return row
    col = _labeled.loss(key, queries, ids, all_ids, scale, normalize, reduction, False, backend)
    return 0.5 * (row + col)
