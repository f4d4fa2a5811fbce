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
    if backend not in ("cpu", "triton", "cuda"):  # the functional layer stops the others before this
        raise RuntimeError(f"metassl_fast: {_WHAT} have no {backend!r} kernel in this version "
                           "(CPU and Triton kernels, and the torch reference)")


def _check_op(query: Tensor, key: Tensor | None, scale: Tensor, reduction: str | None = None,
              **others: Tensor | None) -> None:
    """What the kernels assume of a direct torch.ops call (the public functions ensure it):
    (N, D) features with N, D >= 1, keys with the same D and device, a 0-dim scale > 0,
    a known reduction, and every other tensor on the features' device."""
    if query.dim() != 2 or query.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"query must be (N, D) with N, D >= 1, got {tuple(query.shape)}")
    if key is not None and (key.dim() != 2 or key.shape[0] == 0 or key.shape[1] != query.shape[1]):
        raise ValueError(f"key must be (M, D={query.shape[1]}) with M >= 1, got {tuple(key.shape)}")
    if key is not None and key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}")
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
    if reduction is not None and reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, t in others.items():
        if t is not None and t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if not torch.compiler.is_compiling() and not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {float(scale)}")


def _own_col0(key: Tensor | None, self_offset: int) -> int | None:
    """The column of anchor 0 itself (anchor i's is col0 + i), None if it is not a column."""
    return 0 if key is None else (self_offset if self_offset >= 0 else None)


def _check_labeled(query: Tensor, key: Tensor | None, pos_logit: Tensor | None, self_offset: int,
                   pairwise: bool) -> None:
    """The labelled-row op's own shape rules (both backends rely on them)."""
    n = query.shape[0]
    c = n if key is None else key.shape[0]
    col0 = _own_col0(key, self_offset)
    if col0 is not None and col0 + n > c:
        raise ValueError(f"self_offset={self_offset}: the anchors' own columns [{col0}, {col0 + n}) "
                         f"are not all among the {c} keys")
    if pos_logit is not None and (pairwise or pos_logit.shape != (n,)):
        raise ValueError(f"pos_logit must have shape ({n},) and goes with the mean-positive loss only "
                         f"(pairwise=False), got shape {tuple(pos_logit.shape)}, pairwise={pairwise}")


def _check_diag(query: Tensor, key: Tensor, diag_offset: int) -> None:
    n, c = query.shape[0], key.shape[0]
    if diag_offset < 0 or diag_offset + n > c:
        raise ValueError(f"diag_offset={diag_offset}: the positive columns [{diag_offset}, {diag_offset + n}) "
                         f"are not all among the {c} keys")


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

def positives_per_row(labels: Tensor, key_labels: Tensor, self_col0: int | None) -> Tensor:
    """|P(i)| for every anchor in O((N + M) log M), without the N x M mask; anchor i's
    own column self_col0 + i (if not None) is not its positive."""
    uniq, counts = torch.unique(key_labels, return_counts=True)
    idx = torch.searchsorted(uniq, labels).clamp_max(uniq.numel() - 1)
    npos = torch.where(uniq[idx] == labels, counts[idx], torch.zeros_like(counts[idx]))
    if self_col0 is not None:
        own = key_labels[self_col0:self_col0 + labels.shape[0]]
        npos = npos - (own == labels).to(npos.dtype)
    return npos


def _labeled_weights(reduction, pairwise, npos, grad, dtype):
    """dL/d(row loss) per anchor (rows without positives get a zero gradient from the
    kernel whatever their weight), and the divisor of the mean."""
    count = int(npos.sum()) if pairwise else int((npos > 0).sum())
    dev = npos.device
    if reduction == "none":
        g = torch.ones(npos.shape[0], dtype=dtype, device=dev) if grad is None else grad.to(dtype).contiguous()
        return g, count
    w = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    g = torch.full((npos.shape[0],), w, dtype=dtype, device=dev)
    return (g if grad is None else g * grad.to(dtype)), count


def _reduce_rows(row_loss, reduction, count, dtype):
    if reduction == "mean":
        return (row_loss.sum() / max(count, 1)).to(dtype)
    if reduction == "sum":
        return row_loss.sum().to(dtype)
    return row_loss.to(dtype)


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
    y, yk = _checked_labels(labels, None if key is None else key_labels, query.shape[0], k.shape[0])
    return q, k, q_norm, k_norm, y, yk


def _checked_labels(labels, key_labels, n, c):
    """(labels, key labels) contiguous; key_labels None means the keys are the queries.
    The kernels read them as raw int64 arrays of n and c entries."""
    y = labels.contiguous()
    yk = y if key_labels is None else key_labels.contiguous()
    if y.shape != (n,) or yk.shape != (c,) or y.dtype != torch.int64 or yk.dtype != torch.int64:
        raise ValueError("labels and key_labels must be int64 with one entry per row of query and key")
    return y, yk


def _labeled_run(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction,
                 pairwise, grad_out, with_grad, need, backend="cpu"):
    """Loss (reduced) and, with_grad, (dq, dk, dpos, ds) for upstream gradient grad_out (None = 1)."""
    if backend in ("triton", "cuda"):
        return _labeled_run_gpu(backend, query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset,
                                normalize, reduction, pairwise, grad_out, with_grad, need)
    C_ext = _ext.require("_C")
    q, k, q_norm, k_norm, y, yk = _labeled_inputs(query, key, labels, key_labels, normalize)
    self_mode = key is None
    col0 = _own_col0(key, self_offset)
    need_dq, need_dk, need_dpos, need_ds = need
    s = float(scale)
    qs = q * s
    n = q.shape[0]
    npos = positives_per_row(y, yk, col0)
    ext = dext = None
    if pos_logit is not None:  # one more logit per row, outside S
        npos = npos + (1 if ext_positive else 0)
        ext = pos_logit.to(q.dtype).contiguous()
        dext = torch.zeros(n, dtype=q.dtype)
    g, count = _labeled_weights(reduction, pairwise, npos, grad_out, q.dtype)
    row_loss = torch.empty(n, dtype=q.dtype)
    code, nt = _ext.DTYPE_CODE[q.dtype], _nthreads()
    gs = [0.0]

    def kernel(S, r0, r1):
        gs[0] += C_ext.block_rows_labeled(
            dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, C=S.shape[1], ld=S.stride(0),
            row0=r0 + (col0 or 0), exclude_self=col0 is not None, pairwise=pairwise, y_row=y[r0:r1].data_ptr(),
            y_row_numel=r1 - r0, y_col=yk.data_ptr(), y_col_numel=yk.numel(),
            row_loss=row_loss[r0:r1].data_ptr(), row_loss_numel=r1 - r0,
            g_row=g[r0:r1].data_ptr(), g_row_numel=r1 - r0,
            ext=0 if ext is None else ext[r0:r1].data_ptr(), ext_numel=0 if ext is None else r1 - r0,
            dext=0 if dext is None else dext[r0:r1].data_ptr(), dext_numel=0 if dext is None else r1 - r0,
            ext_positive=ext_positive, write_grad=with_grad, nthreads=nt)

    dq, dk = _sweep(qs, k, kernel, grad=with_grad, need_rows=need_dq or (self_mode and need_dk),
                    need_keys=need_dk, self_mode=self_mode, row_alpha=s, key_alpha=1.0)
    loss = _reduce_rows(row_loss, reduction, count, query.dtype)
    if not with_grad:
        return loss, None
    out_q = query.new_empty(0)
    if need_dq:
        out_q = _c._normalize_backward(dq, q, q_norm) if q_norm is not None else dq
        out_q = out_q.to(query.dtype)
    out_k = query.new_empty(0) if key is None else key.new_empty(0)
    if need_dk and not self_mode:
        out_k = (_c._normalize_backward(dk, k, k_norm) if k_norm is not None else dk).to(key.dtype)
    out_p = dext.to(pos_logit.dtype) if (need_dpos and pos_logit is not None) else query.new_empty(0)
    out_s = torch.tensor(gs[0] / s, dtype=torch.float64).to(scale.dtype) if need_ds else scale.new_empty(0)
    return loss, (out_q, out_k, out_p, out_s)


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
    _check_backend(backend)
    _check_op(query, key, scale, reduction, labels=labels, key_labels=key_labels, pos_logit=pos_logit)
    _check_labeled(query, key, pos_logit, self_offset, pairwise)
    need = (need_dq, need_dk and key is not None, need_dpos and pos_logit is not None, need_dscale)
    loss, grads = _labeled_run(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset,
                               normalize, reduction, pairwise, None, precompute, need, backend)
    if grads is None:
        grads = (query.new_empty(0), (query if key is None else key).new_empty(0), query.new_empty(0),
                 scale.new_empty(0))
    return (loss,) + grads


@labeled_fwd.register_fake
def _(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction, pairwise,
      precompute, need_dq, need_dk, need_dpos, need_dscale, backend):
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
    _check_backend(backend)
    _check_op(query, key, scale, reduction, labels=labels, key_labels=key_labels, pos_logit=pos_logit, grad=grad)
    _check_labeled(query, key, pos_logit, self_offset, pairwise)
    n = query.shape[0]
    if grad.shape != ((n,) if reduction == "none" else ()):
        raise ValueError(f"grad has shape {tuple(grad.shape)}, which does not match reduction={reduction!r}")
    need = (need_dq, need_dk and key is not None, need_dpos and pos_logit is not None, need_dscale)
    _, grads = _labeled_run(query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize,
                            reduction, pairwise, grad, True, need, backend)
    return grads


@labeled_bwd.register_fake
def _(grad, query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize, reduction,
      pairwise, need_dq, need_dk, need_dpos, need_dscale, backend):
    k = query if key is None else key
    p = query if pos_logit is None else pos_logit
    return (query.new_empty(query.shape if need_dq else (0,)),
            k.new_empty(k.shape if (need_dk and key is not None) else (0,)),
            p.new_empty(p.shape if (need_dpos and pos_logit is not None) else (0,)),
            scale.new_empty(() if need_dscale else (0,)))


def _labeled_setup(ctx, inputs, output):
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


def _labeled_backward(ctx, grad_loss, *_unused):
    nq, nk, _, _, npos, _, ns = ctx.needs_input_grad[:7]
    nk, npos = nk and ctx.has_key, npos and ctx.has_pos
    need = (nq, nk, npos, ns)
    if ctx.precompute:
        refuse_create_graph(_WHAT)
        dq, dk, dp, ds = scale_precomputed(ctx.saved_tensors, grad_loss, need)
    else:
        query, key, labels, key_labels, pos_logit, scale = ctx.saved_tensors
        outs = labeled_bwd(grad_loss, query, key, labels, key_labels, pos_logit, ctx.ext_positive, scale,
                           *ctx.args[:4], *need, ctx.args[4])
        dq, dk, dp, ds = (o if nd else None for o, nd in zip(outs, need))
    return (dq, dk, None, None, dp, None, ds) + (None,) * 10


torch.library.register_autograd("metassl_fast::labeled_fwd", _labeled_backward, setup_context=_labeled_setup)
torch.library.register_autograd("metassl_fast::labeled_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


def labeled(query: Tensor, key: Tensor | None, labels: Tensor, key_labels: Tensor | None, scale: Tensor,
            normalize: bool, reduction: str, pairwise: bool, backend: str, pos_logit: Tensor | None = None,
            self_offset: int = -1, ext_positive: bool = True) -> Tensor:
    """Run the fused labelled-row op on validated inputs; returns the loss."""
    grads = torch.is_grad_enabled()
    need_dq = grads and query.requires_grad
    need_dk = grads and key is not None and key.requires_grad
    need_dp = grads and pos_logit is not None and pos_logit.requires_grad
    need_ds = grads and scale.requires_grad
    precompute = reduction != "none" and (need_dq or need_dk or need_dp or need_ds)
    out = torch.ops.metassl_fast.labeled_fwd(query, key, labels, key_labels, pos_logit, ext_positive, scale,
                                             self_offset,
                                             normalize, reduction, pairwise, precompute, need_dq, need_dk, need_dp,
                                             need_ds, backend)
    return out[0]


# ---------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------

def _siglip_run(query, key, scale, bias, diag_offset, grad_out, with_grad, need, backend="cpu"):
    if backend in ("triton", "cuda"):
        return _siglip_run_gpu(backend, query, key, scale, bias, diag_offset, grad_out, with_grad, need)
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
                                  ld=S.stride(0), row0=diag_offset + r0, scale=s, bias=b, weight=w,
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
def siglip_fwd(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, diag_offset: int, precompute: bool,
               need_dq: bool, need_dk: bool, need_dscale: bool, need_dbias: bool, backend: str,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dq, dk, dscale, dbias), the gradients for grad_output = 1 when precompute.
    query (N, D), key (M, D): query i's positive is key diag_offset + i; the loss is the
    sum over the N x M pairs divided by N (open_clip's per-rank normalisation)."""
    _check_backend(backend)
    _check_op(query, key, scale, bias=bias)
    _check_diag(query, key, diag_offset)
    if bias.dim() != 0:
        raise ValueError(f"bias must be a 0-dim tensor, got shape {tuple(bias.shape)}")
    loss, grads = _siglip_run(query, key, scale, bias, diag_offset, None, precompute,
                              (need_dq, need_dk, need_dscale, need_dbias), backend)
    if grads is None:
        grads = (query.new_empty(0), key.new_empty(0), scale.new_empty(0), bias.new_empty(0))
    return (loss,) + grads


@siglip_fwd.register_fake
def _(query, key, scale, bias, diag_offset, precompute, need_dq, need_dk, need_dscale, need_dbias, backend):
    def like(x, needed):
        return x.new_empty(x.shape if (precompute and needed) else (0,))

    return (query.new_empty(()), like(query, need_dq), like(key, need_dk), like(scale, need_dscale),
            like(bias, need_dbias))


@torch.library.custom_op("metassl_fast::siglip_bwd", mutates_args=())
def siglip_bwd(grad: Tensor, query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
               need_dq: bool, need_dk: bool, need_dscale: bool, need_dbias: bool, backend: str,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_backend(backend)
    _check_op(query, key, scale, bias=bias, grad=grad)
    _check_diag(query, key, diag_offset)
    if grad.shape != ():
        raise ValueError(f"grad must be 0-dim (the loss is a scalar), got shape {tuple(grad.shape)}")
    # the weight goes into the kernel; a zero upstream gradient gives zero gradients
    _, grads = _siglip_run(query, key, scale, bias, diag_offset, grad, True,
                           (need_dq, need_dk, need_dscale, need_dbias), backend)
    return grads


@siglip_bwd.register_fake
def _(grad, query, key, scale, bias, diag_offset, need_dq, need_dk, need_dscale, need_dbias, backend):
    return tuple(x.new_empty(x.shape if nd else (0,)) for x, nd in
                 ((query, need_dq), (key, need_dk), (scale, need_dscale), (bias, need_dbias)))


def _siglip_setup(ctx, inputs, output):
    query, key, scale, bias, diag_offset, precompute, *_rest, backend = inputs
    ctx.precompute, ctx.backend, ctx.diag_offset = precompute, backend, diag_offset
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
        outs = siglip_bwd(grad_loss, *ctx.saved_tensors, ctx.diag_offset, *need, ctx.backend)
        outs = tuple(o if nd else None for o, nd in zip(outs, need))
    return tuple(outs) + (None,) * 7


torch.library.register_autograd("metassl_fast::siglip_fwd", _siglip_backward, setup_context=_siglip_setup)
torch.library.register_autograd("metassl_fast::siglip_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


def siglip(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, backend: str, diag_offset: int = 0) -> Tensor:
    grads = torch.is_grad_enabled()
    need = tuple(grads and x.requires_grad for x in (query, key, scale, bias))
    out = torch.ops.metassl_fast.siglip_fwd(query, key, scale, bias, diag_offset, any(need), *need, backend)
    return out[0]


# ---------------------------------------------------------------------------
# Triton backend (kernels/family.py): the forward kernel stores per-row statistics;
# the gradient (during the forward for a scalar loss, as on the CPU, or in backward)
# recomputes S in a row-outer (dQ) and a column-outer (dK) kernel.
# ---------------------------------------------------------------------------

def _triton_operands(x, normalize):
    """(x in float32, normalised if asked; its norms or None; the kernel operand in the
    input dtype, contiguous)."""
    acc = _c._acc_dtype(x.dtype)
    xa, norm = x.to(acc), None
    if normalize:
        xa, norm = _c._normalized(xa)
    op_dtype = x.dtype if x.dtype != torch.float64 else torch.float32
    return xa, norm, xa.to(op_dtype).contiguous()


def _labeled_run_gpu(backend, query, key, labels, key_labels, pos_logit, ext_positive, scale, self_offset, normalize,
                     reduction, pairwise, grad_out, with_grad, need):
    """The Triton kernels (kernels/family.py) or the CUDA C++ ones (csrc/cuda/contrastive.cu):
    the same buffers and statistics."""
    q, q_norm, q_op = _triton_operands(query, normalize)
    self_mode = key is None
    k, k_norm, k_op = (q, q_norm, q_op) if self_mode else _triton_operands(key, normalize)
    col0 = _own_col0(key, self_offset)
    n, d = q_op.shape
    c = k_op.shape[0]
    y, yk = _checked_labels(labels, None if self_mode else key_labels, n, c)
    dev, f32 = q_op.device, torch.float32
    s = float(scale)
    ext = None
    if pos_logit is not None:
        ext = pos_logit.to(f32).contiguous()
    row_loss = torch.empty(n, dtype=f32, device=dev)
    stat_a = torch.empty(n, dtype=f32, device=dev)
    stat_b = torch.empty(n, dtype=f32, device=dev)
    launch = _LabeledLaunch(backend, q_op, k_op, y, yk, s, col0, pairwise)
    launch.forward(ext, ext_positive, row_loss, stat_a, stat_b)
    npos = positives_per_row(y, yk, col0) + (1 if ext is not None and ext_positive else 0)
    g, count = _labeled_weights(reduction, pairwise, npos, grad_out, f32)
    loss = _reduce_rows(row_loss, reduction, count, query.dtype)
    if not with_grad:
        return loss, None
    need_dq, need_dk, need_dpos, need_ds = need
    gscale = _c.operand_scale(q_op.dtype, g)  # exact: see operand_scale
    gk = g * gscale if gscale != 1.0 else g
    dq = torch.empty(n, d, dtype=f32, device=dev)
    parts = launch.backward(False, gk, stat_a, stat_b, dq) / gscale
    dq = dq / gscale if gscale != 1.0 else dq
    dk = None
    if self_mode or need_dk:
        dk = torch.empty(c, d, dtype=f32, device=dev)
        launch.backward(True, gk, stat_a, stat_b, dk)
        dk = dk / gscale if gscale != 1.0 else dk
    out_q = query.new_empty(0)
    if need_dq:
        gq = s * (dq + dk) if self_mode else s * dq
        out_q = (_c._normalize_backward(gq, q, q_norm) if q_norm is not None else gq).to(query.dtype)
    out_k = query.new_empty(0) if self_mode else key.new_empty(0)
    if need_dk and not self_mode:
        gk = s * dk
        out_k = (_c._normalize_backward(gk, k, k_norm) if k_norm is not None else gk).to(key.dtype)
    out_p = query.new_empty(0)
    if need_dpos and ext is not None:
        p_ext = torch.exp(ext - stat_a)
        if ext_positive:
            p_ext = p_ext - 1.0 / npos.to(f32)
        # rows without positives have no loss and no gradient
        out_p = torch.where(npos > 0, g * p_ext, torch.zeros_like(p_ext)).to(pos_logit.dtype)
    out_s = (parts.double().sum() / s).to(scale.dtype) if need_ds else scale.new_empty(0)
    return loss, (out_q, out_k, out_p, out_s)


def _siglip_run_gpu(backend, query, key, scale, bias, diag_offset, grad_out, with_grad, need):
    _, _, q_op = _triton_operands(query, False)
    _, _, k_op = _triton_operands(key, False)
    n, d = q_op.shape
    c = k_op.shape[0]
    dev, f32 = q_op.device, torch.float32
    s, b = float(scale), float(bias)
    launch = _SiglipLaunch(backend, q_op, k_op, s, b, diag_offset)
    row_loss = torch.empty(n, dtype=f32, device=dev)
    launch.forward(row_loss)
    loss = (row_loss.double().sum() / n).to(query.dtype)
    if not with_grad:
        return loss, None
    need_dq, need_dk, need_ds, need_db = need
    w = (1.0 if grad_out is None else float(grad_out)) / n
    gscale = _c.operand_scale(q_op.dtype, w)  # |dL/dx| <= |w|; exact: see operand_scale
    dq = torch.empty(n, d, dtype=f32, device=dev)
    parts = launch.backward(False, w * gscale, dq)
    dq = dq / gscale if gscale != 1.0 else dq
    out_k = key.new_empty(0)
    if need_dk:
        dk = torch.empty(c, d, dtype=f32, device=dev)
        launch.backward(True, w * gscale, dk)
        out_k = (s / gscale * dk).to(key.dtype)
    tot = parts.double().sum(0) / gscale
    return loss, ((s * dq).to(query.dtype) if need_dq else query.new_empty(0), out_k,
                  tot[0].to(scale.dtype) if need_ds else scale.new_empty(0),
                  tot[1].to(bias.dtype) if need_db else bias.new_empty(0))


def _gpu_blocks(backend, d, dtype, meta):
    """(rows per program / block, columns per tile, Triton launch meta): the Triton
    configuration for D, or the CUDA kernels' fixed 64 x 64 tiles (no D limit)."""
    if backend == "cuda":
        tile = _ext.require("_C_cuda").TILE
        return tile, tile, {}
    bm, bn, bd, warps = _c._triton_config(d)
    return bm, bn, dict(meta, PRECISION=_c._precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)


class _LabeledLaunch:
    """The labelled-row kernels of one backend on one (Q, K, labels) problem."""

    def __init__(self, backend, q_op, k_op, y, yk, s, col0, pairwise):
        self.backend, self.q, self.k, self.y, self.yk, self.s = backend, q_op, k_op, y, yk, s
        self.col0, self.pairwise = col0, pairwise
        self.n, self.d = q_op.shape
        self.c = k_op.shape[0]
        self.bm, self.bn, self.meta = _gpu_blocks(backend, self.d, q_op.dtype,
                                                  dict(SELF=col0 is not None, PAIRWISE=pairwise))

    def _cuda(self, name, **kw):
        _c.cuda_call(name, self.q.device, dtype=_ext.CUDA_DTYPE_CODE[self.q.dtype],
                     **_c._cuda_args(Q=self.q, K=self.k, yq=self.y, yk=self.yk), N=self.n, C=self.c, D=self.d,
                     ldq=self.q.stride(0), ldk=self.k.stride(0), scale=self.s, self=self.col0 is not None,
                     self_col0=self.col0 or 0, pairwise=self.pairwise, **kw)

    def forward(self, ext, ext_positive, row_loss, stat_a, stat_b):
        if self.backend == "cuda":
            self._cuda("labeled_fwd", **_c._cuda_args(ext=ext if ext is not None else row_loss, loss=row_loss,
                                                      stat_a=stat_a, stat_b=stat_b),
                       has_ext=ext is not None, ext_pos=ext_positive)
            return
        from ..kernels import family as tf

        tf.labeled_fwd_kernel[(_c._cdiv(self.n, self.bm),)](
            self.q, self.k, self.y, self.yk, ext if ext is not None else row_loss, row_loss, stat_a, stat_b, self.n,
            self.c, self.d, self.q.stride(0), self.k.stride(0), self.s, self.col0 or 0, HAS_EXT=ext is not None,
            EXT_POS=ext_positive, **self.meta)

    def backward(self, dk, g, stat_a, stat_b, out):
        """G K into out (dk False; returns the per-block sums of G S) or G^T Q (dk True)."""
        grid = _c._cdiv(self.n, self.bm)
        parts = torch.empty(grid, dtype=torch.float32, device=self.q.device) if not dk else None
        if self.backend == "cuda":
            self._cuda("labeled_bwd", dk=dk, **_c._cuda_args(g=g, stat_a=stat_a, stat_b=stat_b, out=out,
                                                             part=parts if parts is not None else g),
                       ldo=out.stride(0))
            return parts
        from ..kernels import family as tf

        args = (self.q, self.k, self.y, self.yk, g, stat_a, stat_b, out)
        if dk:
            tf.labeled_bwd_dk_kernel[(_c._cdiv(self.c, self.bn),)](
                *args, self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), out.stride(0), self.s,
                self.col0 or 0, **self.meta)
        else:
            tf.labeled_bwd_dq_kernel[(grid,)](
                *args, parts, self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), out.stride(0), self.s,
                self.col0 or 0, **self.meta)
        return parts


class _SiglipLaunch:
    """The SigLIP kernels of one backend on one (Q, K) problem."""

    def __init__(self, backend, q_op, k_op, s, b, diag_offset):
        self.backend, self.q, self.k, self.s, self.b, self.diag = backend, q_op, k_op, s, b, diag_offset
        self.n, self.d = q_op.shape
        self.c = k_op.shape[0]
        self.bm, self.bn, self.meta = _gpu_blocks(backend, self.d, q_op.dtype, {})

    def _cuda(self, name, **kw):
        _c.cuda_call(name, self.q.device, dtype=_ext.CUDA_DTYPE_CODE[self.q.dtype],
                     **_c._cuda_args(Q=self.q, K=self.k), N=self.n, C=self.c, D=self.d, ldq=self.q.stride(0),
                     ldk=self.k.stride(0), logit_scale=self.s, bias=self.b, diag_col0=self.diag, **kw)

    def forward(self, row_loss):
        if self.backend == "cuda":
            self._cuda("siglip_fwd", **_c._cuda_args(loss=row_loss))
            return
        from ..kernels import family as tf

        tf.siglip_fwd_kernel[(_c._cdiv(self.n, self.bm),)](
            self.q, self.k, row_loss, self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), self.s, self.b,
            self.diag, **self.meta)

    def backward(self, dk, w, out):
        """(dL/dx) K into out (dk False; returns the per-block (sum dL/dx S, sum dL/dx)) or (dL/dx)^T Q."""
        grid = _c._cdiv(self.n, self.bm)
        parts = torch.empty(grid, 2, dtype=torch.float32, device=self.q.device) if not dk else None
        if self.backend == "cuda":
            self._cuda("siglip_bwd", dk=dk, w=w, ldo=out.stride(0),
                       **_c._cuda_args(out=out, part=parts if parts is not None else out))
            return parts
        from ..kernels import family as tf

        common = (self.n, self.c, self.d, self.q.stride(0), self.k.stride(0), out.stride(0), self.s, self.b,
                  self.diag, w)
        if dk:
            tf.siglip_bwd_dk_kernel[(_c._cdiv(self.c, self.bn),)](self.q, self.k, out, *common, **self.meta)
        else:
            tf.siglip_bwd_dq_kernel[(grid,)](self.q, self.k, out, parts, *common, **self.meta)
        return parts
