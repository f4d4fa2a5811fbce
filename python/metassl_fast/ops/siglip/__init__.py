"""The SigLIP op: torch.library custom ops metassl_fast::siglip_fwd / siglip_bwd, their
fakes and autograd, and the entry of the public layer (loss).

    x_ij = s q_i . k_j + b,  z_ij = +1 at column diag_offset + i of row i, -1 elsewhere
    loss = (1/N) sum_ij softplus(-z_ij x_ij),   dL/dx_ij = -z_ij w sigmoid(-z_ij x_ij), w = 1/N
    dQ = s (dL/dx) K,  dK = s (dL/dx)^T Q,  ds = sum dL/dx (q.k),  db = sum dL/dx

Backends, one contract (run), one file each: cpu.py (csrc/cpu/siglip.cpp), triton.py
(kernels/siglip.py), cuda.py (csrc/cuda/siglip.cu); backend="torch" is
reference/siglip.py, plain autograd outside the custom ops.  The loss is a scalar, so
the gradient is formed during the forward and backward only rescales it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import distributed as _dist
from ...reference.siglip import siglip_loss as _reference
from .._common import (backend_module, backward_op, call_op, check_op, eager_transformable,
                       func_transforms, needs, one_device,
                       refuse_create_graph, register_backward_op, scale_precomputed, transformable)

_WHAT = "the contrastive family losses"


def _check(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, diag_offset: int, **others) -> None:
    check_op(query, key, scale, bias=bias, **others)
    n, c = query.shape[0], key.shape[0]
    if diag_offset < 0 or diag_offset + n > c:
        raise ValueError(f"diag_offset={diag_offset}: the positive columns [{diag_offset}, {diag_offset + n}) "
                         f"are not all among the {c} keys")
    if bias.dim() != 0:
        raise ValueError(f"bias must be a 0-dim tensor, got shape {tuple(bias.shape)}")


@torch.library.custom_op("metassl_fast::siglip_fwd", mutates_args=())
def siglip_fwd(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, diag_offset: int, precompute: bool,
               need_dq: bool, need_dk: bool, need_dscale: bool, need_dbias: bool, backend: str,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dq, dk, dscale, dbias), the gradients for grad_output = 1 when precompute.
    query (N, D), key (M, D): query i's positive is key diag_offset + i; the loss is the
    sum over the N x M pairs divided by N (open_clip's per-rank normalisation)."""
    one_device("siglip_fwd", query, key, scale, bias)
    impl = backend_module(__name__, "siglip", backend)
    _check(query, key, scale, bias, diag_offset)
    loss, grads = impl.run(query, key, scale, bias, diag_offset, None, precompute,
                       (need_dq, need_dk, need_dscale, need_dbias))
    if grads is None:
        grads = (query.new_empty(0), key.new_empty(0), scale.new_empty(0), bias.new_empty(0))
    return (loss,) + grads


@siglip_fwd.register_fake
def _(query, key, scale, bias, diag_offset, precompute, need_dq, need_dk, need_dscale, need_dbias, backend):
    one_device("siglip_fwd", query, key, scale, bias)
    def like(x, needed):
        return x.new_empty(x.shape if (precompute and needed) else (0,))

    return (query.new_empty(()), like(query, need_dq), like(key, need_dk), like(scale, need_dscale),
            like(bias, need_dbias))


@torch.library.custom_op("metassl_fast::siglip_bwd", mutates_args=())
def siglip_bwd(grad: Tensor, query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
               need_dq: bool, need_dk: bool, need_dscale: bool, need_dbias: bool, backend: str,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward: (dq, dk, dscale, dbias), each empty where not needed."""
    one_device("siglip_bwd", grad, query, key, scale, bias)
    impl = backend_module(__name__, "siglip", backend)
    _check(query, key, scale, bias, diag_offset, grad=grad)
    if grad.shape != ():
        raise ValueError(f"grad must be 0-dim (the loss is a scalar), got shape {tuple(grad.shape)}")
    # the weight goes into the kernel; a zero upstream gradient gives zero gradients
    _, grads = impl.run(query, key, scale, bias, diag_offset, grad, True,
                    (need_dq, need_dk, need_dscale, need_dbias))
    return grads


@siglip_bwd.register_fake
def _(grad, query, key, scale, bias, diag_offset, need_dq, need_dk, need_dscale, need_dbias, backend):
    one_device("siglip_bwd", grad, query, key, scale, bias)
    return tuple(x.new_empty(x.shape if nd else (0,)) for x, nd in
                 ((query, need_dq), (key, need_dk), (scale, need_dscale), (bias, need_dbias)))


def _setup(ctx, inputs, output):
    query, key, scale, bias, diag_offset, precompute, *_rest, backend = inputs
    ctx.precompute, ctx.backend, ctx.diag_offset = precompute, backend, diag_offset
    if precompute:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(query, key, scale, bias)


def _backward(ctx, grad_loss, *_unused):
    need = ctx.needs_input_grad[:4]
    if ctx.precompute:
        refuse_create_graph(_WHAT)
        outs = scale_precomputed(ctx.saved_tensors, grad_loss, need)
    else:
        outs = backward_op(siglip_bwd, _WHAT, grad_loss, *ctx.saved_tensors, ctx.diag_offset, *need, ctx.backend,
                           ctx=ctx)
        outs = tuple(o if nd else None for o, nd in zip(outs, need))
    return tuple(outs) + (None,) * 7


torch.library.register_autograd("metassl_fast::siglip_fwd", _backward, setup_context=_setup)
_Transformable = transformable(torch.ops.metassl_fast.siglip_fwd, _setup, _backward, "siglip_fwd")
_Eager = eager_transformable(siglip_fwd, _setup, _backward, "siglip_fwd_eager")
register_backward_op("metassl_fast::siglip_bwd", _WHAT)


def loss(query: Tensor, key: Tensor, scale: Tensor, bias: Tensor, *, backend: str, world=(0, 1, None)) -> Tensor:
    """The SigLIP loss of validated inputs on the resolved backend; world = (rank, world
    size, process group): with more than one rank this rank's N rows are scored against
    every rank's keys (gathered with gradient) and the sum is divided by the local N."""
    rank, ws, group = world
    offset = 0
    if ws > 1:
        key = _dist.gather(key, "text_features", group)
        offset = rank * query.shape[0]
    if backend == "torch":
        return _reference(query, key, scale, bias, offset)
    need = needs(query, key, scale, bias)
    precompute = any(need) and not func_transforms()
    return call_op(torch.ops.metassl_fast.siglip_fwd, _Transformable, query, key, scale, bias, offset, precompute,
                   *need, backend, eager=_Eager)[0]
