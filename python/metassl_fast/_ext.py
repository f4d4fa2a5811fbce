"""Deferred loading of the compiled modules.

Import of metassl_fast never fails because a compiled module is missing: the
failure is kept and raised, with what to do, by the call that needs the module.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

# The dtype codes the compiled kernels take (csrc/cpu/bindings.cpp, enum DType).
DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
# ... and the CUDA kernels (csrc/cuda/bindings.cpp): no float64, two 16-bit types.
CUDA_DTYPE_CODE = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}

_cache: dict[str, tuple[ModuleType | None, str | None]] = {}

_HOW = {
    "_C": "reinstall metassl_fast from source (pip install .) on a machine with a C++17 compiler and CMake",
    "_C_cuda": "reinstall metassl_fast from source on a machine where nvcc is on PATH "
    "(set METASSL_FAST_CUDA_ARCHS to choose architectures, default 80;90)",
}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"metassl_fast.{name}"), None)
        except ImportError as exc:  # not built, or built for another ABI
            _cache[name] = (None, f"{type(exc).__name__}: {exc}")
    return _cache[name]


def available(name: str) -> bool:
    return _load(name)[0] is not None


def load_error(name: str) -> str | None:
    return _load(name)[1]


def require(name: str) -> ModuleType:
    mod, err = _load(name)
    if mod is None:
        raise RuntimeError(f"metassl_fast.{name} is not available ({err}); to get it, {_HOW[name]}")
    return mod
