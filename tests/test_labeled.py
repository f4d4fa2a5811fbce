"""The labelled contrastive op (labeled_fwd / labeled_bwd): nt_xent, supcon_loss, the
pairwise (pytorch-metric-learning) NT-Xent, labeled_contrastive, info_nce_explicit and
info_nce with paired negatives (N, M, D), on every backend against the float64
reference, loss and every gradient (helpers.check); opcheck, torch.compile, bad input.

float64 runs on the C++ kernels; the Triton and CUDA C++ kernels take fp32/fp16/bf16
(without a GPU, Triton runs under TRITON_INTERPRET=1 on CPU tensors, fp32 and fp16; the
CUDA kernels' CPU check is tests/test_cuda_emulated.py).
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

import metassl_fast as msf
from helpers import autocast_bf16_check, backend_dtypes, backends, check, close, compile_check, device_of, randn
from metassl_fast import _ext
from metassl_fast.functional import info_nce_explicit, labeled_contrastive
from metassl_fast.reference import labeled_contrastive_loss

from metassl_fast.ops.labeled import positives_per_row

F64 = backends("labeled", torch.float64)
F32 = backends("labeled", torch.float32)


def _on(backend, *xs):
    dev = device_of(backend)
    return [None if x is None else x.detach().to(dev).requires_grad_(x.requires_grad) for x in xs]


def _nt_xent(reduction, normalize=True):
    def fn(backend, z1, z2, t):
        return msf.nt_xent(z1, z2, temperature=t, normalize=normalize, reduction=reduction, backend=backend)
    return fn


def _labeled(reduction, pairwise, temperature):
    def fn(backend, q, y, key, yk):
        return labeled_contrastive(q, y, key, yk, temperature=temperature, reduction=reduction, pairwise=pairwise,
                                   backend=backend)
    return fn


# --------------------------------------------------------------------------- float64 grids


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
def test_nt_xent_float64(backend, n, d, small_blocks, gemm):
    z1, z2 = randn(n, d, seed=n * 100 + d), randn(n, d, seed=n * 100 + d + 1)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    for reduction, normalize in itertools.product(["mean", "sum", "none"], [True, False]):
        check(_nt_xent(reduction, normalize), [z1, z2, t], backend=backend,
              what=f"n={n} d={d} {reduction} normalize={normalize}", names=["loss", "d_z1", "d_z2", "d_temperature"])
        # the reference is labeled_contrastive_loss on cat([z1, z2]) with labels arange(n) twice
        z = torch.cat([z1, z2])
        y = torch.arange(n).repeat(2)
        ref = labeled_contrastive_loss(z, None, y, None, 1 / t, normalize, reduction, False)
        close(msf.nt_xent(z1, z2, temperature=t, normalize=normalize, reduction=reduction, backend="torch"), ref,
              rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
def test_nt_xent_is_simclr_cross_entropy(backend):
    """Independent of our reference: the textbook SimCLR formula with masked logits."""
    z1, z2 = randn(6, 4, seed=1), randn(6, 4, seed=2)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.5).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    want = torch.nn.functional.cross_entropy(logits, target)
    got = msf.nt_xent(z1, z2, temperature=0.5, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("n,v,d,classes", [(1, 2, 3, 1), (5, 1, 3, 2), (17, 2, 16, 3), (33, 3, 40, 5),
                                           (65, 2, 130, 40)])
def test_supcon_float64(backend, n, v, d, classes, small_blocks, gemm):
    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, classes, (n,), generator=g)
    feats = randn(n, v, d, seed=n + v) if v > 1 else randn(n, d, seed=n)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for reduction in ["mean", "sum", "none"]:
        check(lambda b, f, y, t: msf.supcon_loss(f, y, temperature=t, reduction=reduction, backend=b), [feats, y, t],
              backend=backend, what=f"n={n} v={v} {reduction}", names=["loss", "d_features", "d_temperature"])
        yy = y.repeat_interleave(v) if v > 1 else y
        ref = labeled_contrastive_loss(feats.reshape(-1, d), None, yy, None, 1 / t, True, reduction, False)
        ours = msf.supcon_loss(feats, y, temperature=t, reduction=reduction, backend="torch")
        close(ours, ref.reshape(ours.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
def test_supcon_matches_khosla_formula(backend):
    """Khosla et al.'s L_out written out with masks (base_temperature = temperature)."""
    feats = randn(8, 2, 5, seed=3)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    z = torch.nn.functional.normalize(torch.cat(torch.unbind(feats, dim=1)), dim=1)
    yy = y.repeat(2)
    logits = z @ z.T / 0.1
    self_mask = torch.eye(16, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    pos = (yy[:, None] == yy[None, :]) & ~self_mask
    per_anchor = -(log_prob * pos).sum(1) / pos.sum(1)
    want = per_anchor[pos.sum(1) > 0].mean()
    torch.testing.assert_close(msf.supcon_loss(feats, y, temperature=0.1, backend=backend), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("n,m,d,classes", [(1, 1, 3, 1), (3, 2, 1, 2), (17, 9, 16, 3), (65, 64, 40, 4),
                                           (64, 130, 3, 60)])
def test_labeled_float64(backend, pairwise, with_key, n, m, d, classes, small_blocks, gemm):
    g = torch.Generator().manual_seed(n * 7 + m)
    y = torch.randint(0, classes, (n,), generator=g)
    q = randn(n, d, seed=n)
    key = randn(m, d, seed=m + 1000) if with_key else None
    yk = torch.randint(0, classes, (m,), generator=g) if with_key else None
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for reduction in ["mean", "sum", "none"]:
        check(lambda b, q, y, key, yk, t: labeled_contrastive(q, y, key, yk, temperature=t, reduction=reduction,
                                                              pairwise=pairwise, backend=b),
              [q, y, key, yk, t], backend=backend, what=reduction)
        close(labeled_contrastive(q, y, key, yk, temperature=t, reduction=reduction, pairwise=pairwise,
                                  backend="torch"),
              labeled_contrastive_loss(q, key, y, yk, 1 / t, True, reduction, pairwise), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("pairwise", [False, True])
def test_anchors_without_positives_or_negatives(backend, pairwise):
    """All labels distinct: no positives anywhere, loss 0 with zero gradient.  All labels
    equal: no negatives (pairwise: every term is softplus(-inf) = 0)."""
    q = randn(6, 4, seed=5)
    loss = labeled_contrastive(q, torch.arange(6), pairwise=pairwise, backend=backend)
    assert loss.item() == 0.0
    (gq,) = torch.autograd.grad(loss, q)
    assert (gq == 0).all()
    same = torch.zeros(6, dtype=torch.long)
    ours = labeled_contrastive(q, same, pairwise=pairwise, backend=backend)
    ref = labeled_contrastive_loss(q, None, same, None, torch.tensor(10.0, dtype=torch.float64), True, "mean",
                                   pairwise)
    torch.testing.assert_close(ours, ref)
    if pairwise:
        assert ours.item() == 0.0


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(backend, reduction, small_blocks, gemm):
    z1, z2 = randn(4, 3, seed=1), randn(4, 3, seed=2)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, t: msf.nt_xent(a, b, temperature=t, reduction=reduction, backend=backend), (z1, z2, t))
    y = torch.tensor([0, 1, 0, 1, 2])
    q, k = randn(5, 3, seed=3), randn(4, 3, seed=4)
    yk = torch.tensor([1, 0, 2, 2])
    for pairwise in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, t: labeled_contrastive(q, y, k, yk, temperature=t, reduction=reduction,
                                                pairwise=pairwise, backend=backend), (q, k, t))


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend,dtype", backend_dtypes("labeled"))
@pytest.mark.parametrize("op", ["nt_xent", "supcon", "pairwise"])
def test_low_precision_against_float64(backend, dtype, op):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (65,), generator=g)

    def run(b, x1, x2, y):
        if op == "nt_xent":
            return msf.nt_xent(x1, x2, temperature=0.2, backend=b)
        if op == "supcon":
            return msf.supcon_loss(torch.stack([x1, x2], 1), y, temperature=0.2, backend=b)
        return labeled_contrastive(x1, y, x2, y, temperature=0.2, pairwise=True, backend=b)

    x1, x2 = randn(65, 40, seed=1, dtype=dtype), randn(65, 40, seed=2, dtype=dtype)
    check(run, [x1, x2, y], backend=backend, what=op)


@pytest.mark.parametrize("backend,dtype", backend_dtypes("labeled"))
@pytest.mark.parametrize("n", [1, 3, 17, 64, 65])
@pytest.mark.parametrize("d", [3, 16, 40])
def test_nt_xent_low_precision(backend, dtype, n, d):
    z1, z2 = randn(n, d, seed=n * 10 + d, dtype=dtype), randn(n, d, seed=n * 10 + d + 7, dtype=dtype)
    for reduction in ("mean", "none"):
        check(lambda b, a, c: msf.nt_xent(a, c, temperature=0.3, reduction=reduction, backend=b), [z1, z2],
              backend=backend, what=f"nt_xent n={n} d={d} {reduction}")


@pytest.mark.parametrize("backend,dtype", backend_dtypes("labeled"))
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (17, 9, 16), (65, 64, 40)])
def test_labeled_low_precision(backend, dtype, pairwise, with_key, n, m, d):
    g = torch.Generator().manual_seed(n + m)
    y = torch.randint(0, 3, (n,), generator=g)
    yk = torch.randint(0, 3, (m,), generator=g) if with_key else None
    q = randn(n, d, seed=n * 7 + m, dtype=dtype)
    key = randn(m, d, seed=n * 7 + m + 1, dtype=dtype) if with_key else None
    for reduction in ("mean", "sum", "none"):
        check(_labeled(reduction, pairwise, 0.25), [q, y, key, yk], backend=backend,
              what=f"n={n} m={m} with_key={with_key} pairwise={pairwise} {reduction}")


@pytest.mark.parametrize("backend", F32)
def test_supcon_views_and_temperature_gradient(backend):
    feats = randn(21, 3, 16, seed=5, dtype=torch.float32)
    y = torch.randint(0, 4, (21,), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.2, requires_grad=True)
    check(lambda b, f, y, t: msf.supcon_loss(f, y, temperature=t, backend=b), [feats, y, t], backend=backend,
          names=["loss", "d_features", "d_temperature"])
    fd, td = _on(backend, feats, t)
    loss = msf.supcon_loss(fd, y.to(fd.device), temperature=td, backend=backend)
    gf, gt = torch.autograd.grad(loss, [fd, td])
    f64 = feats.detach().double().requires_grad_()
    t64 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ref = labeled_contrastive_loss(f64.reshape(-1, 16), None, y.repeat_interleave(3), None, 1 / t64, True,
                                   "mean", False)
    rf, rt = torch.autograd.grad(ref, [f64, t64])
    close(loss, ref, rtol=1e-4, atol=1e-5)
    close(gf, rf, rtol=1e-4, atol=1e-5)
    close(gt, rt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,dtype", backend_dtypes("labeled"))
def test_explicit_negatives(backend, dtype):
    q, p, neg = randn(19, 16, seed=3, dtype=dtype), randn(19, 16, seed=4, dtype=dtype), randn(23, 16, seed=5,
                                                                                              dtype=dtype)
    for reduction in ("mean", "none"):
        check(lambda b, a, c, e: info_nce_explicit(a, c, e, temperature=0.3, reduction=reduction, backend=b),
              [q, p, neg], backend=backend, what=f"explicit {reduction}")


# --------------------------------------------------------------------------- info_nce, paired negatives (N, M, D)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (3, 5, 1), (17, 5, 16), (65, 2, 40)])
def test_paired_negatives_float64(backend, n, m, d, small_blocks, gemm):
    from metassl_fast.reference import contrastive_loss

    q, k, neg = randn(n, d, seed=n), randn(n, d, seed=n + 1), randn(n, m, d, seed=n + 2)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for symmetric, reduction, normalize in itertools.product([False, True], ["mean", "sum", "none"], [True, False]):
        def fn(b, q, k, neg, t):
            return msf.info_nce(q, k, negatives=neg, temperature=t, symmetric=symmetric, normalize=normalize,
                                reduction=reduction, backend=b)
        check(fn, [q, k, neg, t], backend=backend,
              what=f"paired n={n} m={m} sym={symmetric} {reduction} norm={normalize}")
        close(fn("torch", q, k, neg, t), contrastive_loss(q, k, neg, 1 / t, symmetric, normalize, reduction),
              rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,dtype", backend_dtypes("labeled"))
@pytest.mark.parametrize("symmetric", [False, True])
def test_paired_negatives_low_precision(backend, dtype, symmetric):
    q, k, neg = (randn(*s, seed=9 + i, dtype=dtype) for i, s in enumerate([(17, 16), (17, 16), (17, 3, 16)]))
    for reduction in ("mean", "none"):
        check(lambda b, a, c, e: msf.info_nce(a, c, negatives=e, temperature=0.3, symmetric=symmetric,
                                              reduction=reduction, backend=b),
              [q, k, neg], backend=backend, what=f"paired symmetric={symmetric} {reduction}")


@pytest.mark.parametrize("backend", F64)
def test_paired_negatives_written_out(backend):
    """Independent of the reference: CE over [q_i . k_j for all j, q_i . neg_i,m]."""
    q, k, neg = randn(6, 4, seed=1), randn(6, 4, seed=2), randn(6, 3, 4, seed=3)
    qn, kn, nn_ = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k, neg))
    logits = torch.cat([qn @ kn.T, torch.einsum("nd,nmd->nm", qn, nn_)], 1) / 0.1
    want = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    torch.testing.assert_close(msf.info_nce(q, k, negatives=neg, temperature=0.1, backend=backend), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
def test_paired_negatives_gradcheck(backend):
    q, k, neg = randn(4, 3, seed=1), randn(4, 3, seed=2), randn(4, 2, 3, seed=3)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, n, t: msf.info_nce(q, k, negatives=n, temperature=t, symmetric=True, backend=backend),
        (q, k, neg, t))


@pytest.mark.parametrize("bad,name", [((5, 2, 3), "negatives"), ((4, 0, 3), "negatives"), ((4, 2, 5), "negatives")])
def test_paired_negatives_bad_shape(bad, name):
    with pytest.raises(ValueError, match=name):
        msf.info_nce(torch.randn(4, 3), torch.randn(4, 3), negatives=torch.randn(*bad))


@pytest.mark.parametrize("backend", F64)
def test_key_without_grad_updated_in_place_before_backward(backend):
    """A memory bank / queue enqueued in place between forward and a recomputing backward
    (reduction="none") does not change the gradient: the op saved a copy."""
    q = randn(9, 4, seed=1)
    bank = torch.randn(6, 4, dtype=torch.float64)
    p = randn(9, 4, seed=2)

    def explicit_none(q, p, bank):
        return info_nce_explicit(q, p, bank, temperature=0.2, reduction="none", backend=backend)

    want = torch.autograd.grad(explicit_none(q, p, bank.clone()).sum(), [q, p])
    loss = explicit_none(q, p, bank)
    bank.mul_(-3.0)
    got = torch.autograd.grad(loss.sum(), [q, p])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- ops machinery


def _labeled_args(precompute, reduction, with_key, pairwise, with_pos=False, backend="cpu"):
    g = torch.Generator().manual_seed(0)
    dev = device_of(backend)
    q = torch.randn(19, 8, generator=g).to(dev).requires_grad_()
    key = torch.randn(11, 8, generator=g).to(dev).requires_grad_() if with_key else None
    y = torch.randint(0, 3, (19,), generator=g).to(dev)
    yk = torch.randint(0, 3, (11,), generator=g).to(dev) if with_key else None
    pos = torch.randn(19, generator=g).to(dev).requires_grad_() if with_pos else None
    scale = torch.tensor(4.0, device=dev, requires_grad=True)
    return (q, key, y, yk, pos, True, scale, -1, True, reduction, pairwise, precompute, True, with_key, with_pos,
            True, backend)


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("with_key,pairwise,with_pos", [(False, False, False), (False, True, False),
                                                        (True, False, False), (True, True, False),
                                                        (True, False, True)])
@pytest.mark.parametrize("reduction,precompute", [("mean", True), ("sum", True), ("none", False)])
def test_opcheck_labeled(backend, with_key, pairwise, with_pos, reduction, precompute):
    args = _labeled_args(precompute, reduction, with_key, pairwise, with_pos, backend)
    torch.library.opcheck(torch.ops.metassl_fast.labeled_fwd.default, args)
    if not precompute:
        q, key, y, yk, pos, _ext_pos, scale = args[:7]
        torch.library.opcheck(torch.ops.metassl_fast.labeled_bwd.default,
                              (torch.randn(19, device=q.device), q.detach(), None if key is None else key.detach(), y,
                               yk, None if pos is None else pos.detach(), True, scale.detach(), -1, True, reduction,
                               pairwise, True, with_key, with_pos, True, backend))


@pytest.mark.parametrize("backend", F32)
def test_opcheck_paired_negatives(backend):
    g = torch.Generator().manual_seed(0)
    dev = device_of(backend)
    args = (torch.randn(7, 4, generator=g).to(dev).requires_grad_(),
            torch.randn(7, 4, generator=g).to(dev).requires_grad_(), torch.arange(7, device=dev),
            torch.arange(7, device=dev), torch.randn(7, generator=g).to(dev).requires_grad_(), False,
            torch.tensor(3.0, device=dev, requires_grad=True), -1, True, "mean", False, True, True, True, True, True,
            backend)
    torch.library.opcheck(torch.ops.metassl_fast.labeled_fwd.default, args)


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("op", ["nt_xent", "supcon_none", "pairwise", "explicit"])
def test_torch_compile_fullgraph(backend, op):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(37, 16, generator=g).to(dev).requires_grad_() for _ in range(3))
    y = torch.randint(0, 5, (37,), generator=g).to(dev)
    t = torch.tensor(0.25, device=dev, requires_grad=True)

    def step(a, b, c, t):
        if op == "nt_xent":
            loss = msf.nt_xent(a, b, temperature=t, backend=backend) + 0 * c.sum()
        elif op == "supcon_none":
            loss = msf.supcon_loss(torch.stack([a, b], 1), y, temperature=t, reduction="none", backend=backend)
            loss = loss + 0 * c.sum()
        elif op == "pairwise":
            loss = labeled_contrastive(a, y, b, y, temperature=t, pairwise=True, backend=backend) + 0 * c.sum()
        else:
            loss = info_nce_explicit(a, b, c, temperature=t, reduction="none", backend=backend)
        return (loss * torch.arange(1, loss.numel() + 1, device=dev).reshape(loss.shape)).sum()

    compile_check(step, [a, b, c, t])


@pytest.mark.parametrize("backend", F64)
def test_double_backward_is_a_clear_error(backend):
    a, b = randn(5, 3, seed=1), randn(5, 3, seed=2)
    loss = msf.nt_xent(a, b, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        (ga,) = torch.autograd.grad(loss, a, create_graph=True)


@pytest.mark.parametrize("backend", F32)
def test_modules_match_functional(backend):
    a, b = _on(backend, randn(9, 4, seed=1, dtype=torch.float32), randn(9, 4, seed=2, dtype=torch.float32))
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 3], device=a.device)
    torch.testing.assert_close(msf.NTXentLoss(temperature=0.3, backend=backend)(a, b),
                               msf.nt_xent(a, b, temperature=0.3, backend=backend))
    torch.testing.assert_close(msf.SupConLoss(temperature=0.3, backend=backend)(a, y),
                               msf.supcon_loss(a, y, temperature=0.3, backend=backend))


def test_modules_default_backend_match_functional():
    a, b = randn(9, 4, seed=1), randn(9, 4, seed=2)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 3])
    torch.testing.assert_close(msf.NTXentLoss(temperature=0.3)(a, b), msf.nt_xent(a, b, temperature=0.3))
    torch.testing.assert_close(msf.SupConLoss(temperature=0.3)(a, y), msf.supcon_loss(a, y, temperature=0.3))


@pytest.mark.parametrize("backend", F32)
def test_nan_input_gives_nan_loss(backend):
    a, b = randn(6, 3, seed=1, dtype=torch.float32), randn(6, 3, seed=2, dtype=torch.float32)
    a = a.detach().clone()
    a[2, 1] = float("nan")
    a, b = _on(backend, a, b)
    assert torch.isnan(msf.nt_xent(a, b, backend=backend))


@pytest.mark.parametrize("op", ["nt_xent", "supcon"])
def test_autocast_bf16_on_cpu(op):
    def loss_of(a, b, y, queue):
        return msf.nt_xent(a, b) if op == "nt_xent" else msf.supcon_loss(torch.stack([a, b], 1), y)

    autocast_bf16_check(loss_of)


# --------------------------------------------------------------------------- bad input

X = torch.randn(4, 3)
Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("call,exc,name", [
    (lambda: msf.nt_xent(X, torch.randn(5, 3)), ValueError, "z2"),
    (lambda: msf.nt_xent(X, X.double()), TypeError, "z2"),
    (lambda: msf.nt_xent(X[0], X[0]), ValueError, "z1"),
    (lambda: msf.nt_xent(X, X, temperature=0.0), ValueError, "temperature"),
    (lambda: msf.nt_xent(X, X, temperature=-1.0), ValueError, "temperature"),
    (lambda: msf.nt_xent(X[:0], X[:0]), ValueError, "z1"),
    (lambda: msf.nt_xent(X, X, reduction="avg"), ValueError, "reduction"),
    (lambda: msf.supcon_loss(X, Y[:3]), ValueError, "labels"),
    (lambda: msf.supcon_loss(X, Y.float()), TypeError, "labels"),
    (lambda: msf.supcon_loss(X, [0, 1, 0, 1]), TypeError, "labels"),
    (lambda: msf.supcon_loss(X[None, None], Y), ValueError, "features"),
    (lambda: msf.supcon_loss(torch.randn(4, 0, 3), Y), ValueError, "features"),
    (lambda: msf.supcon_loss(torch.randn(4, 2, 3), Y.repeat(2)), ValueError, "labels"),
    (lambda: msf.supcon_loss(X.int(), Y), TypeError, "features"),
    (lambda: msf.nt_xent(X.double(), X.double(), backend="triton"), (TypeError, RuntimeError), "triton"),
    (lambda: labeled_contrastive(X, Y, torch.randn(2, 3)), ValueError, "key_labels"),
    (lambda: labeled_contrastive(X, Y, torch.randn(2, 3), Y), ValueError, "key_labels"),
    (lambda: labeled_contrastive(X, Y, torch.randn(2, 4), Y[:2]), ValueError, "key"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_cpp_checks_buffer_bounds():
    C = _ext.require("_C") if _ext.available("_C") else pytest.skip(f"_C not built: {_ext.load_error('_C')}")
    S = torch.zeros(4, 4)
    y = torch.zeros(4, dtype=torch.long)
    loss = torch.zeros(4)
    base = dict(dtype=0, S=S.data_ptr(), S_numel=16, B=4, C=4, ld=4, row0=0, exclude_self=True, pairwise=False,
                y_row=y.data_ptr(), y_row_numel=4, y_col=y.data_ptr(), y_col_numel=4, row_loss=loss.data_ptr(),
                row_loss_numel=4, g_row=loss.data_ptr(), g_row_numel=4, write_grad=True, nthreads=1)
    C.block_rows_labeled(**base)
    for bad in (dict(S_numel=15), dict(y_col_numel=3), dict(y_row_numel=3), dict(row_loss_numel=3),
                dict(g_row_numel=3), dict(row0=1), dict(ld=3), dict(dtype=5), dict(g_row=0)):
        with pytest.raises(ValueError, match="metassl_fast._C"):
            C.block_rows_labeled(**{**base, **bad})


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_raw_op_checks_labels():
    q = torch.randn(5, 3)
    with pytest.raises(ValueError, match="labels"):
        torch.ops.metassl_fast.labeled_fwd(q, None, torch.zeros(4, dtype=torch.long), None, None, True,
                                           torch.tensor(2.0), -1, True, "mean", False, False, False, False,
                                           False, False, "cpu")
    with pytest.raises(ValueError, match="labels"):
        torch.ops.metassl_fast.labeled_fwd(q, None, torch.zeros(5, dtype=torch.int32), None, None, True,
                                           torch.tensor(2.0), -1, True, "mean", False, False, False, False,
                                           False, False, "cpu")


def test_positives_per_row_counts():
    y = torch.tensor([3, 1, 3, 7, 3, 1])
    torch.testing.assert_close(positives_per_row(y, y, 0), torch.tensor([2, 1, 2, 0, 2, 1]))
    yk = torch.tensor([1, 1, 5])
    torch.testing.assert_close(positives_per_row(y, yk, None), torch.tensor([0, 2, 0, 0, 0, 2]))
    # anchors are keys 2..7 of a gathered key set (another rank's keys first)
    keys = torch.cat([torch.tensor([3, 9]), y])
    torch.testing.assert_close(positives_per_row(y, keys, 2), torch.tensor([3, 1, 3, 0, 3, 1]))


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_raw_ops_check_what_the_kernels_assume():
    """Direct torch.ops calls (the public functions never send these): mismatched D, a
    key with no rows, a bad reduction or scale (found by review)."""
    q, k = torch.randn(6, 8), torch.randn(9, 2)
    y, yk = torch.zeros(6, dtype=torch.long), torch.zeros(9, dtype=torch.long)
    s = torch.tensor(2.0)

    def lab(**kw):
        args = dict(query=q, key=k, labels=y, key_labels=yk, pos_logit=None, ext_positive=True, scale=s,
                    self_offset=-1, normalize=False, reduction="none", pairwise=False, precompute=False,
                    need_dq=False, need_dk=False, need_dpos=False, need_dscale=False, backend="cpu")
        args.update(kw)
        return torch.ops.metassl_fast.labeled_fwd(**args)

    with pytest.raises(ValueError, match="key"):
        lab()
    k8 = torch.randn(9, 8)
    with pytest.raises(ValueError, match="key"):
        lab(key=k8[:0], key_labels=yk[:0])
    # (labels or pos_logit on another device: _check_op refuses them; that needs a second
    # real device to test, a meta tensor only reaches the fake implementation)
    with pytest.raises(ValueError, match="reduction"):
        lab(key=k8, reduction="bogus")
    with pytest.raises(ValueError, match="scale"):
        lab(key=k8, scale=torch.tensor(0.0))
    with pytest.raises(ValueError, match="scale"):
        lab(key=k8, scale=torch.tensor([2.0]))
    with pytest.raises(ValueError, match="self_offset"):
        lab(key=k8, self_offset=4)
    with pytest.raises(ValueError, match="pos_logit"):
        lab(key=k8, pos_logit=torch.zeros(6), pairwise=True)
    with pytest.raises(ValueError, match="pos_logit"):
        lab(key=k8, pos_logit=torch.zeros(5))


def test_supcon_empty_feature_dimension():
    with pytest.raises(ValueError, match="features"):
        msf.supcon_loss(torch.randn(6, 2, 0), torch.zeros(6, dtype=torch.long))


def test_torch_compile_as_the_first_call_in_a_process():
    """The compiled module is loaded at import, not inside the first (traced) call."""
    code = ("import torch, metassl_fast as msf\n"
            "a, b = torch.randn(9, 4, requires_grad=True), torch.randn(9, 4)\n"
            "f = torch.compile(lambda a, b: msf.nt_xent(a, b) + msf.info_nce(a, b), fullgraph=True)\n"
            "print(float(f(a, b)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
