"""What the backends of the inner-loop op share: the checks of a direct torch.ops call
(the kernels read raw memory) and the Triton block sizes."""
from __future__ import annotations

import torch

from ... import _ext
from ..._validate import MAX_STEPS

MAX_TRITON_ROWS = 128  # support / query rows per task on the Triton backend
MAX_TRITON_CLASSES = 64


def check_cpu(labels: tuple, **tensors) -> None:
    """The CPU kernels read raw memory: every float tensor must be contiguous and of one
    dtype (float32 or float64), labels contiguous int64, all on the CPU.  The public
    functions guarantee this; a direct call of the op gets an error instead of a read
    past a buffer."""
    dtype = None
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor")
        if t.numel() == 0:
            continue
        if t.dtype not in _ext.DTYPE_CODE or (dtype is not None and t.dtype != dtype):
            raise TypeError(f"{name} has dtype {t.dtype}: the kernel takes one of float32/float64 for all")
        dtype = t.dtype
    for i, t in enumerate(labels):
        if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError(f"labels argument {i} must be a contiguous int64 CPU tensor, got {t.dtype}")


def check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight,
                      triton_caps=True, label_values=True):
    """The C++ kernel checks every buffer's size itself; the GPU kernels cannot, so a
    direct call of the op is checked here: shapes, one device, float features, int64
    labels in [0, C)."""
    if support.dim() != 3 or query.dim() != 3 or weight.dim() != 2:
        raise ValueError("support (T, S, D), query (T, Q, D) and weight (C, D) have the wrong rank")
    T, S, D = support.shape
    C = weight.shape[0]
    want = {"labels": (labels, (T, S)), "query": (query, (T, query.shape[1], D)),
            "query_labels": (query_labels, (T, query.shape[1])), "weight": (weight, (C, D)), "bias": (bias, (C,)),
            "lr_w": (lr_w, (C, D)), "lr_b": (lr_b, (C,))}
    if task_weight is not None:
        want["task_weight"] = (task_weight, (T,))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != support.device:
            raise ValueError(f"{name} is on {t.device} but support is on {support.device}")
    if min(T, S, D, C, query.shape[1]) < 1:
        raise ValueError(f"every dimension must be >= 1, got T={T} S={S} D={D} C={C} Q={query.shape[1]}")
    # the (S x C) and (Q x C) blocks live in registers: at these caps every binary fits an
    # A100's and an H100's shared memory (bench/aot/), the second-order reverse pass with
    # a few KB of spills; beyond them it would spill more (the CUDA kernel checks its own)
    caps = (("support", S, MAX_TRITON_ROWS), ("query", query.shape[1], MAX_TRITON_ROWS),
            ("weight", C, MAX_TRITON_CLASSES)) if triton_caps else ()
    for name, n, cap in caps:
        if n > cap:
            raise ValueError(f"{name}: backend='triton' takes at most {cap} {'classes' if name == 'weight' else 'rows'}"
                             f" per task, got {n}; use backend='cpu' or 'torch'")
    for name, y in (("labels", labels), ("query_labels", query_labels)):
        if y.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {y.dtype}")
        if label_values and bool((y < 0).any() | (y >= C).any()):  # the C++ kernel checks its own
            raise ValueError(f"{name} must be in [0, {C})")


def check_adapt_fwd(support, labels, weight, bias, lr_w, lr_b, triton_caps=True, label_values=True):
    check_anil_shapes(support, labels, support[:, :1], labels[:, :1], weight, bias, lr_w, lr_b, None,
                      triton_caps=triton_caps, label_values=label_values)


def check_adapt_bwd(dW_K, db_K, support, labels, lr_w, lr_b, W_traj, b_traj, triton_caps=True, label_values=True):
    """The GPU kernels read these raw: -> (T, S, D, C, steps) once every shape is checked."""
    if support.dim() != 3 or lr_w.dim() != 2 or W_traj.dim() != 4:
        raise ValueError("support (T, S, D), lr_w (C, D) and W_traj (T, K+1, C, D) have the wrong rank")
    T, S, D = support.shape
    C = lr_w.shape[0]
    steps = W_traj.shape[1] - 1
    check_anil_shapes(support, labels, support[:, :1], labels[:, :1], lr_w, lr_b, lr_w, lr_b, None,
                      triton_caps=triton_caps, label_values=label_values)
    for name, t, shape in (("dW_K", dW_K, (T, C, D)), ("db_K", db_K, (T, C)), ("W_traj", W_traj, (T, steps + 1, C, D)),
                           ("b_traj", b_traj, (T, steps + 1, C))):
        if tuple(t.shape) != shape or t.device != support.device:
            raise ValueError(f"{name} must have shape {shape} on {support.device}, got {tuple(t.shape)} on {t.device}")
    return T, S, D, C, steps


def f32(*xs):
    """The GPU kernels compute in float32: contiguous float32 copies (or the tensors)."""
    return tuple(x.to(torch.float32).contiguous() for x in xs)



def check_op_sizes(support, weight, steps) -> None:
    """What every inner-loop op needs before anything is allocated from its sizes (a direct
    torch.ops call; the public functions ensure it): support (T, S, D) and weight (C, D)
    non-empty with one D, and steps in [0, MAX_STEPS] (a trajectory (T, steps + 1, C, D)
    past it overflows the allocator's stride arithmetic)."""
    if support.dim() != 3 or min(support.shape) < 1:
        raise ValueError(f"support must be (T, S, D) with T, S, D >= 1, got shape {tuple(support.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != support.shape[2]:
        raise ValueError(f"weight must be (C, D={support.shape[2]}) with C >= 1, got shape {tuple(weight.shape)}")
    if not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [0, {MAX_STEPS}], got {steps}")


def check_apply_shapes(grad, support, query, weight, coef, lamK, dzqT, WK) -> None:
    """anil_apply's operands are anil_loss_train's outputs: (T, S + 2C, S), (T, C, D),
    (T, C, Q), (T, C, D) for support (T, S, D), query (T, Q, D), weight (C, D) and a 0-dim
    grad.  (The C++ side checks sizes; these shapes fix the layout it reads.)"""
    if support.dim() != 3 or query.dim() != 3 or weight.dim() != 2:
        raise ValueError("support (T, S, D), query (T, Q, D) and weight (C, D) have the wrong rank")
    T, S, D = support.shape
    Q, C = query.shape[1], weight.shape[0]
    want = {"grad": (grad, ()), "query": (query, (T, Q, D)), "weight": (weight, (C, D)),
            "coef": (coef, (T, S + 2 * C, S)), "lamK": (lamK, (T, C, D)), "dzqT": (dzqT, (T, C, Q)),
            "WK": (WK, (T, C, D))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_cpu_layout(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight) -> None:
    """check_anil_shapes for the CPU kernel, which checks sizes and label values itself: the
    shapes that fix the layout it reads.  One tuple comparison on the way (9 us a call
    here; the full check costs 21): on a mismatch check_anil_shapes names the argument."""
    if support.dim() == 3 and query.dim() == 3 and weight.dim() == 2:
        T, S, D = support.shape
        Q, C = query.shape[1], weight.shape[0]
        got = (labels.shape, query.shape, query_labels.shape, weight.shape, bias.shape, lr_w.shape, lr_b.shape,
               task_weight.shape if task_weight is not None else (T,))
        if got == ((T, S), (T, Q, D), (T, Q), (C, D), (C,), (C, D), (C,), (T,)) and min(T, S, D, C, Q) >= 1:
            return
    check_anil_shapes(support, labels, query, query_labels, weight, bias, lr_w, lr_b, task_weight, triton_caps=False,
                      label_values=False)
    raise AssertionError("unreachable: check_anil_shapes raises on any mismatch")  # pragma: no cover
