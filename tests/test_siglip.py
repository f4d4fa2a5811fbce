"""The SigLIP op (siglip_fwd / siglip_bwd): siglip_loss on every backend against the
float64 reference, loss and every gradient (helpers.check); opcheck, torch.compile,
bad input.

float64 runs on the C++ kernels; the Triton and CUDA C++ kernels take fp32/fp16/bf16
(without a GPU, Triton runs under TRITON_INTERPRET=1 on CPU tensors, fp32 and fp16).
"""
from __future__ import annotations

import pytest
import torch

import metassl_fast as msf
from helpers import autocast_bf16_check, backend_dtypes, backends, check, compile_check, device_of, randn
from metassl_fast import _ext
from metassl_fast.reference import siglip_loss

F64 = backends("siglip", torch.float64)
F32 = backends("siglip", torch.float32)
NAMES = ["loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias"]


def _siglip(backend, a, b, s, bias):
    return msf.siglip_loss(a, b, s, bias, backend=backend)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (17, 16), (64, 40), (65, 130)])
def test_siglip_float64(backend, n, d, small_blocks, gemm):
    a, b = randn(n, d, seed=n), randn(n, d, seed=n + 1)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    check(_siglip, [a, b, s, bias], backend=backend, what=f"n={n} d={d}", names=NAMES)
    torch.testing.assert_close(msf.siglip_loss(a, b, s, bias, backend="torch"), siglip_loss(a, b, s, bias),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
def test_siglip_matches_open_clip_formula(backend):
    a, b = randn(9, 5, seed=1), randn(9, 5, seed=2)
    logits = 10.0 * a @ b.T - 10.0
    labels = 2 * torch.eye(9, dtype=torch.float64) - 1
    want = -torch.nn.functional.logsigmoid(labels * logits).sum() / 9
    torch.testing.assert_close(msf.siglip_loss(a, b, 10.0, -10.0, backend=backend), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F32)
def test_siglip_extreme_logits_are_stable(backend):
    """|x| up to ~1e3: softplus and sigmoid must not overflow (float32)."""
    a, b = randn(33, 8, seed=1, dtype=torch.float32), randn(33, 8, seed=2, dtype=torch.float32)
    for s, bias in [(100.0, -50.0), (100.0, 50.0), (1e-3, 0.0)]:
        check(lambda be, a, b: msf.siglip_loss(a, b, s, bias, backend=be), [a, b], backend=backend,
              what=f"s={s} bias={bias}")


@pytest.mark.parametrize("backend,dtype", backend_dtypes("siglip"))
def test_low_precision_against_float64(backend, dtype):
    x1, x2 = randn(65, 40, seed=1, dtype=dtype), randn(65, 40, seed=2, dtype=dtype)
    check(lambda b, x1, x2: msf.siglip_loss(x1, x2, 5.0, -3.0, backend=b), [x1, x2], backend=backend)


@pytest.mark.parametrize("backend,dtype", backend_dtypes("siglip"))
@pytest.mark.parametrize("n,d", [(1, 3), (17, 16), (65, 40)])
def test_siglip_low_precision(backend, dtype, n, d):
    a, b = randn(n, d, seed=n + d, dtype=dtype), randn(n, d, seed=n + d + 1, dtype=dtype)
    s = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    check(_siglip, [a, b, s, bias], backend=backend, what=f"n={n} d={d}", names=NAMES)


@pytest.mark.parametrize("backend", F64)
def test_gradcheck(backend, small_blocks, gemm):
    z1, z2 = randn(4, 3, seed=1), randn(4, 3, seed=2)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, s, b: msf.siglip_loss(a, c, s, b, backend=backend),
                                    (z1, z2, s, b))


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("precompute", [True, False])
def test_opcheck_siglip(backend, precompute):
    g = torch.Generator().manual_seed(0)
    dev = device_of(backend)
    a, b = (torch.randn(13, 8, generator=g).to(dev).requires_grad_() for _ in range(2))
    s = torch.tensor(3.0, device=dev, requires_grad=True)
    bias = torch.tensor(-1.0, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.metassl_fast.siglip_fwd.default,
                          (a, b, s, bias, 0, precompute, True, True, True, True, backend))
    torch.library.opcheck(torch.ops.metassl_fast.siglip_bwd.default,
                          (torch.tensor(0.7, device=dev), a.detach(), b.detach(), s.detach(), bias.detach(), 0,
                           True, True, True, True, backend))


@pytest.mark.parametrize("backend", F32)
def test_torch_compile_fullgraph(backend):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(37, 16, generator=g).to(dev).requires_grad_() for _ in range(2))
    t = torch.tensor(0.25, device=dev, requires_grad=True)
    compile_check(lambda a, b, t: msf.siglip_loss(a, b, 1 / t, -t, backend=backend), [a, b, t])


@pytest.mark.parametrize("backend", F32)
def test_torch_compile_fullgraph_with_nt_xent(backend):
    """nt_xent and siglip_loss in one compiled graph (both custom ops traced together)."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(13, 8, generator=g).to(dev).requires_grad_() for _ in range(2))
    compile_check(lambda a, b: msf.nt_xent(a, b, backend=backend) + msf.siglip_loss(a, b, 2.0, -1.0, backend=backend),
                  [a, b])


@pytest.mark.parametrize("backend", F64)
def test_double_backward_is_a_clear_error(backend):
    a, b = randn(5, 3, seed=1), randn(5, 3, seed=2)
    loss = msf.siglip_loss(a, b, 2.0, 0.0, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        (ga,) = torch.autograd.grad(loss, a, create_graph=True)


def test_module_matches_functional():
    a, b = randn(9, 4, seed=1), randn(9, 4, seed=2)
    mod = msf.SigLipLoss()
    assert mod.logit_scale.requires_grad and mod.logit_bias.requires_grad
    torch.testing.assert_close(mod(a, b), msf.siglip_loss(a, b, mod.logit_scale.exp(), mod.logit_bias))


@pytest.mark.parametrize("backend", F32)
def test_nan_input_gives_nan_loss(backend):
    a, b = randn(6, 3, seed=1, dtype=torch.float32), randn(6, 3, seed=2, dtype=torch.float32)
    a = a.detach().clone()
    a[2, 1] = float("nan")
    dev = device_of(backend)
    assert torch.isnan(msf.siglip_loss(a.to(dev), b.detach().to(dev), 2.0, 0.0, backend=backend))


@pytest.mark.parametrize("backend", F64)
def test_gradient_only_where_required(backend):
    a, b = randn(6, 3, seed=1), randn(6, 3, seed=2).detach()
    loss = msf.siglip_loss(a, b, 2.0, 0.5, backend=backend)
    (ga,) = torch.autograd.grad(loss, a)
    ref = torch.autograd.grad(siglip_loss(a, b, torch.tensor(2.0, dtype=torch.float64),
                                          torch.tensor(0.5, dtype=torch.float64)), a)[0]
    torch.testing.assert_close(ga, ref)


def test_autocast_bf16_on_cpu():
    autocast_bf16_check(lambda a, b, y, queue: msf.siglip_loss(a, b, 2.0, -1.0))


X = torch.randn(4, 3)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: msf.siglip_loss(X, X, -1.0, 0.0), ValueError, "logit_scale"),
    (lambda: msf.siglip_loss(X, X, 1.0, float("nan")), ValueError, "logit_bias"),
    (lambda: msf.siglip_loss(X, X, 1.0, torch.zeros(2)), ValueError, "logit_bias"),
    (lambda: msf.siglip_loss(X, torch.randn(4, 2), 1.0, 0.0), ValueError, "text_features"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_cpp_checks_buffer_bounds():
    C = _ext.require("_C") if _ext.available("_C") else pytest.skip(f"_C not built: {_ext.load_error('_C')}")
    S = torch.zeros(4, 4)
    sb = dict(dtype=0, S=S.data_ptr(), S_numel=16, B=4, C=4, ld=4, row0=0, scale=1.0, bias=0.0, weight=1.0,
              write_grad=True, nthreads=1)
    C.block_sigmoid(**sb)
    for bad in (dict(S_numel=15), dict(row0=1), dict(C=3), dict(nthreads=0)):
        with pytest.raises(ValueError, match="metassl_fast._C"):
            C.block_sigmoid(**{**sb, **bad})


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_raw_op_checks_what_the_kernels_assume():
    q, k, k8 = torch.randn(6, 8), torch.randn(9, 2), torch.randn(9, 8)
    s = torch.tensor(2.0)
    with pytest.raises(ValueError, match="diag_offset"):
        torch.ops.metassl_fast.siglip_fwd(q, k8, s, torch.tensor(0.0), 4, False, False, False, False, False, "cpu")
    with pytest.raises(ValueError, match="key"):
        torch.ops.metassl_fast.siglip_fwd(q, k, s, torch.tensor(0.0), 0, False, False, False, False, False, "cpu")
    with pytest.raises(ValueError, match="bias"):
        torch.ops.metassl_fast.siglip_fwd(q, q, s, torch.zeros(2), 0, False, False, False, False, False, "cpu")
