"""The rest of the contrastive family as torch.library custom ops.

labeled_fwd / labeled_bwd: rows with labels (SupCon, NT-Xent, pytorch-metric-learning's
pairwise NT-Xent); the math is in reference/family.py and csrc/cpu/contrastive.h.
siglip_fwd / siglip_bwd: SigLIP's sigmoid loss of every pair.

CPU backend: the row-block sweep of ops/contrastive.py (torch's BLAS fills a block of
S, one C++ call does the loss and the gradient block in cache, BLAS multiplies it
back), so the N x M matrix never exists: 3 GEMMs for a scalar loss (S, dQ, dK) in one
pass during the forward, whose gradients backward only rescales.  With the key tower
equal to the query tower (NT-Xent, SupCon: key=None) dZ = s (G Z + G^T Z) lands in one
buffer.  reduction="none" (labelled op) recomputes in backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from . import contrastive as _c
from ._autograd import refuse_create_graph, refuse_double_backward, scale_precomputed

_WHAT = "the contrastive family losses"


def _check_backend(backend: str) -> None:
    if backend != "cpu":  # the functional layer sends every other backend to the reference
        raise RuntimeError(f"metassl_fast: {_WHAT} have no {backend!r} kernel in this version "
                           "(CPU kernel and torch reference only)")


def _sweep(rows: Tensor, keys: Tensor, kernel, *, grad: bool, need_rows: bool, need_keys: bool,
           self_mode: bool, row_alpha: float, key_alpha: float):
    """S = rows keys^T in row blocks of at most TARGET_BLOCK_BYTES; kernel(S, r0, r1)
    does everything else on the block in place.  With grad the kernel leaves G in S and
    d_rows += row_alpha G keys, d_keys += key_alpha G^T rows (one buffer in self_mode,
    where rows and keys are the same samples).  Returns (d_rows, d_keys)."""
    n_rows, n_cols = rows.shape[0], keys.shape[0]
    B = _c._block_rows(n_rows, n_cols, rows.element_size())
    buf = torch.empty(B, n_cols, dtype=rows.dtype)
    keys_t = keys.t()
    d_rows = torch.zeros_like(rows) if grad and need_rows else None
    if self_mode:
        d_keys = d_rows
    else:
        d_keys = torch.zeros_like(keys) if grad and need_keys else None
    for r0 in range(0, n_rows, B):
        r1 = min(n_rows, r0 + B)
        S = buf[: r1 - r0]
        torch.mm(rows[r0:r1], keys_t, out=S)
        kernel(S, r0, r1)
        if d_rows is not None:
            d_rows[r0:r1].addmm_(S, keys, alpha=row_alpha)
        if d_keys is not None:
            d_keys.addmm_(S.t(), rows[r0:r1], alpha=key_alpha)
    return d_rows, d_keys


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


def _grad_or_empty(g, x: Tensor, needed: bool) -> Tensor:
    # a fresh empty tensor per unused output: outputs of a custom op may not alias
    return g.to(x.dtype) if needed else x.new_empty(0)


# ---------------------------------------------------------------------------
# labelled rows: SupCon, NT-Xent, pairwise NT-Xent
# ---------------------------------------------------------------------------

def positives_per_row(labels: Tensor, key_labels: Tensor, self_mode: bool) -> Tensor:
    """|P(i)| for every anchor in O((N + M) log M), without the N x M mask."""
    uniq, counts = torch.unique(key_labels, return_counts=True)
    idx = torch.searchsorted(uniq, labels).clamp_max(uniq.numel() - 1)
    npos = torch.where(uniq[idx] == labels, counts[idx], torch.zeros_like(counts[idx]))
    return npos - 1 if self_mode else npos


def _labeled_weights(reduction, pairwise, npos, grad, dtype):
    """dL/d(row loss) per anchor (rows without positives get a zero gradient from the
    kernel whatever their weight), and the divisor of the mean."""
    count = int(npos.sum()) if pairwise else int((npos > 0).sum())
    if reduction == "none":
        g = torch.ones(npos.shape[0], dtype=dtype) if grad is None else grad.to(dtype).contiguous()
        return g, count
    w = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    g = torch.full((npos.shape[0],), w, dtype=dtype)
    return (g if grad is None else g * grad.to(dtype)), count


def _labeled_inputs(query, key, labels, key_labels, normalize):
    acc = _c._acc_dtype(query.dtype)
    q, q_norm = query.to(acc), None
    if normalize:
        q, q_norm = _c._normalized(q)
    k, k_norm = q, q_norm
    if key is not None:
        k = key.to(acc)
        if normalize:
            k, k_norm = _c._normalized(k)
    y = labels.contiguous()
    yk = y if key is None else key_labels.contiguous()
    if y.shape != (query.shape[0],) or yk.shape != (k.shape[0],) or y.dtype != torch.int64 \
            or yk.dtype != torch.int64:
        raise ValueError("labels and key_labels must be int64 with one entry per row of query and key")
    return q, k, q_norm, k_norm, y, yk


def _labeled_run(query, key, labels, key_labels, scale, normalize, reduction, pairwise, grad_out,
                 with_grad, need):
    """Loss (reduced) and, with_grad, (dq, dk, ds) for upstream gradient grad_out (None = 1)."""
    C_ext = _ext.require("_C")
    q, k, q_norm, k_norm, y, yk = _labeled_inputs(query, key, labels, key_labels, normalize)
    self_mode = key is None
    need_dq, need_dk, need_ds = need
    s = float(scale)
    qs = q * s
    n = q.shape[0]
    npos = positives_per_row(y, yk, self_mode)
    g, count = _labeled_weights(reduction, pairwise, npos, grad_out, q.dtype)
    row_loss = torch.empty(n, dtype=q.dtype)
    code, nt = _ext.DTYPE_CODE[q.dtype], _nthreads()
    gs = [0.0]

    def kernel(S, r0, r1):
        gs[0] += C_ext.block_rows_labeled(
            dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, C=S.shape[1], ld=S.stride(0),
            row0=r0, exclude_self=self_mode, pairwise=pairwise, y_row=y[r0:r1].data_ptr(),
            y_row_numel=r1 - r0, y_col=yk.data_ptr(), y_col_numel=yk.numel(),
            row_loss=row_loss[r0:r1].data_ptr(), row_loss_numel=r1 - r0,
            g_row=g[r0:r1].data_ptr(), g_row_numel=r1 - r0, write_grad=with_grad, nthreads=nt)

    dq, dk = _sweep(qs, k, kernel, grad=with_grad, need_rows=need_dq or (self_mode and need_dk),
                    need_keys=need_dk, self_mode=self_mode, row_alpha=s, key_alpha=1.0)
    if reduction == "mean":
        loss = row_loss.sum() / max(count, 1)
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss
    loss = loss.to(query.dtype)
    if not with_grad:
        return loss, None
    out_q = query.new_empty(0)
    if need_dq:
        out_q = _c._normalize_backward(dq, q, q_norm) if q_norm is not None else dq
        out_q = out_q.to(query.dtype)
    out_k = query.new_empty(0) if key is None else key.new_empty(0)
    if need_dk and not self_mode:
        out_k = (_c._normalize_backward(dk, k, k_norm) if k_norm is not None else dk).to(key.dtype)
    out_s = torch.tensor(gs[0] / s, dtype=torch.float64).to(scale.dtype) if need_ds else scale.new_empty(0)
    return loss, (out_q, out_k, out_s)


@torch.library.custom_op("metassl_fast::labeled_fwd", mutates_args=())
def labeled_fwd(
    query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None, scale: Tensor,
    normalize: bool, reduction: str, pairwise: bool, precompute: bool, need_dq: bool, need_dk: bool,
    need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dq, dk, dscale): the gradients of the reduced loss for grad_output = 1 when
    precompute, else empty.  key None: the keys are the queries, self excluded."""
    _check_backend(backend)
    need = (need_dq, need_dk and key is not None, need_dscale)
    loss, grads = _labeled_run(query, key, labels, key_labels, scale, normalize, reduction, pairwise,
                               None, precompute, need)
    if grads is None:
        grads = (query.new_empty(0), (query if key is None else key).new_empty(0), scale.new_empty(0))
    return (loss,) + grads


@labeled_fwd.register_fake
def _(query, key, labels, key_labels, scale, normalize, reduction, pairwise, precompute, need_dq,
      need_dk, need_dscale, backend):
    n = query.shape[0]
    k = query if key is None else key

    def like(x, needed):
        return x.new_empty(x.shape if (precompute and needed) else (0,))

    return (query.new_empty((n,) if reduction == "none" else ()), like(query, need_dq),
            like(k, need_dk and key is not None), like(scale, need_dscale))


@torch.library.custom_op("metassl_fast::labeled_bwd", mutates_args=())
def labeled_bwd(
    grad: Tensor, query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None,
    scale: Tensor, normalize: bool, reduction: str, pairwise: bool, need_dq: bool, need_dk: bool,
    need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputing backward: (dq, dk, dscale), each empty where not needed."""
    _check_backend(backend)
    n = query.shape[0]
    if grad.shape != ((n,) if reduction == "none" else ()):
        raise ValueError(f"grad has shape {tuple(grad.shape)}, which does not match reduction={reduction!r}")
    need = (need_dq, need_dk and key is not None, need_dscale)
    _, grads = _labeled_run(query, key, labels, key_labels, scale, normalize, reduction, pairwise,
                            grad, True, need)
    return grads


@labeled_bwd.register_fake
def _(grad, query, key, labels, key_labels, scale, normalize, reduction, pairwise, need_dq, need_dk,
      need_dscale, backend):
    k = query if key is None else key
    return (query.new_empty(query.shape if need_dq else (0,)),
            k.new_empty(k.shape if (need_dk and key is not None) else (0,)),
            scale.new_empty(() if need_dscale else (0,)))


def _labeled_setup(ctx, inputs, output):
    (query, key, labels, key_labels, scale, normalize, reduction, pairwise, precompute,
     _ndq, _ndk, _nds, backend) = inputs
    ctx.args = (normalize, reduction, pairwise, backend)
    ctx.precompute, ctx.has_key = precompute, key is not None
    if precompute:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(query, key, labels, key_labels, scale)


def _labeled_backward(ctx, grad_loss, *_unused):
    nq, nk, _, _, ns = ctx.needs_input_grad[:5]
    nk = nk and ctx.has_key
    if ctx.precompute:
        refuse_create_graph(_WHAT)
        dq, dk, ds = scale_precomputed(ctx.saved_tensors, grad_loss, (nq, nk, ns))
    else:
        query, key, labels, key_labels, scale = ctx.saved_tensors
        dq, dk, ds = labeled_bwd(grad_loss, query, key, labels, key_labels, scale, *ctx.args[:3],
                                 nq, nk, ns, ctx.args[3])
        dq, dk, ds = (dq if nq else None), (dk if nk else None), (ds if ns else None)
    return (dq, dk, None, None, ds) + (None,) * 8


torch.library.register_autograd("metassl_fast::labeled_fwd", _labeled_backward, setup_context=_labeled_setup)
torch.library.register_autograd("metassl_fast::labeled_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


def labeled(query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None, scale: Tensor,
            normalize: bool, reduction: str, pairwise: bool, backend: str) -> Tensor:
    """Run the fused labelled-row op on validated inputs; returns the loss."""
    grads = torch.is_grad_enabled()
    need_dq = grads and query.requires_grad
    need_dk = grads and key is not None and key.requires_grad
    need_ds = grads and scale.requires_grad
    precompute = reduction != "none" and (need_dq or need_dk or need_ds)
    out = torch.ops.metassl_fast.labeled_fwd(query, key, labels, key_labels, scale, normalize, reduction,
                                             pairwise, precompute, need_dq, need_dk, need_ds, backend)
    return out[0]


# ---------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------

def _siglip_run(query, key, scale, bias, grad_out, with_grad, need):
    C_ext = _ext.require("_C")
    acc = _c._acc_dtype(query.dtype)
    q, k = query.to(acc), key.to(acc)
    n = q.shape[0]
    s, b = float(scale), float(bias)
    w = 1.0 / n * (1.0 if grad_out is None else float(grad_out))
    code, nt = _ext.DTYPE_CODE[acc], _nthreads()
    tot = [0.0, 0.0, 0.0]

    def kernel(S, r0, r1):
        res = C_ext.block_sigmoid(dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, C=S.shape[1],
                                  ld=S.stride(0), row0=r0, scale=s, bias=b, weight=w,
                                  write_grad=with_grad, nthreads=nt)
        for i in range(3):
            tot[i] += res[i]

    need_dq, need_dk, need_ds, need_db = need
    dq, dk = _sweep(q, k, kernel, grad=with_grad, need_rows=need_dq, need_keys=need_dk, self_mode=False,
                    row_alpha=s, key_alpha=s)
    loss = torch.tensor(tot[0], dtype=torch.float64)  # the loss itself only when grad_out is None (w = 1/N)
    if not with_grad:
        return loss.to(query.dtype), None
    grads = (_grad_or_empty(dq, query, need_dq), _grad_or_empty(dk, key, need_dk),
             torch.tensor(tot[1], dtype=torch.float64).to(scale.dtype) if need_ds else scale.new_empty(0),
             torch.tensor(tot[2], dtype=torch.float64).to(bias.dtype) if need_db else bias.new_empty(0))
    return loss.to(query.dtype), grads


@torch.library.custom_op("metassl_fast::siglip_fwd", mutates_args=())
def siglip_fwd(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, precompute: bool, need_dq: bool,
               need_dk: bool, need_dscale: bool, need_dbias: bool, backend: str,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dq, dk, dscale, dbias), the gradients for grad_output = 1 when precompute."""
    _check_backend(backend)
    loss, grads = _siglip_run(query, key, scale, bias, None, precompute,
                              (need_dq, need_dk, need_dscale, need_dbias))
    if grads is None:
        grads = (query.new_empty(0), key.new_empty(0), scale.new_empty(0), bias.new_empty(0))
    return (loss,) + grads


@siglip_fwd.register_fake
def _(query, key, scale, bias, precompute, need_dq, need_dk, need_dscale, need_dbias, backend):
    def like(x, needed):
        return x.new_empty(x.shape if (precompute and needed) else (0,))

    return (query.new_empty(()), like(query, need_dq), like(key, need_dk), like(scale, need_dscale),
            like(bias, need_dbias))


@torch.library.custom_op("metassl_fast::siglip_bwd", mutates_args=())
def siglip_bwd(grad: Tensor, query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, need_dq: bool,
               need_dk: bool, need_dscale: bool, need_dbias: bool, backend: str,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_backend(backend)
    if grad.shape != ():
        raise ValueError(f"grad must be 0-dim (the loss is a scalar), got shape {tuple(grad.shape)}")
    # the weight goes into the kernel; a zero upstream gradient gives zero gradients
    _, grads = _siglip_run(query, key, scale, bias, grad, True, (need_dq, need_dk, need_dscale, need_dbias))
    return grads


@siglip_bwd.register_fake
def _(grad, query, key, scale, bias, need_dq, need_dk, need_dscale, need_dbias, backend):
    return tuple(x.new_empty(x.shape if nd else (0,)) for x, nd in
                 ((query, need_dq), (key, need_dk), (scale, need_dscale), (bias, need_dbias)))


def _siglip_setup(ctx, inputs, output):
    query, key, scale, bias, precompute, *_rest, backend = inputs
    ctx.precompute, ctx.backend = precompute, backend
    if precompute:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(query, key, scale, bias)


def _siglip_backward(ctx, grad_loss, *_unused):
    need = ctx.needs_input_grad[:4]
    if ctx.precompute:
        refuse_create_graph(_WHAT)
        outs = scale_precomputed(ctx.saved_tensors, grad_loss, need)
    else:
        outs = siglip_bwd(grad_loss, *ctx.saved_tensors, *need, ctx.backend)
        outs = tuple(o if nd else None for o, nd in zip(outs, need))
    return tuple(outs) + (None,) * 6


torch.library.register_autograd("metassl_fast::siglip_fwd", _siglip_backward, setup_context=_siglip_setup)
torch.library.register_autograd("metassl_fast::siglip_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


def siglip(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    grads = torch.is_grad_enabled()
    need = tuple(grads and x.requires_grad for x in (query, key, scale, bias))
    out = torch.ops.metassl_fast.siglip_fwd(query, key, scale, bias, any(need), *need, backend)
    return out[0]
