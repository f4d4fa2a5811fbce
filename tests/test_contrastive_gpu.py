"""GPU-only checks of the contrastive backends (pytest -m gpu; bench/gpu_check.sh runs them).

Skipped, with the reason, on machines without a CUDA device.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import metassl_fast as msf

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not msf._ext.available("_C_cuda"), reason=f"_C_cuda not built: {msf._ext.load_error('_C_cuda')}"))]
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 4e-2)}


def _inputs(n, d, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(r, d, generator=g, device="cuda").to(dtype).requires_grad_() if r else None
            for r in (n, n, m)]


def _run(backend, q, k, neg, symmetric, reduction):
    t = torch.tensor(0.3, device=q.device, requires_grad=True)
    loss = msf.info_nce(q, k, temperature=t, negatives=neg, symmetric=symmetric,
                        reduction=reduction, backend=backend)
    inputs = [x for x in (q, k, neg, t) if x is not None]
    w = torch.linspace(0.5, 1.5, loss.numel(), device=q.device).reshape(loss.shape)
    return [loss] + list(torch.autograd.grad((loss.float() * w).sum(), inputs))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 63, 64, 65, 257, 1000])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("m", [0, 5, 100])
def test_against_float64_reference(backend, dtype, n, d, m):
    q, k, neg = _inputs(n, d, m, dtype, seed=n + d + m)
    for symmetric, reduction in [(False, "mean"), (True, "mean"), (True, "none"), (False, "sum")]:
        ours = _run(backend, q, k, neg, symmetric, reduction)
        ref_in = [x.detach().double().requires_grad_() if x is not None else None for x in (q, k, neg)]
        ref = _run("torch", *ref_in, symmetric, reduction)
        atol, rtol = TOL[dtype]
        for i, (a, b) in enumerate(zip(ours, ref)):
            a, b = a.double(), b.double()
            assert torch.isfinite(a).all(), i
            err, bound = (a - b).abs().max().item(), atol + rtol * b.abs().max().item()
            what = f"output {i}: {err:.3e} > {bound:.3e} ({dtype} n={n} d={d} m={m} {symmetric} {reduction})"
            assert err <= bound, what


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_every_output_element_is_written(backend, monkeypatch):
    """Poison fresh buffers with NaN: an element a kernel forgets to write stays NaN."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_cuda and out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned)
    q, k, neg = _inputs(333, 72, 40, torch.bfloat16)
    for symmetric in (False, True):
        outs = _run(backend, q, k, neg, symmetric, "none")
        assert all(torch.isfinite(o.float()).all() for o in outs)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_repeat_runs_are_bitwise_equal(backend):
    """Backward has no atomics; the forward's column merge order may vary, so the
    one-sided loss is compared bit for bit and the symmetric one within rounding."""
    q, k, neg = _inputs(2048, 128, 64, torch.bfloat16)
    a = _run(backend, q, k, neg, False, "mean")
    b = _run(backend, q, k, neg, False, "mean")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    a = _run(backend, q, k, neg, True, "mean")
    b = _run(backend, q, k, neg, True, "mean")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_huge_batch_memory_is_flat(backend):
    """N = 65536, D = 256, bf16: the loss's extra memory stays O(N D)."""
    q, k, _ = _inputs(65536, 256, 0, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    msf.clip_loss(q, k, 100.0, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 65536 * 256, f"{extra / 2**20:.0f} MiB"  # eager: 65536^2 * 4 B = 16 GiB


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compute_sanitizer_memcheck(backend):
    code = ("import torch, metassl_fast as msf\n"
            "for dt in (torch.float32, torch.bfloat16):\n"
            "    q = torch.randn(37, 40, device='cuda', dtype=dt, requires_grad=True)\n"
            "    k = torch.randn(37, 40, device='cuda', dtype=dt, requires_grad=True)\n"
            "    n = torch.randn(9, 40, device='cuda', dtype=dt, requires_grad=True)\n"
            f"    msf.info_nce(q, k, negatives=n, symmetric=True, backend={backend!r}).backward()\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
