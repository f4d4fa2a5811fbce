"""The CUDA C++ contrastive kernels (csrc/cuda/contrastive.cu) run on the CPU.

No GPU here: tests/cuda_emu/emu.h emulates the CUDA features the kernels use (one
host thread per CUDA thread, barriers, shuffles, atomics, WMMA by its documented
load / mma / store semantics, fp16 / bf16 rounding), and run_contrastive.cpp drives
the real kernel code: forward, then dQ and dK.  Every output is compared with the
float64 formulas written out here, on shapes that cut tiles (64), feature chunks (32)
and output chunks (64 fp32 / 128 fp16, bf16).  What it cannot check: the hardware's
fragment layout, the memory model under concurrency, speed (tests/test_contrastive_gpu.py
runs the kernels on a GPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CODES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 4e-2)}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    exe = str(tmp_path_factory.mktemp("cuda_emu") / "run_contrastive")
    subprocess.run([gxx, "-std=c++20", "-O2", "-pthread", "-o", exe, os.path.join(HERE, "cuda_emu", "run_contrastive.cpp")],
                   check=True, capture_output=True, text=True)
    return exe


def _run(exe, tmp_path, dtype, q, k, g, scale, symmetric):
    n, d = q.shape
    c = k.shape[0]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.cat([q.flatten(), k.flatten(), g]).float().numpy().tofile(src)
    subprocess.run([exe, str(CODES[dtype]), str(n), str(c), str(d), str(int(symmetric)), repr(scale), str(src),
                    str(dst)], check=True, timeout=600)
    out = torch.from_numpy(__import__("numpy").fromfile(dst, dtype="float32")).double()
    sizes = [n, n, n, n, n * d, 1, c * d]
    parts = list(torch.split(out, sizes))
    assert sum(sizes) == out.numel()
    lse, pos, row_loss, lse_col, dq, ds, dk = parts
    return dict(lse=lse, pos=pos, row_loss=row_loss, lse_col=lse_col, dq=dq.view(n, d), ds=ds[0], dk=dk.view(c, d))


def _reference(q, k, g, scale, symmetric):
    n, c = q.shape[0], k.shape[0]
    S = scale * q @ k.T
    lse = torch.logsumexp(S, 1)
    pos = S.diagonal()
    eye = torch.eye(n, c, dtype=S.dtype)
    G = g[:, None] * (torch.exp(S - lse[:, None]) - eye)
    lse_col = torch.zeros(n, dtype=S.dtype)
    if symmetric:
        lse_col = torch.logsumexp(S[:, :n], 0)
        G[:, :n] += g[None, :] * (torch.exp(S[:, :n] - lse_col[None, :]) - torch.eye(n, dtype=S.dtype))
    return dict(lse=lse, pos=pos, row_loss=lse - pos, lse_col=lse_col, dq=G @ k, ds=(G * S).sum(), dk=G.T @ q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(1, 0, 3), (3, 5, 40), (65, 0, 130), (64, 70, 16), (130, 7, 33)])
def test_cuda_kernels_against_float64(runner, tmp_path, dtype, n, m, d):
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + d)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n + m, d, generator=g, dtype=torch.float64), dim=1)
    q, k = q.to(dtype).double(), k.to(dtype).double()  # what the kernel reads
    w = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    scale = 7.5
    for symmetric in (False, True):
        got = _run(runner, tmp_path, dtype, q, k, w.float().double(), scale, symmetric)
        want = _reference(q, k, w.float().double(), scale, symmetric)
        atol, rtol = TOL[dtype]
        for name in want:
            if name == "lse_col" and not symmetric:
                continue
            a, b = got[name], want[name]
            assert torch.isfinite(a).all(), f"{name}: unwritten or non-finite elements ({dtype} {n} {m} {d})"
            err, bound = (a - b).abs().max().item(), atol + rtol * b.abs().max().item()
            assert err <= bound, f"{name}: {err:.3e} > {bound:.3e} ({dtype} n={n} m={m} d={d} sym={symmetric})"
