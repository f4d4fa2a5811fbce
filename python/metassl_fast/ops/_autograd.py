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


class _RefuseBackward(torch.autograd.Function):
    """Identity (a view of x) whose backward raises: the result of a backward computed in
    closed form, handed out under create_graph=True, so that the first-order gradient
    is usable and only differentiating it again is refused.  `anchor` (an input of the
    op that requires grad) ties the result into the graph."""

    @staticmethod
    def forward(ctx, what, x, anchor):
        ctx.what = what
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise double_backward_error(ctx.what)


def refuse_later(what: str, anchors, *grads):
    """The gradients as they are, or (under create_graph=True) wrapped so that their own
    backward raises the double-backward error; anchors: the op's saved inputs."""
    anchor = next((a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad), None)
    if not torch.is_grad_enabled() or anchor is None:
        return grads
    return tuple(None if g is None else _RefuseBackward.apply(what, g, anchor) for g in grads)


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
