"""Which implementation runs an op: the backend= argument, else METASSL_FAST_BACKEND,
else the best one built for the inputs' device."""
from __future__ import annotations

import os
import warnings

import torch

from . import _ext

BACKENDS = ("cpu", "cuda", "triton", "torch")
ENV_VAR = "METASSL_FAST_BACKEND"

_warned_gpu_fallback = False


def resolve(backend: str | None, device: torch.device) -> str:
    """Return the backend name to run on `device`, raising ValueError/RuntimeError
    for an unknown, unusable or unbuilt backend."""
    source = "backend"
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            backend, source = env, ENV_VAR
    if backend is None:
        return _default(device)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{source}='cpu' runs on CPU tensors, but the inputs are on {device}")
        _ext.require("_C")
    elif backend == "triton":
        _require_triton(source, device)
    elif backend == "cuda":
        # CUDA C++ kernels of every contrastive loss and of the inner loop (csrc/cuda)
        _ext.require("_C_cuda")
        if device.type != "cuda":
            raise ValueError(f"{source}='cuda' runs on CUDA tensors, but the inputs are on {device}")
    return backend


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU (tests), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_triton(source: str, device: torch.device) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"{source}='triton' needs the triton package ({exc}); pip install triton") from exc
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"{source}='triton' runs on CUDA tensors (or on CPU tensors with "
                         f"TRITON_INTERPRET=1), but the inputs are on {device}")


def _default(device: torch.device) -> str:
    global _warned_gpu_fallback
    if device.type == "cpu":
        return "cpu" if _ext.available("_C") else "torch"
    if not _warned_gpu_fallback:
        _warned_gpu_fallback = True
        warnings.warn(
            f"metassl_fast: no GPU-verified fused kernel for {device.type} tensors in this version; "
            "using the torch reference, which materialises the N x N similarity matrix "
            "(backend='triton' opts in to the Triton kernels)",
            stacklevel=3,
        )
    return "torch"


def available_backends() -> dict[str, str]:
    """Backend name -> 'usable' or the reason it is not (for `metassl-fast info`)."""
    out = {}
    out["cpu"] = "usable" if _ext.available("_C") else f"not built: {_ext.load_error('_C')}"
    if _ext.available("_C_cuda"):
        out["cuda"] = ("built: every contrastive loss and the inner loop (opt-in, backend='cuda'; "
                       "not yet the default: no GPU has verified them)")
    else:
        out["cuda"] = f"not built: {_ext.load_error('_C_cuda')}"
    try:
        import triton  # noqa: F401

        out["triton"] = ("usable (CUDA tensors; not yet the default: no GPU has run it)"
                         if torch.cuda.is_available() else
                         "importable; runs on a CUDA device, or on the CPU with TRITON_INTERPRET=1")
    except ImportError:
        out["triton"] = "triton not installed"
    out["torch"] = "usable (reference)"
    return out
