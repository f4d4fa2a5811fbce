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
    """Gradients formed in the forward for grad_output = 1, scaled by the real one.
    A grad_output of exactly 1 (the usual loss.backward()) skips the multiply; None
    where an input needs no gradient."""
    unit = _eager(grad_output) and grad_output.numel() == 1 and float(grad_output) == 1.0
    return tuple((g if unit else g * grad_output.to(g.dtype)) if need else None
                 for g, need in zip(grads, needed))


def _eager(t) -> bool:
    """A real tensor outside any tracing (torch.compile, AOT autograd, fake or proxy
    modes), where reading its value is allowed."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)
