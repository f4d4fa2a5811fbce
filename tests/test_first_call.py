"""A loss's first call in eager mode does not go through torch.library's dispatcher
wrapper, which imports torch._dynamo on first use (about 3 s and 150 MiB on the 2-core
CI machine; issue 14: "the first call's cost"): the entries run the same implementation
through an autograd.Function (ops/_common.py eager_transformable).  torch.compile, a
dispatch mode or a tensor subclass still get the op (test_hardening records it under a
TorchDispatchMode; the compile tests trace it)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metassl_fast as msf
from metassl_fast import _ext

needs_c = pytest.mark.skipif(not _ext.available("_C"), reason="the C++ CPU module is not built")

_SCRIPT = """
import sys, torch, metassl_fast as msf
from metassl_fast import meta
g = torch.Generator().manual_seed(0)
q, k = torch.randn(9, 5, generator=g, requires_grad=True), torch.randn(9, 5, generator=g)
y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
msf.info_nce(q, k).backward()
msf.info_nce(q, k, reduction="none").sum().backward()  # the recomputing backward op too
msf.clip_loss(q, k, 10.0).backward()
msf.supcon_loss(q, y).backward()
msf.supcon_loss(q, y, reduction="none").sum().backward()
msf.siglip_loss(q, k, 10.0, -10.0).backward()
X = torch.randn(2, 6, 5, generator=g, requires_grad=True)
ys = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
W, b = torch.zeros(3, 5, requires_grad=True), torch.zeros(3, requires_grad=True)
meta.anil_loss(X, ys, X, ys, W, b, steps=2).backward()
print("DYNAMO", "torch._dynamo" in sys.modules)
"""


@needs_c
def test_first_eager_calls_do_not_import_the_compiler():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DYNAMO False" in proc.stdout, proc.stdout


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metassl_fast":
            self.ops.add(func._opname)
        return func(*args, **(kwargs or {}))


@needs_c
def test_eager_path_equals_the_op_and_a_dispatch_mode_sees_the_op():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(13, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for reduction in ("mean", "none"):
        fast = msf.info_nce(q, k, temperature=0.2, symmetric=True, reduction=reduction, backend="cpu")
        gq, gk = torch.autograd.grad(fast.sum(), (q, k))
        seen = _Seen()
        with seen:
            slow = msf.info_nce(q, k, temperature=0.2, symmetric=True, reduction=reduction, backend="cpu")
            sq, sk = torch.autograd.grad(slow.sum(), (q, k))
        assert "contrastive_fwd" in seen.ops
        assert ("contrastive_bwd" in seen.ops) == (reduction == "none")
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        torch.testing.assert_close((gq, gk), (sq, sk), rtol=0, atol=0)
