"""Triton backend of info_nce / clip_loss against the float64 reference.

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors,
fp32 and fp16 (bf16 loads are wrong under the interpreter: bf16 is checked on a GPU,
tests/test_contrastive_gpu.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import metassl_fast as msf
from metassl_fast.reference import contrastive_loss

from helpers import DEVICE, TOL, needs_triton

pytestmark = needs_triton


def _make(n, d, m, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(r, d, generator=g, dtype=torch.float64) for r in (n, n, m)]
    q, k, neg = (x.to(dtype).to(DEVICE).requires_grad_() for x in xs)
    return q, k, (neg if m else None)


def _grads(loss, inputs):
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64, device=loss.device)
    return torch.autograd.grad((loss.double() * w.reshape(loss.shape)).sum(), inputs)


def check(n, d, m, dtype, symmetric, reduction, normalize=True, temperature=0.3, seed=0):
    q, k, neg = _make(n, d, m, dtype, seed)
    t = torch.tensor(temperature, dtype=torch.float32, device=DEVICE, requires_grad=True)
    loss = msf.info_nce(q, k, temperature=t, negatives=neg, symmetric=symmetric, normalize=normalize,
                        reduction=reduction, backend="triton")
    inputs = [x for x in (q, k, neg, t) if x is not None]
    ours = [loss] + list(_grads(loss, inputs))
    ref_in = [x.detach().double().cpu().requires_grad_() for x in inputs]
    q64, k64 = ref_in[0], ref_in[1]
    n64 = ref_in[2] if neg is not None else None
    t64 = ref_in[-1]
    ref_loss = contrastive_loss(q64, k64, n64, 1.0 / t64, symmetric, normalize, reduction)
    ref = [ref_loss] + list(_grads(ref_loss, ref_in))
    atol, rtol = TOL[dtype]
    for name, a, b in zip(["loss", "dq", "dk", "dneg" if neg is not None else "dt", "dt"], ours, ref):
        assert a.dtype == (dtype if name != "dt" else torch.float32), (name, a.dtype)
        a = a.detach().double().cpu()
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        err, bound = (a - b).abs().max().item(), atol + rtol * b.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (n={n} d={d} m={m} {dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 17, 64, 65])
@pytest.mark.parametrize("d", [3, 16, 40])
@pytest.mark.parametrize("m", [0, 5])
def test_grid(dtype, n, d, m):
    for symmetric, reduction in itertools.product([False, True], ["mean", "none"]):
        check(n, d, m, dtype, symmetric, reduction, seed=n * 100 + d + m)


@pytest.mark.parametrize("symmetric", [False, True])
def test_sum_reduction_and_no_normalisation(symmetric):
    check(33, 16, 5, torch.float32, symmetric, "sum", normalize=False, temperature=3.0)


def test_clip_loss_triton():
    q, k, _ = _make(40, 24, 0, torch.float32, 7)
    s = torch.tensor(14.0, device=DEVICE, requires_grad=True)
    ours = msf.clip_loss(q, k, s, backend="triton")
    g = torch.autograd.grad(ours, (q, k, s))
    q64, k64, s64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, s))
    ref = contrastive_loss(q64, k64, None, s64, True, False, "mean")
    g64 = torch.autograd.grad(ref, (q64, k64, s64))
    for a, b in zip([ours, *g], [ref, *g64]):
        torch.testing.assert_close(a.detach().double().cpu(), b, rtol=1e-4, atol=1e-5)


def test_frozen_keys_and_queue():
    q, k, neg = _make(20, 16, 9, torch.float32, 3)
    k.requires_grad_(False)
    loss = msf.info_nce(q, k, negatives=neg, backend="triton")
    loss.backward()
    assert k.grad is None and neg.grad is not None and q.grad is not None
    q64, n64 = (x.detach().double().cpu().requires_grad_() for x in (q, neg))
    contrastive_loss(q64, k.detach().double().cpu(), n64, torch.tensor(1 / 0.07, dtype=torch.float64),
                     False, True, "mean").backward()
    torch.testing.assert_close(q.grad.double().cpu(), q64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(neg.grad.double().cpu(), n64.grad, rtol=1e-4, atol=1e-6)


def test_float64_is_refused():
    q = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="query"):
        msf.info_nce(q, q, backend="triton")


def test_large_d_is_refused():
    q = torch.randn(4, 1025, device=DEVICE)
    with pytest.raises(ValueError, match="D <= 1024"):
        msf.info_nce(q, q, backend="triton")
