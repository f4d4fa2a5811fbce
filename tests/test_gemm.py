"""The CPU row sweep's own products (csrc/cpu/gemm.cpp) and how the sweep picks them.

The raw entries against torch's float64 products on shapes around the micro-tile edges
(MR = 6 or 12 rows, NR = 2 vectors, K chunks of 128 / 256), both dtypes, with row strides
longer than the rows, alpha and accumulation; bad sizes refused by name; the sweep
reaching the chosen path.  The losses themselves run each way in the per-op float64 suites
(the `gemm` fixture of conftest.py).
"""
from __future__ import annotations

import pytest
import torch

import metassl_fast as msf
from metassl_fast import _ext
from metassl_fast.ops import _common as ops

C = _ext.require("_C")
CODE = {torch.float32: 0, torch.float64: 1}
SHAPES = [(1, 1, 1), (5, 7, 3), (12, 32, 128), (13, 33, 129), (25, 70, 300), (37, 17, 513), (6, 16, 256)]


def _strided(rows, cols, dtype, seed, pad=3):
    """A (rows x cols) view whose row stride is cols + pad."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols + pad, generator=g, dtype=torch.float64).to(dtype)[:, :cols]


def _tol(dtype, k):
    return dict(rtol=0, atol=1e-12 * k) if dtype == torch.float64 else dict(rtol=0, atol=2e-5 * k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_nt_against_torch(dtype, m, n, k):
    a, b = _strided(m, k, dtype, 1), _strided(n, k, dtype, 2)
    bp = torch.full((C.gemm_packed_numel(CODE[dtype], n, k),), float("nan"), dtype=dtype)
    C.gemm_pack(CODE[dtype], b.data_ptr(), n * b.stride(0), n, k, b.stride(0),
                bp.data_ptr(), bp.numel(), 2)
    out = torch.full((m, n + 5), float("nan"), dtype=dtype)
    work = torch.full((C.gemm_nt_work_numel(CODE[dtype], m, k),), float("nan"), dtype=dtype)
    C.gemm_nt(CODE[dtype], a.data_ptr(), m * a.stride(0), a.stride(0), bp.data_ptr(), bp.numel(),
              out.data_ptr(), out.numel(), out.stride(0), m, n, k, 0.5, work.data_ptr(), work.numel(), 2)
    want = 0.5 * a.double() @ b.double().T
    torch.testing.assert_close(out[:, :n].double(), want, **_tol(dtype, k))
    assert out[:, n:].isnan().all(), "wrote past the row's N columns"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_nn_tn_against_torch(dtype, transpose_a, accumulate, m, n, k):
    a = _strided(k, m, dtype, 3) if transpose_a else _strided(m, k, dtype, 3)
    b = _strided(k, n, dtype, 4)
    start = torch.randn(m, n, dtype=torch.float64).to(dtype) if accumulate else torch.full((m, n), float("nan"),
                                                                                              dtype=dtype)
    out = torch.full((m, n + 2), float("nan"), dtype=dtype)
    out[:, :n] = start
    C.gemm_nn_tn(CODE[dtype], transpose_a, a.data_ptr(), a.shape[0] * a.stride(0), a.stride(0), b.data_ptr(),
                 b.shape[0] * b.stride(0), b.stride(0), out.data_ptr(), out.numel(), out.stride(0), m, n, k, -1.5,
                 accumulate, 2)
    prod = (a.double().T if transpose_a else a.double()) @ b.double()
    want = -1.5 * prod + (start.double() if accumulate else 0)
    torch.testing.assert_close(out[:, :n].double(), want, **_tol(dtype, k))
    assert out[:, n:].isnan().all(), "wrote past the row's N columns"


def test_nan_in_c_is_overwritten_not_propagated():
    """accumulate=False must not read C: a NaN left there by an earlier use disappears."""
    a, b = torch.ones(13, 5), torch.ones(5, 33)
    out = torch.full((13, 33), float("nan"))
    C.gemm_nn_tn(0, False, a.data_ptr(), a.numel(), 5, b.data_ptr(), b.numel(), 33, out.data_ptr(), out.numel(), 33,
                 13, 33, 5, 1.0, False, 1)
    assert torch.equal(out, torch.full((13, 33), 5.0))


def test_bad_sizes_are_refused_by_name():
    a = torch.zeros(4, 4)
    p = a.data_ptr()
    with pytest.raises(ValueError, match="need M, N, K >= 1"):
        C.gemm_nn_tn(0, False, p, 16, 4, p, 16, 4, p, 16, 4, 0, 4, 4, 1.0, False, 1)
    with pytest.raises(ValueError, match="lda >= K"):
        C.gemm_nn_tn(0, False, p, 16, 3, p, 16, 4, p, 16, 4, 4, 4, 4, 1.0, False, 1)
    with pytest.raises(ValueError, match="A holds 16 elements"):
        C.gemm_nn_tn(0, False, p, 16, 8, p, 16, 4, p, 16, 4, 4, 4, 8, 1.0, False, 1)
    with pytest.raises(ValueError, match="C holds 15 elements"):
        C.gemm_nn_tn(0, True, p, 16, 4, p, 16, 4, p, 15, 4, 4, 4, 4, 1.0, False, 1)
    with pytest.raises(ValueError, match="Bp holds 16 elements"):
        C.gemm_nt(0, p, 16, 4, p, 16, p, 16, 4, 4, 4, 4, 1.0, p, 10**6, 1)
    w = torch.zeros(C.gemm_nt_work_numel(0, 4, 4))
    big = torch.zeros(C.gemm_packed_numel(0, 4, 4))
    with pytest.raises(ValueError, match="work holds"):
        C.gemm_nt(0, p, 16, 4, big.data_ptr(), big.numel(), p, 16, 4, 4, 4, 4, 1.0, w.data_ptr(), w.numel() - 1, 1)
    with pytest.raises(ValueError, match="overflow"):
        C.gemm_packed_numel(0, 2**62, 2**10)
    with pytest.raises(ValueError, match="dtype code"):
        C.gemm_pack(2, p, 16, 4, 4, 4, p, 16, 1)
    with pytest.raises(ValueError, match="null pointer"):
        C.gemm_nt(0, 0, 16, 4, p, 16, p, 16, 4, 4, 4, 4, 1.0, p, 16, 1)
    with pytest.raises(ValueError, match="overflow"):
        C.gemm_nt_work_numel(0, 2**62, 2**10)


def test_env_var_is_checked(monkeypatch):
    monkeypatch.setenv("METASSL_FAST_GEMM", "mkl")
    with pytest.raises(ValueError, match="METASSL_FAST_GEMM='mkl'"):
        ops.sweep_gemm()
    for choice in ("own", "blas"):
        monkeypatch.setenv("METASSL_FAST_GEMM", choice)
        assert ops.sweep_gemm() == choice


@pytest.mark.parametrize("vendor,simd,want", [("AuthenticAMD", "avx512", "own"), ("AuthenticAMD", "avx2", "own"),
                                               ("AuthenticAMD", "baseline", "blas"),
                                               ("GenuineIntel", "avx512", "blas"), ("", "avx2", "blas")])
def test_auto_choice(monkeypatch, vendor, simd, want):
    monkeypatch.delenv("METASSL_FAST_GEMM", raising=False)
    monkeypatch.setattr(ops, "_cpu_vendor", lambda: vendor)

    class FakeC:
        pass

    fake = FakeC()
    fake.simd = simd
    monkeypatch.setattr(ops._ext, "require", lambda name: fake)
    assert ops.sweep_gemm() == want


@pytest.mark.parametrize("choice,floor", [("own", 0), ("blas", 0), ("own", None)])
def test_the_sweep_takes_the_chosen_products(monkeypatch, choice, floor, small_blocks):
    """Under the size floor (None: the default, far above 40 x 40 x 9) the sweep keeps BLAS."""
    monkeypatch.setenv("METASSL_FAST_GEMM", choice)
    if floor is not None:
        monkeypatch.setattr(ops, "OWN_GEMM_MIN_MACS", floor)
    made = []
    real = ops._OwnProducts

    class Spy(real):
        def __init__(self, *a):
            made.append(1)
            super().__init__(*a)

    monkeypatch.setattr(ops, "_OwnProducts", Spy)
    q = torch.randn(40, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(40, 9, dtype=torch.float64, requires_grad=True)
    msf.clip_loss(q, k, torch.tensor(1.0, dtype=torch.float64)).backward()
    assert bool(made) == (choice == "own" and floor is not None)


STRIDED = {
    "clip_loss": lambda q, k: msf.clip_loss(q, k, torch.tensor(3.0, dtype=q.dtype)),
    "info_nce raw": lambda q, k: msf.info_nce(q, k, temperature=0.5, normalize=False),
    "siglip_loss": lambda q, k: msf.siglip_loss(q, k, torch.tensor(2.0, dtype=q.dtype),
                                                torch.tensor(-1.0, dtype=q.dtype)),
    "supcon_loss": lambda q, k: msf.supcon_loss(torch.stack([q, k], 1), torch.arange(q.shape[0]) % 3),
    "nt_xent": lambda q, k: msf.nt_xent(q, k, normalize=False),
}


@pytest.mark.parametrize("name", list(STRIDED))
def test_strided_views_on_the_own_path(monkeypatch, name, small_blocks):
    """Features that are column slices of a wider tensor (row stride > D) reach the products
    as views: their span, not their numel, is what the C++ side is told."""
    monkeypatch.setattr(ops, "OWN_GEMM_MIN_MACS", 0)
    z = torch.randn(37, 2 * 19, dtype=torch.float64, requires_grad=True)
    got = {}
    for choice in ("own", "blas"):
        monkeypatch.setenv("METASSL_FAST_GEMM", choice)
        z.grad = None
        q, k = z.chunk(2, dim=1)
        assert q.stride(0) == 38 and not q.is_contiguous()
        loss = STRIDED[name](q, k)
        loss.backward()
        got[choice] = (loss.detach(), z.grad.clone())
    torch.testing.assert_close(got["own"][0], got["blas"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["own"][1], got["blas"][1], rtol=1e-12, atol=1e-12)


def test_bad_env_value_is_refused_at_every_size(monkeypatch):
    monkeypatch.setenv("METASSL_FAST_GEMM", "fast")
    q = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="METASSL_FAST_GEMM"):
        msf.info_nce(q, q.clone())


def test_key_cols_outside_the_keys_are_refused():
    rows, keys = torch.randn(3, 2), torch.randn(5, 2)
    with pytest.raises(ValueError, match="key_cols"):
        ops.row_sweep(rows, keys, lambda S, r0, r1: None, d_keys=torch.zeros(5, 2), key_cols=(-3, 2))
