"""The fused contrastive op (InfoNCE, symmetric InfoNCE, CLIP) as torch.library custom ops.

    S = s Q K^T,  K = [key; negatives]  (C = N + M columns; columns < N are keys)
    row_i = lse_j S_ij - S_ii             col_j = lse_i S_ij - S_jj   (j < N, symmetric)
    G_ij  = g_row_i (softmax_row(S)_ij - [i = j]) + [j < N] g_col_j (softmax_col(S)_ij - [i = j])
    dQ = s G K,  dK = s G^T Q,  ds = sum_ij G_ij S_ij / s
    with normalisation q = x / |x|:  dx = (dq - q (q . dq)) / |x|

CPU backend: S is streamed in row blocks of at most TARGET_BLOCK_BYTES.  torch's
BLAS computes each block (and multiplies the gradient block back); the C++ kernel
(csrc/cpu/contrastive.cpp) does the log-sum-exp, softmax and gradient on the block
in cache.  Extra memory is O(N D + block), never O(N C).
GEMM count: one-sided 3 (S, dQ, dK in one pass during the forward); symmetric 4
(pass 1 for the row and column LSE, pass 2 recomputes S for the gradient).
For a scalar loss with grad enabled the gradient is computed in the forward and the
backward only scales it by grad_output; reduction="none" recomputes in backward.

Triton backend (kernels/contrastive.py): the forward saves only the LSEs; the
backward recomputes S tiles in a row-outer (dQ) and a column-outer (dK) kernel.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import _ext
from ._autograd import refuse_create_graph, refuse_double_backward, scale_precomputed

_WHAT = "the contrastive losses"

# One S block: 8 MiB fits the L3 of small CPUs and the GEMMs are no faster above it;
# at least 128 rows, since thinner blocks make the GEMMs slow (N = 65536 on 2 cores:
# 32 rows 75 s of GEMM, 128 rows 45 s) and 128 x 65536 floats is still only 32 MiB.
TARGET_BLOCK_BYTES = 8 << 20
MIN_BLOCK_ROWS = 128
NORM_EPS = 1e-12  # F.normalize's eps: |x| is clamped to it


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_rows(n_rows: int, n_cols: int, itemsize: int) -> int:
    rows = max(MIN_BLOCK_ROWS, TARGET_BLOCK_BYTES // (n_cols * itemsize))
    return max(1, min(n_rows, rows))


def _normalized(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def _normalize_backward(dxn: Tensor, xn: Tensor, norm: Tensor) -> Tensor:
    # where |x| was clamped to eps the map is x / eps: its gradient is dxn / eps
    radial = (xn * dxn).sum(dim=1, keepdim=True)
    clamped = norm <= NORM_EPS
    return torch.where(clamped, dxn, dxn - xn * radial) / norm


def _inputs(query, key, negatives, normalize):
    """Upcast to the accumulation dtype and normalise: (q, keys, q_norm, keys_norm),
    the norms None without normalisation."""
    acc = _acc_dtype(query.dtype)
    q = query.to(acc)
    keys = key.to(acc) if negatives is None else torch.cat([key.to(acc), negatives.to(acc)])
    q_norm = k_norm = None
    if normalize:
        q, q_norm = _normalized(q)
        keys, k_norm = _normalized(keys)
    return q, keys, q_norm, k_norm


def _key_rows(n, n_cols, need):
    """Rows [c0, c1) of [key; negatives] whose gradient is needed, or None: a frozen
    key tower or a MoCo queue without grad costs no GEMM."""
    _, need_dk, need_dneg, _ = need
    if not (need_dk or need_dneg):
        return None
    return (0 if need_dk else n, n_cols if need_dneg else n)


def _sweep(qs, keys, n_pairs, *, stats, col_stats, grad, lse_row, lse_col, g_row, g_col,
           need_dq, dk_rows):
    """One pass over the row blocks of S = qs keys^T (qs is already scaled by s).

    stats: compute lse_row (written) and the row losses; col_stats: the column LSE
    and losses; grad: overwrite each block with G.  Returns ((row_loss, col_loss),
    lse_col, dq / s, dk of key rows dk_rows = (c0, c1) or None, sum G S)."""
    C_ext = _ext.require("_C")
    n_rows, n_cols = qs.shape[0], keys.shape[0]
    dtype = qs.dtype
    code = _ext.DTYPE_CODE[dtype]
    nthreads = max(1, torch.get_num_threads())
    B = _block_rows(n_rows, n_cols, qs.element_size())
    buf = torch.empty(B, n_cols, dtype=dtype)
    keys_t = keys.t()
    pos = torch.empty(n_rows, dtype=dtype) if stats else None
    row_loss = torch.empty(n_rows, dtype=dtype) if stats else None
    col_max = col_sum = None
    if col_stats:
        col_max = torch.full((n_pairs,), -math.inf, dtype=dtype)
        col_sum = torch.zeros(n_pairs, dtype=dtype)
    dq = torch.empty_like(qs) if grad and need_dq else None
    dk = None
    if grad and dk_rows is not None:
        c0, c1 = dk_rows
        dk = keys.new_zeros(c1 - c0, keys.shape[1])
    gs = 0.0
    no_ptr = (0, 0)
    for r0 in range(0, n_rows, B):
        r1 = min(n_rows, r0 + B)
        S = buf[: r1 - r0]
        torch.mm(qs[r0:r1], keys_t, out=S)
        if col_stats:
            C_ext.block_col_stats(
                dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, n_cols=n_pairs,
                ld=n_cols, col_max=col_max.data_ptr(), col_sum=col_sum.data_ptr(),
                col_numel=n_pairs, nthreads=nthreads)
        # element counts are the slices' own: the C++ side checks them against B
        lse_blk = lse_row[r0:r1]
        pos_ptr = (pos[r0:r1].data_ptr(), pos[r0:r1].numel()) if stats else no_ptr
        loss_ptr = (row_loss[r0:r1].data_ptr(), row_loss[r0:r1].numel()) if stats else no_ptr
        g_ptr = (g_row[r0:r1].data_ptr(), g_row[r0:r1].numel()) if grad else no_ptr
        with_col = grad and lse_col is not None
        gs += C_ext.block_rows(
            dtype=code, S=S.data_ptr(), S_numel=S.numel(), B=r1 - r0, C=n_cols, ld=n_cols,
            row0=r0, n_pairs=n_pairs, lse=lse_blk.data_ptr(), lse_numel=lse_blk.numel(),
            compute_lse=stats, pos=pos_ptr[0], pos_numel=pos_ptr[1], row_loss=loss_ptr[0],
            row_loss_numel=loss_ptr[1], g_row=g_ptr[0],
            g_row_numel=g_ptr[1], lse_col=lse_col.data_ptr() if with_col else 0,
            g_col=g_col.data_ptr() if with_col else 0,
            col_numel=min(lse_col.numel(), g_col.numel()) if with_col else 0,
            write_grad=grad, nthreads=nthreads)
        if grad:
            if dq is not None:
                torch.mm(S, keys, out=dq[r0:r1])
            if dk is not None:
                dk.addmm_(S[:, c0:c1].t(), qs[r0:r1])
    lse_c = col_loss = None
    if col_stats:
        lse_c, col_loss = _col_lse_and_loss(col_max, col_sum, pos)
    return (row_loss, col_loss), lse_c, dq, dk, torch.tensor(gs, dtype=torch.float64)


def _col_lse_and_loss(col_max, col_sum, pos):
    """Column LSE and column loss (max - S_jj) + log sum: the loss without the
    cancellation of lse - S_jj when it is tiny."""
    log_sum = torch.log(col_sum)
    return col_max + log_sum, (col_max - pos) + log_sum


def _row_weights(reduction: str, n: int, symmetric: bool, grad: Tensor | None, dtype, device) -> Tensor:
    """dL/d(row loss) for each row (the column weights are the same when symmetric);
    grad is dL/d(output), None for 1.  Stays on the device (no host sync)."""
    half = 0.5 if symmetric else 1.0
    if reduction == "none":
        return (half * grad).to(dtype).contiguous()
    w = half / n if reduction == "mean" else half
    if grad is None:
        return torch.full((n,), w, dtype=dtype, device=device)
    return (grad.to(dtype) * w).expand(n).contiguous()


def _reduce(losses, symmetric, reduction, dtype):
    row_loss, col_loss = losses
    per_row = 0.5 * (row_loss + col_loss) if symmetric else row_loss
    if reduction == "mean":
        per_row = per_row.mean()
    elif reduction == "sum":
        per_row = per_row.sum()
    return per_row.to(dtype)


def _finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need):
    """Unscale, undo the normalisation, split keys/negatives, cast to input dtypes."""
    need_dq, need_dk, need_dneg, need_ds = need
    n = key.shape[0]
    rows = _key_rows(n, keys.shape[0], need)
    # a fresh empty tensor per unused output: outputs of a custom op may not alias
    out_q, out_k, out_n = query.new_empty(0), key.new_empty(0), query.new_empty(0)
    if need_dq:
        dq = dq * s
        if q_norm is not None:
            dq = _normalize_backward(dq, q, q_norm)
        out_q = dq.to(query.dtype)
    if need_dk or need_dneg:
        c0, c1 = rows
        if k_norm is not None:
            dk = _normalize_backward(dk, keys[c0:c1], k_norm[c0:c1])
        # a copy when both come from dk: two outputs must not share one buffer
        if need_dk:
            out_k = dk[:n].to(key.dtype, copy=need_dneg)
        if need_dneg:
            out_n = dk[n - c0:].to(negatives.dtype, copy=True)
    out_s = (gs / s).to(scale.dtype).reshape(()) if need_ds else scale.new_empty(0)
    return out_q, out_k, out_n, out_s


def _cpu_forward(query, key, negatives, scale, symmetric, normalize, reduction, precompute, need):
    q, keys, q_norm, k_norm = _inputs(query, key, negatives, normalize)
    s = float(scale)
    qs = q * s
    n = query.shape[0]
    acc = q.dtype
    lse_row = torch.empty(n, dtype=acc)
    lse_col = None
    dk_rows = _key_rows(n, keys.shape[0], need)
    if not symmetric and precompute:  # one pass: statistics and gradient together
        g_row = _row_weights(reduction, n, False, None, acc, q.device)
        losses, _, dq, dk, gs = _sweep(qs, keys, n, stats=True, col_stats=False, grad=True,
                                    lse_row=lse_row, lse_col=None, g_row=g_row, g_col=None,
                                    need_dq=need[0], dk_rows=dk_rows)
    else:
        losses, lse_col, _, _, _ = _sweep(qs, keys, n, stats=True, col_stats=symmetric, grad=False,
                                       lse_row=lse_row, lse_col=None, g_row=None, g_col=None,
                                       need_dq=False, dk_rows=None)
        if precompute:
            g = _row_weights(reduction, n, True, None, acc, q.device)
            _, _, dq, dk, gs = _sweep(qs, keys, n, stats=False, col_stats=False, grad=True,
                                      lse_row=lse_row, lse_col=lse_col, g_row=g, g_col=g,
                                      need_dq=need[0], dk_rows=dk_rows)
    loss = _reduce(losses, symmetric, reduction, query.dtype)
    if precompute:
        grads = _finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need)
    else:
        grads = (query.new_empty(0), key.new_empty(0), query.new_empty(0), scale.new_empty(0))
    lse_col_out = lse_col if symmetric else lse_row.new_empty(0)
    return (loss, lse_row, lse_col_out) + grads


def _cpu_backward(grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize,
                  reduction, need):
    q, keys, q_norm, k_norm = _inputs(query, key, negatives, normalize)
    s = float(scale)
    n = query.shape[0]
    acc = q.dtype
    g = _row_weights(reduction, n, symmetric, grad, acc, q.device)
    _, _, dq, dk, gs = _sweep(q * s, keys, n, stats=False, col_stats=False, grad=True,
                              lse_row=lse_row.contiguous(), lse_col=lse_col.contiguous() if symmetric else None,
                              g_row=g, g_col=g if symmetric else None,
                              need_dq=need[0], dk_rows=_key_rows(n, keys.shape[0], need))
    return _finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need)


# ---------------------------------------------------------------------------
# Triton backend (kernels/contrastive.py): forward saves only the LSEs, backward
# recomputes S in a row-outer (dQ, ds) and a column-outer (dK) kernel.
# ---------------------------------------------------------------------------

def _triton_config(d: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps).  A fixed small tile under the
    interpreter; on a GPU a first guess by D, to be replaced by measured tuning."""
    from .. import _backend

    block_d = max(16, 1 << (max(1, d) - 1).bit_length())
    if block_d > 1024:
        raise ValueError(f"backend='triton' supports feature dimension D <= 1024, got D = {d}")
    if _backend.interpreting():
        return 16, 16, block_d, 1
    if block_d <= 128:
        return 128, 64, block_d, 8
    if block_d <= 256:
        return 64, 64, block_d, 8
    return 64, 32, block_d, 8


def _triton_inputs(query, key, negatives, normalize):
    """Operands in the input dtype (normalised in float32 first), contiguous rows."""
    q, keys, q_norm, k_norm = _inputs(query, key, negatives, normalize)
    op_dtype = query.dtype if query.dtype != torch.float64 else torch.float32
    return (q, keys, q_norm, k_norm, q.to(op_dtype).contiguous(), keys.to(op_dtype).contiguous())


def _precision(dtype) -> str:
    """fp32 operands use tf32 exactly when torch would (torch.backends.cuda.matmul.allow_tf32,
    off by default); the setting means nothing for fp16/bf16 operands."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gpu_forward(backend, query, key, negatives, scale, symmetric, normalize, reduction):
    """The Triton or the CUDA C++ forward: the same buffers, the same kernel contract."""
    _, _, _, _, q_op, k_op = _triton_inputs(query, key, negatives, normalize)
    n, d = q_op.shape
    c = k_op.shape[0]
    dev = q_op.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    pos = torch.empty(n, dtype=torch.float32, device=dev)
    row_loss = torch.empty(n, dtype=torch.float32, device=dev)
    col_max = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    col_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    if backend == "cuda":
        _cuda_fwd(q_op, k_op, lse, pos, row_loss, col_max, col_sum, float(scale), symmetric)
    else:
        from ..kernels import contrastive as tk

        bm, bn, bd, warps = _triton_config(d)
        lock = torch.zeros(_cdiv(c, bn), dtype=torch.int32, device=dev)
        tk.contrastive_fwd_kernel[(_cdiv(n, bm),)](
            q_op, k_op, lse, pos, row_loss, col_max, col_sum, lock, n, c, d, q_op.stride(0), k_op.stride(0),
            float(scale), SYMMETRIC=symmetric, PRECISION=_precision(q_op.dtype), BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_D=bd, num_warps=warps)
    lse_col, col_loss = _col_lse_and_loss(col_max, col_sum, pos) if symmetric else (lse.new_empty(0), None)
    loss = _reduce((row_loss, col_loss), symmetric, reduction, query.dtype)
    empty = (query.new_empty(0), key.new_empty(0), query.new_empty(0), scale.new_empty(0))
    return (loss, lse, lse_col) + empty


def _gpu_backward(backend, grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize,
                  reduction, need):
    q, keys, q_norm, k_norm, q_op, k_op = _triton_inputs(query, key, negatives, normalize)
    n, d = q_op.shape
    c = k_op.shape[0]
    s = float(scale)
    g = _row_weights(reduction, n, symmetric, grad, torch.float32, q_op.device)
    # |G| <= 2 max|g| (row and column terms): G goes into the products in q_op's dtype
    gscale = operand_scale(q_op.dtype, g)
    lse_row = lse_row.float().contiguous()
    lse_c = lse_col.float().contiguous() if symmetric else lse_row  # any length-N buffer
    dq = gs = dk = None
    rows = _key_rows(n, c, need)
    launch = _cuda_bwd if backend == "cuda" else _triton_bwd
    dq, parts, dk = launch(q_op, k_op, lse_row, g * gscale if gscale != 1.0 else g, lse_c, s, symmetric,
                           need[0] or need[3], rows)
    if parts is not None:
        gs = parts.double().sum() / gscale
    if dk is not None:
        dk = (dk * (s / gscale)).to(keys.dtype)
    if dq is not None:
        dq = (dq / gscale if gscale != 1.0 else dq).to(q.dtype)
    return _finish_grads(query, key, negatives, scale, s, q, keys, q_norm, k_norm, dq, dk, gs, need)


def operand_scale(dtype, weights) -> float:
    """fp16 / bf16 operands: the power of two that brings max|weights| into [1, 2).  The
    backward kernels round G (proportional to these weights) to the operand dtype before
    G K; with weights ~ 1/N, G underflows fp16 at large N, and a large loss scale would
    overflow it.  Scaling the weights by a power of two and the results back is exact.
    1.0 for fp32 operands (and for weights all zero or not finite)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 1.0
    m = float(weights.abs().max()) if isinstance(weights, Tensor) else abs(float(weights))
    if not (0.0 < m < math.inf):
        return 1.0
    return math.ldexp(1.0, 1 - math.frexp(m)[1])


def _triton_bwd(q_op, k_op, lse_row, g, lse_c, s, symmetric, want_dq, rows):
    """-> (G K (N, D) and the per-program sums of G S, or Nones; G^T Q for key rows
    [c0, c1) or None), float32, from kernels/contrastive.py."""
    from ..kernels import contrastive as tk

    n, d = q_op.shape
    c = k_op.shape[0]
    bm, bn, bd, warps = _triton_config(d)
    prec = _precision(q_op.dtype)
    dq = parts = dk = None
    if want_dq:
        dq = torch.empty(n, d, dtype=torch.float32, device=q_op.device)
        grid = _cdiv(n, bm)
        parts = torch.empty(grid, dtype=torch.float32, device=q_op.device)
        tk.contrastive_bwd_dq_kernel[(grid,)](
            q_op, k_op, lse_row, g, lse_c, g, dq, parts, n, c, d, q_op.stride(0), k_op.stride(0),
            dq.stride(0), s, SYMMETRIC=symmetric, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            num_warps=warps)
    if rows is not None:
        c0, c1 = rows
        dk = torch.empty(c1 - c0, d, dtype=torch.float32, device=q_op.device)
        tk.contrastive_bwd_dk_kernel[(_cdiv(c1 - c0, bn),)](
            q_op, k_op, lse_row, g, lse_c, g, dk, n, c, d, c0, c1, q_op.stride(0), k_op.stride(0),
            dk.stride(0), s, SYMMETRIC=symmetric, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            num_warps=warps)
    return dq, parts, dk


# ---------------------------------------------------------------------------
# CUDA C++ backend (csrc/cuda/contrastive.cu through _C_cuda): the Triton kernels'
# contract, 64 x 64 tiles, fp16/bf16 on tensor cores, fp32 exact on CUDA cores.
# ---------------------------------------------------------------------------

def _cuda_args(**tensors):
    """pointer and element count of each tensor, as the _C_cuda functions take them."""
    out = {}
    for name, t in tensors.items():
        out[name] = t.data_ptr()
        out[f"{name}_numel"] = t.numel()
    return out


def cuda_call(name: str, device: torch.device, **kwargs) -> None:
    """_C_cuda.<name>(**kwargs) with `device` current and torch's current stream on it."""
    mod = _ext.require("_C_cuda")
    with torch.cuda.device(device):
        getattr(mod, name)(stream=torch.cuda.current_stream().cuda_stream, **kwargs)


def _cuda_fwd(q_op, k_op, lse, pos, row_loss, col_max, col_sum, s, symmetric):
    n, d = q_op.shape
    c = k_op.shape[0]
    lock = torch.zeros(_cdiv(c, _ext.require("_C_cuda").TILE), dtype=torch.int32, device=q_op.device)
    cuda_call("contrastive_fwd", q_op.device, dtype=_ext.CUDA_DTYPE_CODE[q_op.dtype],
              **_cuda_args(Q=q_op, K=k_op, lse=lse, pos=pos, row_loss=row_loss, col_max=col_max, col_sum=col_sum,
                           lock=lock),
              N=n, C=c, D=d, ldq=q_op.stride(0), ldk=k_op.stride(0), scale=s, symmetric=symmetric)


def _cuda_bwd(q_op, k_op, lse_row, g, lse_c, s, symmetric, want_dq, rows):
    n, d = q_op.shape
    c = k_op.shape[0]
    dev = q_op.device
    dq = parts = dk = None
    common = dict(dtype=_ext.CUDA_DTYPE_CODE[q_op.dtype], N=n, C=c, D=d, ldq=q_op.stride(0), ldk=k_op.stride(0),
                  scale=s, symmetric=symmetric)
    if want_dq:
        dq = torch.empty(n, d, dtype=torch.float32, device=dev)
        parts = torch.empty(_cdiv(n, _ext.require("_C_cuda").TILE), dtype=torch.float32, device=dev)
        cuda_call("contrastive_bwd", dev, dk=False, col0=0, col1=0, ldo=dq.stride(0), **common,
                  **_cuda_args(Q=q_op, K=k_op, lse=lse_row, g_row=g, lse_col=lse_c, g_col=g, out=dq, ds_part=parts))
    if rows is not None:
        c0, c1 = rows
        dk = torch.empty(c1 - c0, d, dtype=torch.float32, device=dev)
        cuda_call("contrastive_bwd", dev, dk=True, col0=c0, col1=c1, ldo=dk.stride(0), **common,
                  **_cuda_args(Q=q_op, K=k_op, lse=lse_row, g_row=g, lse_col=lse_c, g_col=g, out=dk,
                               ds_part=lse_row))
    return dq, parts, dk


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


_BACKWARD = {"cpu": _cpu_backward, "triton": functools.partial(_gpu_backward, "triton"),
             "cuda": functools.partial(_gpu_backward, "cuda")}


def _precomputes(backend: str, precompute: bool) -> bool:
    """Only the CPU backend forms the gradient during the forward."""
    return precompute and backend == "cpu"


def _check_backend(backend: str) -> None:
    if backend not in ("cpu", "triton", "cuda"):  # resolve() stops the others before they get here
        raise RuntimeError(f"metassl_fast::contrastive has no {backend!r} kernel")


# ---------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------

@torch.library.custom_op("metassl_fast::contrastive_fwd", mutates_args=())
def contrastive_fwd(
    query: Tensor, key: Tensor, negatives: Tensor | None, scale: Tensor, symmetric: bool,
    normalize: bool, reduction: str, precompute: bool, need_dq: bool, need_dk: bool,
    need_dneg: bool, need_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, lse_row (N,), lse_col (N,) or (0,), dq, dk, dneg, dscale); the
    four gradients are those of the reduced loss for grad_output = 1 when precompute
    (CPU backend only; other backends ignore it), else empty."""
    _check_backend(backend)
    need = (need_dq, need_dk, need_dneg, need_dscale)
    if backend in ("triton", "cuda"):  # never precompute: the backward recomputes S on the GPU
        return _gpu_forward(backend, query, key, negatives, scale, symmetric, normalize, reduction)
    return _cpu_forward(query, key, negatives, scale, symmetric, normalize, reduction, precompute, need)


@contrastive_fwd.register_fake
def _(query, key, negatives, scale, symmetric, normalize, reduction, precompute, need_dq, need_dk,
      need_dneg, need_dscale, backend):
    n = query.shape[0]
    acc = _acc_dtype(query.dtype)
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
    _check_backend(backend)
    n, acc = query.shape[0], _acc_dtype(query.dtype)
    for name, t, want in (("lse_row", lse_row, n), ("lse_col", lse_col, n if symmetric else None)):
        if want is not None and (t.shape != (want,) or t.dtype != acc):
            raise ValueError(f"{name} must be the forward's ({want},) {acc} statistics, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if grad.shape != ((n,) if reduction == "none" else ()):
        raise ValueError(f"grad has shape {tuple(grad.shape)}, which does not match reduction={reduction!r}")
    need = (need_dq, need_dk, need_dneg, need_dscale)
    return _BACKWARD[backend](grad, query, key, negatives, scale, lse_row, lse_col, symmetric,
                              normalize, reduction, need)


@contrastive_bwd.register_fake
def _(grad, query, key, negatives, scale, lse_row, lse_col, symmetric, normalize, reduction,
      need_dq, need_dk, need_dneg, need_dscale, backend):
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
        dq, dk, dneg, ds = contrastive_bwd(
            grad_loss, query, key, negatives, scale, lse_row, lse_col, ctx.symmetric,
            ctx.normalize, ctx.reduction, nq, nk, nn, ns, ctx.backend)
        outs = (dq if nq else None, dk if nk else None, dneg if nn else None, ds if ns else None)
    return outs + (None,) * 9


torch.library.register_autograd("metassl_fast::contrastive_fwd", _backward, setup_context=_setup_context)


torch.library.register_autograd("metassl_fast::contrastive_bwd", refuse_double_backward(_WHAT),
                                setup_context=lambda ctx, inputs, output: None)


def contrastive(query: Tensor, key: Tensor, negatives: Tensor | None, scale: Tensor,
                symmetric: bool, normalize: bool, reduction: str, backend: str) -> Tensor:
    """Run the fused op on validated inputs; returns the loss."""
    grads = torch.is_grad_enabled()
    need_dq = grads and query.requires_grad
    need_dk = grads and key.requires_grad
    need_dneg = grads and negatives is not None and negatives.requires_grad
    need_ds = grads and scale.requires_grad
    # the CPU backend forms the gradient of a scalar loss during the forward (one pass)
    precompute = reduction != "none" and (need_dq or need_dk or need_dneg or need_ds)
    out = torch.ops.metassl_fast.contrastive_fwd(
        query, key, negatives, scale, symmetric, normalize, reduction, precompute,
        need_dq, need_dk, need_dneg, need_ds, backend)
    return out[0]
