"""Gradients of the few-shot kernels in buffers past 4 MiB, for which ops/_common.fresh_like asks
for transparent huge pages (_C.advise_huge_pages): the advice must change nothing but speed.
The same losses and gradients as the torch backend in float64, and the advice's own contract
(refused for small, null or wrapping ranges)."""
from __future__ import annotations

import os

import pytest
import torch

from metassl_fast import _ext, meta
from metassl_fast.ops._common import HUGE_PAGE_MIN_BYTES, fresh_like

F64 = torch.float64


def _cpu():
    try:
        return _ext.require("_C")
    except Exception as exc:  # a build without the CPU module: these tests have nothing to check
        pytest.skip(f"_C not built: {exc}")


def test_advise_contract():
    mod = _cpu()
    big = torch.empty(HUGE_PAGE_MIN_BYTES // 4 * 4)
    given = mod.advise_huge_pages(big.data_ptr(), big.numel() * 4)
    assert isinstance(given, bool)
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert given  # a Linux kernel with THP accepts the advice on an anonymous mapping
    assert mod.advise_huge_pages(big.data_ptr(), 1000) is False  # under two huge pages
    assert mod.advise_huge_pages(0, 1 << 30) is False
    assert mod.advise_huge_pages(2**64 - 4096, 1 << 30) is False  # the range would wrap


def test_fresh_like_is_empty_like():
    _cpu()
    for shape in ((3, 5), (4, 1024, 1024)):
        t = torch.randn(*shape, dtype=F64) if len(shape) == 2 else torch.empty(*shape)
        out = fresh_like(t)
        assert out.shape == t.shape and out.dtype == t.dtype and out.is_contiguous()
        assert out.data_ptr() != t.data_ptr()


def _episode(T, S, Q, D, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, D, generator=g, dtype=F64)
    xq = torch.randn(T, Q, D, generator=g, dtype=F64)
    y = torch.arange(S).remainder(C).repeat(T, 1)
    yq = torch.arange(Q).remainder(C).repeat(T, 1)
    return x, y, xq, yq


def _grads(loss_of, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = loss_of(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


# T=2, Q=100, D=3000 in float64: d query is 4.8 MB, past the advice's threshold
@pytest.mark.parametrize("kind", ["ridge", "svm"])
def test_convex_gradients_past_the_threshold(kind):
    _cpu()
    x, y, xq, yq = _episode(2, 5, 100, 3000, 5)
    assert xq.numel() * xq.element_size() >= HUGE_PAGE_MIN_BYTES
    fn = {"ridge": lambda b: lambda x, xq: meta.ridge_loss(x, y, xq, yq, lam=5.0, n_way=5, backend=b),
          "svm": lambda b: lambda x, xq: meta.svm_loss(x, y, xq, yq, C=0.1, n_way=5, backend=b)}[kind]
    ours, ref = _grads(fn("cpu"), x, xq), _grads(fn("torch"), x, xq)
    tol = {"ridge": 1e-10, "svm": 1e-5}[kind]  # svm: both solve to the dual's 1e-6 tolerance, not exactly
    for a, b in zip(ours, ref):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max()), (float((a - b).abs().max()),
                                                                           float(b.abs().max()))


def test_anil_gradients_past_the_threshold():
    _cpu()
    x, y, xq, yq = _episode(2, 5, 100, 3000, 5)
    g = torch.Generator().manual_seed(1)
    W = 0.01 * torch.randn(5, 3000, generator=g, dtype=F64)
    b = torch.zeros(5, dtype=F64)

    def fn(backend):
        return lambda x, xq, W, b: meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=3, backend=backend)

    ours, ref = _grads(fn("cpu"), x, xq, W, b), _grads(fn("torch"), x, xq, W, b)
    for a, r in zip(ours, ref):
        assert float((a - r).abs().max()) <= 1e-10 * float(r.abs().max()), (float((a - r).abs().max()),
                                                                            float(r.abs().max()))
