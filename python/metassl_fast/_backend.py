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
    elif backend in ("cuda", "triton"):
        # The GPU kernels are the subject of the GPU issue; until they land, say so.
        raise RuntimeError(
            f"{source}={backend!r}: the {backend} kernels of this op are not implemented in this "
            "version of metassl_fast; use backend='torch' on GPUs for now"
        )
    return backend


def _default(device: torch.device) -> str:
    global _warned_gpu_fallback
    if device.type == "cpu":
        return "cpu" if _ext.available("_C") else "torch"
    if not _warned_gpu_fallback:
        _warned_gpu_fallback = True
        warnings.warn(
            f"metassl_fast: no fused kernel for {device.type} tensors in this version; using the "
            "torch reference, which materialises the N x N similarity matrix",
            stacklevel=3,
        )
    return "torch"


def available_backends() -> dict[str, str]:
    """Backend name -> 'usable' or the reason it is not (for `metassl-fast info`)."""
    out = {}
    out["cpu"] = "usable" if _ext.available("_C") else f"not built: {_ext.load_error('_C')}"
    if _ext.available("_C_cuda"):
        out["cuda"] = "module built (kernels not implemented yet)"
    else:
        out["cuda"] = f"not built: {_ext.load_error('_C_cuda')}"
    try:
        import triton  # noqa: F401

        out["triton"] = "triton importable (kernels not implemented yet)"
    except ImportError:
        out["triton"] = "triton not installed"
    out["torch"] = "usable (reference)"
    return out
