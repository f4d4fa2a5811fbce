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
