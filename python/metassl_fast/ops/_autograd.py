"""Autograd pieces shared by the custom ops."""
from __future__ import annotations

import torch


def double_backward_error(what: str) -> RuntimeError:
    return RuntimeError(f"metassl_fast: double backward (a gradient of the gradient) of {what} is not "
                        "supported; use backend='torch' for higher-order derivatives")


def refuse_double_backward(what: str):
    """An autograd formula for a backward op: differentiating it raises a clear error."""
    def backward(ctx, *grads):
        raise double_backward_error(what)
    return backward


def refuse_create_graph(what: str) -> None:
    """A gradient precomputed in the forward is a constant to autograd: differentiating it
    again (create_graph=True) would silently drop terms, so refuse instead."""
    if torch.is_grad_enabled():
        raise double_backward_error(what)


def scale_precomputed(grads, grad_output, needed):
    """Gradients formed in the forward for grad_output = 1, scaled by the real one; None
    where an input needs no gradient.  Always a new tensor, never the saved one: a
    saved tensor handed out as .grad would be changed in place by the optimiser or
    clip_grad_norm_ and break a retained graph."""
    return tuple(g * grad_output.to(g.dtype) if need else None for g, need in zip(grads, needed))
