"""Test-session set-up shared by every test module."""
import os

import torch

# Without a GPU, Triton kernels run under its interpreter, on CPU tensors.  The variable
# must be set before any @triton.jit function is created, so here, before the tests
# import metassl_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
