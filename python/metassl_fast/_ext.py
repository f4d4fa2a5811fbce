"""Deferred loading of the compiled modules.

Import of metassl_fast never fails because a compiled module is missing: the
failure is kept and raised, with what to do, by the call that needs the module.
"""
from __future__ import annotations

import importlib
import os
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


# The CPU module is built once per instruction-set level (CMakeLists.txt, METASSL_FAST_ISAS),
# best first; "_C" is whichever of them this CPU runs best.  avx2_w64 (a test build: AVX2
# instructions, the avx512 build's vector width) is imported only when METASSL_FAST_ISA asks.
CPU_ISAS = ("native", "avx512", "avx2", "base")
_NEEDS = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "avx2_w64": "x86-64-v3"}


def _import(name: str) -> ModuleType:
    return importlib.import_module(f"metassl_fast.{name}")


def _load_cpu() -> ModuleType:
    """The _C_<isa> build for this CPU: METASSL_FAST_ISA if set (a ValueError, raised by
    `import metassl_fast`, if it names no build, the CPU lacks its level or it is not
    installed: a forced build never falls back silently), else the widest installed build
    whose level cpuid reports (asked of _C_base, which runs everywhere)."""
    base = _import("_C_base")
    levels = base.cpu_levels()
    forced = os.environ.get("METASSL_FAST_ISA", "").strip()
    if forced:
        if forced not in CPU_ISAS + ("avx2_w64",):
            raise ValueError(f"METASSL_FAST_ISA={forced!r}: known builds are {CPU_ISAS + ('avx2_w64',)}")
        need = _NEEDS.get(forced)
        if need is not None and not levels.get(need, False):
            raise ValueError(f"METASSL_FAST_ISA={forced!r} needs a {need} CPU; this one reports {levels}")
        try:
            return _import(f"_C_{forced}")
        except ImportError as exc:
            raise ValueError(f"METASSL_FAST_ISA={forced!r}: that build is not installed ({exc}); build it with "
                             f"pip install . --config-settings=cmake.define.METASSL_FAST_ISAS='base;{forced}'") from exc
    for isa in CPU_ISAS:
        need = _NEEDS.get(isa)
        if need is not None and not levels.get(need, False):
            continue
        try:
            return _import(f"_C_{isa}")
        except ImportError:  # that build is not in this install (METASSL_FAST_ISAS)
            continue
    return base


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _cache:
        try:
            _cache[name] = (_load_cpu() if name == "_C" else _import(name), None)
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
