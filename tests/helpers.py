"""Shared by the test modules: where the Triton kernels can run, and the tolerances of
each input dtype against a float64 reference."""
import os

import pytest
import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

# Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="triton is not installed, or there is no GPU and TRITON_INTERPRET is not 1")

# max |ours - ref| <= atol + rtol * max|ref|, per input dtype (reference in float64)
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 4e-2),
}
