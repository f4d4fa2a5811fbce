"""Argument checks at the Python boundary: every failure names the argument,
what was expected and what came (STYLE.md, convention 2)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def features(name: str, x: object, rank: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        want = "(N, D)" if rank == 2 else "(N, M, D)"
        raise ValueError(f"{name} must have rank {rank} (shape {want}), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): need at least one row")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(x.shape)})")
    return x


def same_dtype_device(ref_name: str, ref: Tensor, name: str, x: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}: cast them to one dtype")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def positive_scalar(name: str, value: object, device: torch.device) -> Tensor:
    """A float or a 0-dim (or one-element) floating tensor that is finite and > 0,
    returned as a 0-dim tensor on `device` (kept in the autograd graph)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        t = value.reshape(())
        if t.device != device:
            t = t.to(device)
        if not _compiling():  # a value check is data-dependent: skipped inside torch.compile
            v = float(t.detach())
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        return t
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return torch.tensor(v, dtype=torch.float64, device=device)


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value  # type: ignore[return-value]


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def labels(name: str, y: object, n: int, device: torch.device, n_name: str = "rows") -> Tensor:
    """Integer class labels, one per row: returned as a contiguous int64 tensor."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels, got {type(y).__name__}")
    if y.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must hold integer class labels (int64 or another integer dtype), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one label per {n_name}, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    return y.to(torch.int64).contiguous()


def scalar(name: str, value: object, device: torch.device) -> Tensor:
    """A finite float or 0-dim floating tensor of any sign, as a 0-dim tensor on `device`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        t = value.reshape(())
        t = t.to(device) if t.device != device else t
        if not _compiling() and not math.isfinite(float(t.detach())):
            raise ValueError(f"{name} must be finite, got {float(t.detach())}")
        return t
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=torch.float64, device=device)
