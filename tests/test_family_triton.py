"""The GPU backends of nt_xent, supcon_loss, the pairwise NT-Xent, explicit-negative
InfoNCE, paired negatives and siglip_loss against the float64 references, loss and every
gradient: Triton, and on a GPU also the CUDA C++ kernels (where _C_cuda is built).

Without a GPU these run the Triton kernels under TRITON_INTERPRET=1 (conftest.py) on CPU
tensors, fp32 and fp16 (bf16 runs on a GPU only: the interpreter's bf16 loads are
wrong); the CUDA kernels' CPU check is tests/test_cuda_emulated.py.
"""
from __future__ import annotations

import pytest
import torch

import metassl_fast as msf
from metassl_fast.functional import info_nce_explicit, labeled_contrastive
from metassl_fast.reference import labeled_contrastive_loss, siglip_loss

from metassl_fast import _ext

from helpers import DEVICE, TOL, needs_triton

pytestmark = needs_triton

GPU_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and _ext.available("_C_cuda") else [])


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    return request.param

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _leaves(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
            for s in shapes]


def _check(ours_fn, ref_fn, inputs, dtype, what):
    """ours_fn(*inputs) on the Triton backend; ref_fn on float64 copies on the CPU."""
    loss = ours_fn(*inputs)
    ref_in = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref = ref_fn(*ref_in)
    assert loss.dtype == dtype and loss.shape == ref.shape, what
    w = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    got = [loss] + list(torch.autograd.grad((loss.double() * w.to(loss.device)).sum(), inputs))
    want = [ref] + list(torch.autograd.grad((ref * w).sum(), ref_in))
    atol, rtol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        a = a.detach().double().cpu()
        assert torch.isfinite(a).all(), f"{what}: output {i} not finite"
        err, bound = (a - b).abs().max().item(), atol + rtol * b.abs().max().item()
        assert err <= bound, f"{what}: output {i} error {err:.3e} > {bound:.3e}"


def _t(value=0.3):
    return torch.tensor(value, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 17, 64, 65])
@pytest.mark.parametrize("d", [3, 16, 40])
def test_nt_xent_grid(dtype, n, d, backend):
    z1, z2 = _leaves([(n, d), (n, d)], dtype, n * 10 + d)
    y = torch.arange(n).repeat(2)
    for reduction in ("mean", "none"):
        _check(lambda a, b: msf.nt_xent(a, b, temperature=0.3, reduction=reduction, backend=backend),
               lambda a, b: labeled_contrastive_loss(torch.cat([a, b]), None, y, None, 1 / _t(), True, reduction,
                                                     False),
               [z1, z2], dtype, f"nt_xent n={n} d={d} {reduction}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (17, 9, 16), (65, 64, 40)])
def test_labeled_grid(dtype, pairwise, with_key, n, m, d, backend):
    g = torch.Generator().manual_seed(n + m)
    y = torch.randint(0, 3, (n,), generator=g)
    yk = torch.randint(0, 3, (m,), generator=g)
    shapes = [(n, d)] + ([(m, d)] if with_key else [])
    inputs = _leaves(shapes, dtype, n * 7 + m)
    yd, ykd = y.to(DEVICE), yk.to(DEVICE)
    for reduction in ("mean", "sum", "none"):
        if with_key:
            _check(lambda q, k: labeled_contrastive(q, yd, k, ykd, temperature=0.25, reduction=reduction,
                                                    pairwise=pairwise, backend=backend),
                   lambda q, k: labeled_contrastive_loss(q, k, y, yk, 1 / _t(0.25), True, reduction, pairwise),
                   inputs, dtype, f"n={n} m={m} pairwise={pairwise} {reduction}")
        else:
            _check(lambda q: labeled_contrastive(q, yd, temperature=0.25, reduction=reduction, pairwise=pairwise,
                                                 backend=backend),
                   lambda q: labeled_contrastive_loss(q, None, y, None, 1 / _t(0.25), True, reduction, pairwise),
                   inputs, dtype, f"self n={n} pairwise={pairwise} {reduction}")


def test_supcon_views_and_temperature_gradient(backend):
    feats, = _leaves([(21, 3, 16)], torch.float32, 5)
    y = torch.randint(0, 4, (21,), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.2, device=DEVICE, requires_grad=True)
    loss = msf.supcon_loss(feats, y.to(DEVICE), temperature=t, backend=backend)
    gf, gt = torch.autograd.grad(loss, [feats, t])
    f64 = feats.detach().double().cpu().requires_grad_()
    t64 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ref = labeled_contrastive_loss(f64.reshape(-1, 16), None, y.repeat_interleave(3), None, 1 / t64, True,
                                   "mean", False)
    rf, rt = torch.autograd.grad(ref, [f64, t64])
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gf.double().cpu(), rf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt.double().cpu(), rt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_negatives(dtype, backend):
    q, p, neg = _leaves([(19, 16), (19, 16), (23, 16)], dtype, 3)
    for reduction in ("mean", "none"):
        _check(lambda a, b, c: info_nce_explicit(a, b, c, temperature=0.3, reduction=reduction, backend=backend),
               lambda a, b, c: info_nce_explicit(a, b, c, temperature=0.3, reduction=reduction, backend="torch"),
               [q, p, neg], dtype, f"explicit {reduction}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 3), (17, 16), (65, 40)])
def test_siglip(dtype, n, d, backend):
    a, b = _leaves([(n, d), (n, d)], dtype, n + d)
    s = torch.tensor(3.0, dtype=torch.float32, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float32, device=DEVICE, requires_grad=True)
    loss = msf.siglip_loss(a, b, s, bias, backend=backend)
    got = [loss] + list(torch.autograd.grad(loss, [a, b, s, bias]))
    ref_in = [x.detach().double().cpu().requires_grad_() for x in (a, b, s, bias)]
    ref = siglip_loss(*ref_in)
    want = [ref] + list(torch.autograd.grad(ref, ref_in))
    atol, rtol = TOL[dtype]
    for i, (x, y) in enumerate(zip(got, want)):
        x = x.detach().double().cpu()
        err, bound = (x - y).abs().max().item(), atol + rtol * y.abs().max().item()
        assert err <= bound, f"output {i}: {err:.3e} > {bound:.3e}"


def test_opcheck_and_compile(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(19, 8, generator=g).to(DEVICE).requires_grad_()
    y = torch.randint(0, 3, (19,), generator=g).to(DEVICE)
    scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
    for precompute, reduction in ((True, "mean"), (False, "none")):
        torch.library.opcheck(torch.ops.metassl_fast.labeled_fwd.default,
                              (q, None, y, None, None, True, scale, -1, True, reduction, False, precompute, True,
                               False, False, True, backend))
    a, b = (torch.randn(13, 8, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.metassl_fast.siglip_fwd.default,
                          (a, b, scale, torch.tensor(-1.0, device=DEVICE, requires_grad=True), 0, True, True, True,
                           True, True, backend))
    torch._dynamo.reset()

    def step(a, b):
        return msf.nt_xent(a, b, backend=backend) + msf.siglip_loss(a, b, 2.0, -1.0, backend=backend)

    got = torch.compile(step, fullgraph=True)(a, b)
    torch.testing.assert_close(got, step(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_paired_negatives(dtype, symmetric, backend):
    from metassl_fast.reference import contrastive_loss

    q, k, neg = _leaves([(17, 16), (17, 16), (17, 3, 16)], dtype, 9)
    for reduction in ("mean", "none"):
        _check(lambda a, b, c: msf.info_nce(a, b, negatives=c, temperature=0.3, symmetric=symmetric,
                                            reduction=reduction, backend=backend),
               lambda a, b, c: contrastive_loss(a, b, c, 1 / _t(), symmetric, True, reduction),
               [q, k, neg], dtype, f"paired symmetric={symmetric} {reduction}")
