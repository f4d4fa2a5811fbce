"""What the convex-head ops check of a direct torch.ops call (the public layer,
meta/convex.py, ensures it with named errors first)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

KIND_CODE = {"ridge": 0, "svm": 1, "logreg": 2}


def check_cpu_buffers(support: Tensor, n_way: int, query: Tensor | None = None, **saved: Tensor) -> None:
    """What the C++ kernel reads as raw memory (it checks only element counts): every tensor
    a contiguous CPU tensor, labels int64, and the saved solution of a backward call in the
    dtype and shape convex_fwd gives it (A, b, factor float64; W, logits the support's dtype):
    a strided, expanded or float32 stand-in would be read past its storage."""
    T, S, D = support.shape
    Q = 0 if query is None else query.shape[1]
    f64 = torch.float64
    want = {"A": ((T, S, n_way), f64), "b": ((T, n_way), f64), "factor": ((T, S, S), f64),
            "W": ((T, n_way, D), support.dtype), "logits": ((T, Q, n_way), support.dtype)}
    tensors = {"support": support, **({} if query is None else {"query": query}), **saved}
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor for backend='cpu'")
        if name in want and (tuple(t.shape), t.dtype) != want[name]:
            shape, dtype = want[name]
            raise ValueError(f"{name} must be {dtype} of shape {shape} (as convex_fwd returns it), got {t.dtype} "
                             f"{tuple(t.shape)}")


def check_convex(support: Tensor, labels: Tensor, query: Tensor | None, query_labels: Tensor | None, kind: str,
                 n_way: int, reg: Tensor, scale: Tensor, label_smoothing: float, dual_reg: float, tol: float,
                 max_iter: int, **saved: Tensor) -> None:
    if kind not in KIND_CODE:
        raise ValueError(f"kind must be one of {tuple(KIND_CODE)}, got {kind!r}")
    if support.dim() != 3 or 0 in support.shape:
        raise ValueError(f"support must be (T, S, D) with T, S, D >= 1, got {tuple(support.shape)}")
    if support.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"support must be float32 or float64, got {support.dtype}")
    T, S, D = support.shape
    if labels.shape != (T, S) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({T}, {S}), got {labels.dtype} {tuple(labels.shape)}")
    if query is not None:
        if query.dim() != 3 or query.shape[0] != T or query.shape[2] != D or query.shape[1] == 0:
            raise ValueError(f"query must be (T={T}, Q >= 1, D={D}), got {tuple(query.shape)}")
        if query.dtype != support.dtype:
            raise TypeError(f"query has dtype {query.dtype} but support has {support.dtype}")
        if query_labels is None or query_labels.shape != query.shape[:2] or query_labels.dtype != torch.int64:
            raise ValueError(f"query_labels must be int64 of shape {tuple(query.shape[:2])}")
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be an int >= 1, got {n_way!r}")
    for name, t in (("reg", reg), ("scale", scale)):
        if t.dim() != 0 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 0-dim floating tensor, got {t.dtype} {tuple(t.shape)}")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (0 < dual_reg < math.inf) or not (0 < tol < 1) or not 1 <= max_iter <= 2**31 - 1:
        raise ValueError(f"need dual_reg > 0 finite, tol in (0, 1), max_iter in [1, 2**31 - 1]; got {dual_reg}, "
                         f"{tol}, {max_iter}")
    for name, t in saved.items():
        if t.device != support.device:
            raise ValueError(f"{name} is on {t.device} but support is on {support.device}")
    grad = saved.get("grad")
    if grad is not None and grad.shape not in ((), (T,)):
        raise ValueError(f"grad must be 0-dim or ({T},), got {tuple(grad.shape)}")
    if not torch.compiler.is_compiling():
        for name, t in (("reg", reg), ("scale", scale)):
            v = float(t)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
