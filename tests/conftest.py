"""Test-session set-up shared by every test module."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter, on CPU tensors.  The variable
# must be set before any @triton.jit function is created, so here, before the tests
# import metassl_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the CPU backend's S block so that every shape spans several row blocks
    (tile edges)."""
    from metassl_fast.ops import _common as ops

    monkeypatch.setattr(ops, "TARGET_BLOCK_BYTES", 4096)
    monkeypatch.setattr(ops, "MIN_BLOCK_ROWS", 1)


@pytest.fixture(params=["own", "blas"])
def gemm(request, monkeypatch):
    """The CPU row sweep's three products each way (ops/_common.py sweep_gemm):
    csrc/cpu/gemm.cpp and torch's BLAS, whichever this CPU would pick by default, at every
    size (the own path's size floor lowered to 0)."""
    from metassl_fast.ops import _common as ops

    monkeypatch.setenv("METASSL_FAST_GEMM", request.param)
    monkeypatch.setattr(ops, "OWN_GEMM_MIN_MACS", 0)
    return request.param
