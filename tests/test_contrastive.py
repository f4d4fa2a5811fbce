"""info_nce / clip_loss (the contrastive op): every backend against the float64 reference,
loss and every gradient, through helpers.check (the TOL ceiling, and below float64 the
2x-torch rule); the raw ops' opcheck and torch.compile; dispatch and bad input.

float64 runs on the C++ kernels; the Triton and CUDA C++ kernels take fp32/fp16/bf16
(without a GPU, Triton runs under TRITON_INTERPRET=1 on CPU tensors, fp32 and fp16).
The GPU-only checks at the end are marked gpu and skipped, with the reason, without one.
"""
from __future__ import annotations

import ast
import itertools
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import metassl_fast as msf
from helpers import (DEVICE, INTERPRETED, TOL, autocast_bf16_check, backend_dtypes, backends, check, close,
                     compile_check, device_of, needs_triton, non_contiguous)
from metassl_fast import _ext
from metassl_fast.reference import contrastive_loss

F64 = backends("contrastive", torch.float64)
F32 = backends("contrastive", torch.float32)
GPU = backends("contrastive", only=("triton", "cuda"))
NAMES = ["loss", "d_query", "d_key", "d_negatives", "d_temperature"]


def _make(n, d, m, dtype, *, seed=0, temp=0.3, t_dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    neg = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if m else None
    t = torch.tensor(temp, dtype=t_dtype, requires_grad=True)
    return q, k, neg, t


def _on(backend, *xs):
    """Leaves on the backend's device (the Triton kernels take CUDA tensors on a GPU)."""
    dev = device_of(backend)
    return [None if x is None else x.detach().to(dev).requires_grad_(x.requires_grad) for x in xs]


def _info_nce(symmetric, reduction, normalize=True):
    def fn(backend, q, k, neg, t):
        return msf.info_nce(q, k, temperature=t, negatives=neg, symmetric=symmetric, normalize=normalize,
                            reduction=reduction, backend=backend)
    return fn


def _names(neg):
    return NAMES if neg is not None else ["loss", "d_query", "d_key", "d_temperature"]


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 257])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("m", [0, 5, 100])
def test_float64_grid(backend, n, d, m, small_blocks, gemm):
    """The issue's shape grid, every reduction, symmetric on and off, float64."""
    q, k, neg, t = _make(n, d, m, torch.float64, seed=n * 1000 + d * 10 + m)
    for symmetric, reduction in itertools.product([False, True], ["mean", "sum", "none"]):
        what = f"n={n} d={d} m={m} symmetric={symmetric} reduction={reduction}"
        check(_info_nce(symmetric, reduction), [q, k, neg, t], backend=backend, what=what, names=_names(neg))


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,d,m", [(1, 3, 0), (65, 130, 5), (257, 64, 100)])
def test_without_normalisation(backend, symmetric, reduction, n, d, m, small_blocks, gemm):
    q, k, neg, t = _make(n, d, m, torch.float64, temp=2.0)
    check(_info_nce(symmetric, reduction, normalize=False), [q, k, neg, t], backend=backend, names=_names(neg))


@pytest.mark.parametrize("backend,dtype", backend_dtypes("contrastive"))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,d,m", [(3, 3, 0), (65, 64, 5), (257, 130, 100)])
def test_low_precision_against_float64(backend, dtype, symmetric, n, d, m):
    """Inputs in dtype (a float64 temperature); the reference runs on the same values
    upcast to float64; loss and feature gradients come back in the input dtype."""
    if backend == "triton" and INTERPRETED and n > 128:
        pytest.skip("n=257 takes ~11 s a case under the Triton interpreter: test_low_precision_grid covers "
                    "triton here, and on a GPU this case runs")
    q, k, neg, t = _make(n, d, m, dtype)
    check(_info_nce(symmetric, "mean"), [q, k, neg, t], backend=backend, what=f"n={n} d={d} m={m}",
          names=_names(neg))


@pytest.mark.parametrize("backend,dtype", backend_dtypes("contrastive"))
@pytest.mark.parametrize("n", [1, 3, 17, 64, 65])
@pytest.mark.parametrize("d", [3, 16, 40])
@pytest.mark.parametrize("m", [0, 5])
def test_low_precision_grid(backend, dtype, n, d, m):
    """Smaller shapes (the Triton interpreter is slow), a float32 temperature, mean and none."""
    q, k, neg, t = _make(n, d, m, dtype, seed=n * 100 + d + m, t_dtype=torch.float32)
    for symmetric, reduction in itertools.product([False, True], ["mean", "none"]):
        check(_info_nce(symmetric, reduction), [q, k, neg, t], backend=backend,
              what=f"n={n} d={d} m={m} symmetric={symmetric} {reduction}", names=_names(neg))


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("symmetric", [False, True])
def test_sum_reduction_and_no_normalisation(backend, symmetric):
    q, k, neg, t = _make(33, 16, 5, torch.float32, temp=3.0, t_dtype=torch.float32)
    check(_info_nce(symmetric, "sum", normalize=False), [q, k, neg, t], backend=backend, names=NAMES)


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("layout", ["rows", "strided", "transposed"])
def test_non_contiguous_low_precision(backend, layout):
    """Convention 3 on every backend: sliced rows, an innermost stride of 2, a transpose."""
    q, k, neg, t = _make(17, 24, 5, torch.float32, t_dtype=torch.float32)
    q, k, neg = (non_contiguous(x, layout) for x in (q, k, neg))
    for symmetric in (False, True):
        check(_info_nce(symmetric, "none"), [q, k, neg, t], backend=backend, what=layout, names=NAMES)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(backend, symmetric, reduction, small_blocks, gemm):
    q, k, neg, t = _make(5, 3, 2, torch.float64, temp=0.5)

    def f(q, k, neg, t):
        return msf.info_nce(q, k, temperature=t, negatives=neg, symmetric=symmetric,
                            reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, neg, t))


@pytest.mark.parametrize("backend", F64)
def test_gradcheck_clip(backend, small_blocks, gemm):
    q, k, _, _ = _make(6, 4, 0, torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: msf.clip_loss(a, b, s, backend=backend), (q, k, scale))


def _open_clip_eager(image, text, logit_scale):
    """open_clip's ClipLoss for one process, as written there."""
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("n,d", [(1, 3), (64, 130), (257, 64)])
def test_clip_loss_matches_open_clip_formula(backend, n, d, small_blocks):
    q, k, _, _ = _make(n, d, 0, torch.float64)
    q = F.normalize(q.detach(), dim=1).requires_grad_()
    k = F.normalize(k.detach(), dim=1).requires_grad_()
    s = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    ours = msf.ClipLoss(backend=backend)(q, k, s.exp())
    g_ours = torch.autograd.grad(ours, (q, k, s))
    ref = _open_clip_eager(q, k, s.exp())
    g_ref = torch.autograd.grad(ref, (q, k, s))
    atol, rtol = TOL[torch.float64]
    for i, (a, b) in enumerate(zip([ours, *g_ours], [ref, *g_ref])):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.isfinite(a).all(), i
        err, bound = (a - b).abs().max().item(), atol + rtol * b.abs().max().item()
        assert err <= bound, f"output {i}: max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("backend", F32)
def test_clip_loss_low_precision(backend):
    q, k, _, _ = _make(40, 24, 0, torch.float32, seed=7)
    s = torch.tensor(14.0, requires_grad=True)
    check(lambda b, q, k, s: msf.clip_loss(q, k, s, backend=b), [q, k, s], backend=backend,
          allow="clip_unnormalised", names=["loss", "d_image", "d_text", "d_logit_scale"])
    qd, kd, sd = _on(backend, q, k, s)
    ours = msf.clip_loss(qd, kd, sd, backend=backend)
    g = torch.autograd.grad(ours, (qd, kd, sd))
    q64, k64, s64 = (x.detach().double().requires_grad_() for x in (q, k, s))
    ref = contrastive_loss(q64, k64, None, s64, True, False, "mean")
    g64 = torch.autograd.grad(ref, (q64, k64, s64))
    for a, b in zip([ours, *g], [ref, *g64]):
        close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", F64)
def test_default_block_size_and_threads(backend):
    """The production block size and thread counts give the same answer."""
    q, k, neg, t = _make(300, 40, 50, torch.float64)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            check(_info_nce(True, "mean"), [q, k, neg, t], backend=backend, what=f"threads={threads}", names=NAMES)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", F64)
def test_non_contiguous_inputs(backend, small_blocks):
    g = torch.Generator().manual_seed(3)
    base_q = torch.randn(130, 70, dtype=torch.float64, generator=g)
    base_k = torch.randn(64, 65, dtype=torch.float64, generator=g)
    base_n = torch.randn(10, 128, dtype=torch.float64, generator=g)
    q = base_q[::2, 3:67].detach().requires_grad_()   # row stride 140, sliced columns
    k = base_k.t()[:, :64].detach().requires_grad_()    # transposed (65, 64): column stride 65
    neg = base_n[:, ::2].detach().requires_grad_()     # innermost stride 2
    assert not q.is_contiguous() and not k.is_contiguous() and not neg.is_contiguous()
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    # check() hands the backend these views themselves (float64 on the CPU: no copy)
    check(_info_nce(True, "none"), [q, k, neg, t], backend=backend, names=NAMES)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("key_grad,neg_grad", [(False, False), (True, False), (False, True)])
def test_grad_only_where_required(backend, symmetric, key_grad, neg_grad, small_blocks):
    """A frozen key tower or a queue without grad gets no gradient; the rest is exact."""
    q, k, neg, _ = _make(33, 8, 7, torch.float64)
    k = k.detach().requires_grad_(key_grad)
    neg = neg.detach().requires_grad_(neg_grad)
    msf.info_nce(q, k, temperature=0.1, negatives=neg, symmetric=symmetric, backend=backend).backward()
    assert (k.grad is not None) == key_grad and (neg.grad is not None) == neg_grad
    q_ref, k_ref, n_ref = (x.detach().requires_grad_(x.requires_grad) for x in (q, k, neg))
    contrastive_loss(q_ref, k_ref, n_ref, torch.tensor(10.0, dtype=torch.float64), symmetric, True,
                     "mean").backward()
    for ours, ref in ((q, q_ref), (k, k_ref), (neg, n_ref)):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", F32)
def test_frozen_keys_and_queue(backend):
    q, k, neg, _ = _make(20, 16, 9, torch.float32, seed=3)
    q, k, neg = _on(backend, q, k.detach(), neg)
    loss = msf.info_nce(q, k, negatives=neg, backend=backend)
    loss.backward()
    assert k.grad is None and neg.grad is not None and q.grad is not None
    q64, n64 = (x.detach().double().cpu().requires_grad_() for x in (q, neg))
    contrastive_loss(q64, k.detach().double().cpu(), n64, torch.tensor(1 / 0.07, dtype=torch.float64),
                     False, True, "mean").backward()
    close(q.grad, q64.grad, rtol=1e-4, atol=1e-6)
    close(neg.grad, n64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", F32)
def test_no_grad_forward(backend):
    q, k, neg, _ = _make(40, 16, 3, torch.float32)
    qd, kd, nd = _on(backend, q, k, neg)
    with torch.no_grad():
        for symmetric in (False, True):
            ours = msf.info_nce(qd, kd, negatives=nd, symmetric=symmetric, backend=backend)
            ref = contrastive_loss(q.double(), k.double(), neg.double(),
                                   torch.tensor(1 / 0.07, dtype=torch.float64), symmetric, True, "mean")
            assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-6


@pytest.mark.parametrize("backend", F32)
def test_nan_input_gives_nan_loss(backend):
    q, k, _, _ = _make(16, 8, 0, torch.float32)
    q = q.detach().clone()
    q[3, 2] = float("nan")
    q, k = _on(backend, q, k.detach())
    for symmetric in (False, True):
        loss = msf.info_nce(q, k, symmetric=symmetric, backend=backend)
        assert torch.isnan(loss), "a NaN input must give a NaN loss"
        per_row = msf.info_nce(q, k, reduction="none", backend=backend)
        assert torch.isnan(per_row[3])


@pytest.mark.parametrize("backend", F32)
def test_modules_match_functional(backend):
    q, k, neg = _on(backend, *_make(20, 8, 4, torch.float32)[:3])
    crit = msf.InfoNCE(temperature=0.2, symmetric=True, normalize=True, reduction="sum", backend=backend)
    a = crit(q, k, neg)
    b = msf.info_nce(q, k, temperature=0.2, negatives=neg, symmetric=True, reduction="sum", backend=backend)
    torch.testing.assert_close(a, b)
    assert "temperature=0.2" in repr(crit)


@pytest.mark.parametrize("backend", F32)
def test_large_logits_are_stable(backend):
    """CLIP's logit_scale of 100 on unnormalised features: no overflow in exp."""
    q, k, _, _ = _make(70, 16, 0, torch.float32)
    s = 100.0
    qd, kd = _on(backend, q * 3, k * 3)
    ours = msf.clip_loss(qd, kd, s, backend=backend)
    ref = contrastive_loss(q.double() * 3, k.double() * 3, None, torch.tensor(s, dtype=torch.float64),
                           True, False, "mean")
    assert torch.isfinite(ours)
    assert abs(ours.item() - ref.item()) <= 1e-4 * abs(ref.item())


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("symmetric", [False, True])
def test_tiny_loss_keeps_its_relative_precision(backend, symmetric):
    """Well-separated pairs give a loss of ~4e-5.  Its float32 error must be no worse
    than torch's own float32 cross-entropy on the same inputs (computing lse - positive
    in float32 cancelled to about twice that)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, 16, generator=g)
    k = q + 0.01 * torch.randn(16, 16, generator=g)
    scale = torch.tensor(20.0, dtype=torch.float64)
    ref = contrastive_loss(q.double(), k.double(), None, scale, symmetric, True, "mean").item()
    torch32 = contrastive_loss(q, k, None, scale.float(), symmetric, True, "mean").item()
    qd, kd = _on(backend, q, k)
    ours = msf.info_nce(qd, kd, temperature=0.05, symmetric=symmetric, backend=backend).item()
    assert ref < 1e-4
    assert abs(ours / ref - 1) <= 1.5 * abs(torch32 / ref - 1) + 1e-6, (ours, torch32, ref)


@pytest.mark.parametrize("backend", F64)
def test_retained_graph_and_inplace_grad_edits(backend):
    """The precomputed gradient is never handed out as .grad itself: editing .grad in
    place (an optimiser, clip_grad_norm_) between backwards of a retained graph works."""
    q, k, _, _ = _make(9, 4, 0, torch.float64)
    loss = msf.info_nce(q, k, backend=backend)
    q_ref, k_ref = (x.detach().requires_grad_() for x in (q, k))
    ref = msf.info_nce(q_ref, k_ref, backend="torch")
    for x, l in ((q, loss), (q_ref, ref)):
        l.backward(retain_graph=True)
        x.grad.mul_(0.5)
        l.backward(retain_graph=True)
        l.backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_queue_updated_in_place_before_backward(backend, reduction):
    """MoCo enqueues into the negatives queue between forward and backward."""
    q, k, queue, _ = _make(12, 6, 20, torch.float64)
    queue = queue.detach()
    original = queue.clone()
    loss = msf.info_nce(q, k, negatives=queue, reduction=reduction, backend=backend)
    queue[:5] = torch.randn(5, 6, dtype=torch.float64)  # the enqueue
    loss.sum().backward()
    q_ref, k_ref = (x.detach().requires_grad_() for x in (q, k))
    contrastive_loss(q_ref, k_ref, original, torch.tensor(1 / 0.07, dtype=torch.float64), False, True,
                     reduction).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.grad, k_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["info_nce", "clip", "queue_fp32"])
def test_autocast_bf16_on_cpu(op):
    """queue_fp32: a float32 MoCo queue beside bf16 features (mixed dtypes are computed
    in float32 under autocast)."""
    def loss_of(a, b, y, queue):
        if op == "info_nce":
            return msf.info_nce(a, b, temperature=0.2)
        if op == "queue_fp32":
            return msf.info_nce(a, b, temperature=0.2, negatives=queue)
        return msf.clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), 10.0)

    autocast_bf16_check(loss_of)


@needs_triton
@pytest.mark.parametrize("backend", backends("contrastive", only=("triton", "cuda")))
def test_float64_is_refused(backend):
    q = torch.randn(4, 3, dtype=torch.float64, device=device_of(backend))
    with pytest.raises(TypeError, match="query"):
        msf.info_nce(q, q, backend=backend)


@needs_triton
def test_large_d_is_refused():
    q = torch.randn(4, 16385, device=DEVICE)
    with pytest.raises(ValueError, match="D <= 16384, got D = 16385"):
        msf.info_nce(q, q, backend="triton")


def _family_case(name, n, d):
    """(inputs in float64, loss(backend, *inputs)) of one contrastive-family op; every
    input that can take a gradient is among the inputs."""
    g = torch.Generator().manual_seed(3)
    x = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if name == "clip_loss":  # symmetric, learnable scale: the ds partials of every chunk program
        # open_clip's features are unit rows (unnormalised ones: helpers.RULE_EXCEPTIONS)
        unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
        return (unit(x(n, d)), unit(x(n, d)), torch.tensor(14.0, dtype=torch.float64)), \
            lambda b, q, k, s: msf.clip_loss(q, k, s, backend=b)
    if name == "info_nce+negatives":  # one-sided, extra columns that get no gradient of their own
        return (x(n, d), x(n, d), x(n + 11, d)), \
            lambda b, q, k, m: msf.info_nce(q, k, negatives=m, temperature=0.1, backend=b)
    if name == "nt_xent":  # labelled rows, self-mask
        return (x(n, d), x(n, d)), lambda b, z1, z2: msf.nt_xent(z1, z2, temperature=0.5, backend=b)
    if name == "supcon_loss":
        labels = torch.arange(n) % 5
        return (x(n, d),), lambda b, f: msf.supcon_loss(f, labels.to(f.device), temperature=0.1, backend=b)
    return (x(n, d), x(n, d), torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)), \
        lambda b, q, k, s, t: msf.siglip_loss(q, k, s, t, backend=b)


FAMILY_CHUNK_CASES = [(op, 37, 130) for op in ("clip_loss", "info_nce+negatives", "nt_xent", "supcon_loss",
                                               "siglip_loss")] + [("clip_loss", 20, 1025)]


@needs_triton
@pytest.mark.parametrize("name,n,d", FAMILY_CHUNK_CASES)
def test_d_streams_in_chunks_across_row_tiles(name, n, d):
    """Several row and column tiles (n > 16, the interpreter's tile), several D chunks of
    the S product and several output chunks of the backward (grid axis 1; D = 1025 is the
    old whole-D tile's limit + 1): loss and every gradient, the scalar parameters' (summed
    by chunk 0's programs) included, against float64 and within twice a float32 torch
    run's error (helpers.check)."""
    inputs, loss_of = _family_case(name, n, d)
    check(loss_of, [t.float() for t in inputs], backend="triton", what=name)


@needs_triton
def test_offsets_beyond_int32_are_refused_before_any_kernel():
    """The Triton kernels offset in 32 bits: rows x D >= 2^31 is a ValueError from the
    launcher (meta tensors: nothing is allocated, no kernel runs)."""
    from metassl_fast.ops.contrastive import triton as ct
    from metassl_fast.ops.inner_loop import triton as it
    from metassl_fast.ops.labeled import triton as lt
    from metassl_fast.ops.siglip import triton as st

    n, d = 131072, 16384  # 2^31 elements
    q = torch.empty(n, d, dtype=torch.bfloat16, device="meta")
    vec = torch.empty(n, device="meta")
    msg = r"rows x D must be < 2\^31, got 2147483648"
    with pytest.raises(ValueError, match=msg):
        ct.launch_fwd(q, q, vec, vec, vec, vec, vec, 14.0, False)
    with pytest.raises(ValueError, match=msg):
        ct.launch_bwd(q, q, vec, vec, vec, 14.0, False, True, (0, n))
    with pytest.raises(ValueError, match=msg):
        lt.Launch(q, q, vec.long(), vec.long(), 14.0, None, False)
    with pytest.raises(ValueError, match=msg):
        st.Launch(q, q, 10.0, -10.0, 0)
    with pytest.raises(ValueError, match=r"\(steps \+ 1\) x C x D must be < 2\^31"):
        it._offsets(25, 75, 64, 2**20, 31)
    it._offsets(128, 128, 64, 16384, 100)  # the largest sizes that fit pass


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic_mode_takes_the_column_lse_from_a_second_one_sided_pass(monkeypatch, reduction):
    """torch.use_deterministic_algorithms(True): the symmetric forward's lock-merged column
    partials (merge order varies between GPU runs) give way to two one-sided passes,
    (Q, K) and (K[:N], Q), with the same loss and gradients (negatives in K included: the
    column loss runs over the N queries only), bit for bit the same on a second run."""
    from metassl_fast.kernels import contrastive as tk

    real, calls = tk.contrastive_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(kwargs["SYMMETRIC"])
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(tk, "contrastive_fwd_kernel", Spy())
    g = torch.Generator().manual_seed(5)
    q, k, m = (torch.randn(r, 20, generator=g, dtype=torch.float64) for r in (37, 37, 9))
    w = torch.rand(37, generator=g, dtype=torch.float64)  # weights of the per-row losses ('none')

    def run(backend, dtype, deterministic=False):
        qx, kx, mx = (x.to(DEVICE if backend == "triton" else "cpu", dtype, copy=True).requires_grad_()
                      for x in (q, k, m))
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            loss = msf.info_nce(qx, kx, negatives=mx, temperature=0.1, symmetric=True, reduction=reduction,
                                backend=backend)
        finally:
            torch.use_deterministic_algorithms(previous)
        total = loss if reduction == "mean" else (loss * w.to(loss)).sum()
        total.backward()
        return [t.detach().double().cpu() for t in (loss, qx.grad, kx.grad)]

    want = run("torch", torch.float64)
    out = {}
    for deterministic in (True, False):
        calls.clear()
        out[deterministic] = run("triton", torch.float32, deterministic)
        assert calls == ([False, False] if deterministic else [True])
    again = run("triton", torch.float32, True)
    for det, lock, ref, det2 in zip(out[True], out[False], want, again):
        tol = 1e-5 * max(1.0, float(ref.abs().max()))
        assert float((det - ref).abs().max()) < tol
        assert float((det - lock).abs().max()) < tol
        assert torch.equal(det, det2)


# --------------------------------------------------------------------------- dispatch


def test_default_backend_on_cpu_is_the_cpp_kernel(monkeypatch):
    monkeypatch.delenv("METASSL_FAST_BACKEND", raising=False)
    expected = "cpu" if _ext.available("_C") else "torch"
    assert msf._backend.resolve(None, torch.device("cpu")) == expected


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("METASSL_FAST_BACKEND", "torch")
    assert msf._backend.resolve(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("METASSL_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="METASSL_FAST_BACKEND"):
        msf.info_nce(torch.randn(2, 3), torch.randn(2, 3))


def test_small_blocks_fixture_reaches_the_row_sweep(small_blocks):
    """conftest's small_blocks patches ops/_common.py, which the CPU row sweep reads at call
    time: the float64 grids' shapes span several row blocks."""
    from metassl_fast.ops import _common
    assert _common.block_rows(257, 357, 8) == 1 and _common.block_rows(65, 64, 8) == 8


def test_operand_scale_is_a_power_of_two_into_one_to_two():
    """The GPU backwards scale G's weights before rounding G to fp16/bf16 (ops/_common.py)."""
    from metassl_fast.ops._common import operand_scale
    for m in (3e-5, 1 / 16384, 0.37, 1.0, 65536.0 * 2):
        for dtype in (torch.float16, torch.bfloat16):
            f = operand_scale(dtype, torch.tensor([m, -m / 3]))
            assert math.frexp(f)[0] == 0.5 and 1.0 <= m * f < 2.0
    assert operand_scale(torch.float32, torch.tensor([3e-5])) == 1.0
    assert operand_scale(torch.float16, torch.zeros(3)) == 1.0
    assert operand_scale(torch.float16, 0.25) == 4.0


def test_cuda_backend_on_cpu_tensors_says_so():
    """backend='cuda' on CPU tensors: ValueError where _C_cuda is built, else RuntimeError
    saying how to build it; either names cuda."""
    exc = ValueError if msf._ext.available("_C_cuda") else RuntimeError
    with pytest.raises(exc, match="cuda"):
        msf.info_nce(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_every_op_refuses_cuda_backend_on_cpu_tensors():
    """backend='cuda' is checked before any op runs: CPU tensors are refused, naming cuda."""
    from metassl_fast import meta
    exc = ValueError if msf._ext.available("_C_cuda") else RuntimeError
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    calls = [lambda: msf.nt_xent(x, x, backend="cuda"), lambda: msf.supcon_loss(x, y, backend="cuda"),
             lambda: msf.siglip_loss(x, x, 2.0, -1.0, backend="cuda"),
             lambda: meta.anil_loss(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.randn(1, 2, 3),
                                    torch.zeros(1, 2, dtype=torch.long), torch.randn(2, 3), torch.zeros(2),
                                    backend="cuda")]
    for call in calls:
        with pytest.raises(exc, match="cuda"):
            call()


@pytest.mark.skipif(not msf._ext.available("_C_cuda"), reason="_C_cuda not built (no nvcc at install time)")
def test_cuda_module_imports_and_checks_arguments_before_any_cuda_call():
    """Where _C_cuda was built (nvcc present; CI builds it with -Werror for sm_80 and sm_90),
    it imports without a GPU and refuses bad sizes itself, before touching the device;
    pointers it cannot verify as device memory are refused (no driver: a RuntimeError)."""
    mod = msf._ext.require("_C_cuda")
    assert mod.TILE == 64 and mod.device_count() >= 0
    x = torch.zeros(8, 4)
    buf = torch.zeros(8)

    def fwd(**change):
        args = dict(dtype=0, Q=x.data_ptr(), Q_numel=x.numel(), K=x.data_ptr(), K_numel=x.numel(),
                    lse=buf.data_ptr(), lse_numel=8, pos=buf.data_ptr(), pos_numel=8, row_loss=buf.data_ptr(),
                    row_loss_numel=8, col_max=buf.data_ptr(), col_max_numel=8, col_sum=buf.data_ptr(),
                    col_sum_numel=8, lock=buf.data_ptr(), lock_numel=8, N=8, C=8, D=4, ldq=4, ldk=4, scale=1.0,
                    symmetric=True, stream=0)
        args.update(change)
        mod.contrastive_fwd(**args)

    for change, match in [(dict(dtype=1), "dtype"), (dict(C=7), "C >= N"), (dict(ldq=3), "stride"),
                          (dict(scale=float("nan")), "finite"), (dict(Q_numel=31), "Q holds 31"),
                          (dict(lse_numel=7), "lse holds 7"), (dict(lock=0), "lock is a null pointer")]:
        with pytest.raises(ValueError, match=match):
            fwd(**change)
    with pytest.raises((RuntimeError, ValueError)):  # host memory is never handed to a kernel
        fwd()
    with pytest.raises(ValueError, match="col0"):
        mod.contrastive_bwd(dtype=0, dk=True, Q=x.data_ptr(), Q_numel=32, K=x.data_ptr(), K_numel=32,
                            lse=buf.data_ptr(), lse_numel=8, g_row=buf.data_ptr(), g_row_numel=8,
                            lse_col=buf.data_ptr(), lse_col_numel=8, g_col=buf.data_ptr(), g_col_numel=8,
                            out=x.data_ptr(), out_numel=32, ds_part=buf.data_ptr(), ds_part_numel=8, N=8, C=8, D=4,
                            col0=3, col1=9, ldq=4, ldk=4, ldo=4, scale=1.0, symmetric=False, stream=0)
    y = torch.zeros(8, dtype=torch.long)
    lab = dict(dtype=0, Q=x.data_ptr(), Q_numel=32, K=x.data_ptr(), K_numel=32, yq=y.data_ptr(), yq_numel=8,
               yk=y.data_ptr(), yk_numel=8, ext=0, ext_numel=0, has_ext=False, ext_pos=False, loss=buf.data_ptr(),
               loss_numel=8, stat_a=buf.data_ptr(), stat_a_numel=8, stat_b=buf.data_ptr(), stat_b_numel=8, N=8,
               C=8, D=4, ldq=4, ldk=4, scale=1.0, self=True, self_col0=0, pairwise=False, stream=0)
    for change, match in [(dict(self_col0=1), "own columns"), (dict(yk_numel=7), "key_labels holds 7"),
                          (dict(has_ext=True), "ext is a null pointer"),
                          (dict(has_ext=True, ext=buf.data_ptr(), ext_numel=8, pairwise=True), "mean-positive")]:
        with pytest.raises(ValueError, match=match):
            mod.labeled_fwd(**{**lab, **change})
    inner = {name: 0 for name in ("X", "y", "Xq", "yq", "W0", "b0", "aW", "ab", "task_weight", "dWK", "dbK", "loss",
                                  "dX", "dXq", "dW0", "db0", "daW", "dab", "W_traj", "b_traj")}
    inner.update({f"{name}_numel": 0 for name in list(inner)})
    inner.update(X=x.data_ptr(), X_numel=32, y=y.data_ptr(), y_numel=8, aW=x.data_ptr(), aW_numel=32,
                 ab=buf.data_ptr(), ab_numel=8, W0=x.data_ptr(), W0_numel=32, b0=buf.data_ptr(), b0_numel=8,
                 W_traj=x.data_ptr(), W_traj_numel=32, b_traj=buf.data_ptr(), b_traj_numel=8)
    base = dict(mode=1, T=1, S=8, Q=0, D=4, C=1, K=0, grad=False, first_order=False, need_dlr=False, stream=0)
    for change, match in [(dict(mode=3), "mode"), (dict(S=4000, C=4), "shared memory"),
                          (dict(y_numel=7), "labels holds 7"), (dict(K=8), "W_traj holds 32")]:
        with pytest.raises(ValueError, match=match):
            mod.inner_loop(**{**inner, **base, **change})
    with pytest.raises(ValueError, match="part holds 1"):
        mod.siglip_bwd(dtype=0, dk=False, Q=x.data_ptr(), Q_numel=32, K=x.data_ptr(), K_numel=32, out=x.data_ptr(),
                       out_numel=32, part=buf.data_ptr(), part_numel=1, N=8, C=8, D=4, ldq=4, ldk=4, ldo=4,
                       logit_scale=1.0, bias=0.0, diag_col0=0, w=1.0, stream=0)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        import triton  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="triton"):
            msf.info_nce(torch.randn(2, 3), torch.randn(2, 3), backend="triton")
        return
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        msf.info_nce(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


# --------------------------------------------------------------------------- bad input

X = torch.randn(4, 3)


@pytest.mark.parametrize("call,exc,name", [
    (lambda: msf.info_nce(torch.randn(4), X), ValueError, "query"),
    (lambda: msf.info_nce(X, torch.randn(4, 3, 1)), ValueError, "key"),
    (lambda: msf.info_nce(X, torch.randn(5, 3)), ValueError, "key"),
    (lambda: msf.info_nce(X, torch.randn(4, 2)), ValueError, "key"),
    (lambda: msf.info_nce(X.long(), X.long()), TypeError, "query"),
    (lambda: msf.info_nce(X, X.double()), TypeError, "key"),
    (lambda: msf.info_nce(X, X, negatives=torch.randn(5, 2)), ValueError, "negatives"),
    (lambda: msf.info_nce(X, X, negatives=torch.randn(5, 3).double()), TypeError, "negatives"),
    (lambda: msf.info_nce(X, X, negatives=torch.randn(5)), ValueError, "negatives"),
    (lambda: msf.info_nce(X, X, negatives=torch.randn(0, 3)), ValueError, "negatives"),
    (lambda: msf.info_nce(X, X, temperature=0.0), ValueError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature=-1.0), ValueError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature=float("nan")), ValueError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature=float("inf")), ValueError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature=torch.tensor([0.1, 0.2])), ValueError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature=torch.tensor(-0.1)), ValueError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature=torch.tensor(1)), TypeError, "temperature"),
    (lambda: msf.info_nce(X, X, temperature="0.1"), TypeError, "temperature"),
    (lambda: msf.info_nce(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "empty"),
    (lambda: msf.info_nce(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "query"),
    (lambda: msf.info_nce(X, X, reduction="avg"), ValueError, "reduction"),
    (lambda: msf.info_nce(X, X, backend="gpu"), ValueError, "backend"),
    (lambda: msf.info_nce(X, X, symmetric="yes"), TypeError, "symmetric"),
    (lambda: msf.info_nce(X, X, normalize=1), TypeError, "normalize"),
    (lambda: msf.info_nce(X.numpy(), X), TypeError, "query"),
    (lambda: msf.info_nce(X, X, negatives=X.to("meta")), ValueError, "negatives"),
    (lambda: msf.info_nce(X, X.to("meta")), ValueError, "key"),
    (lambda: msf.clip_loss(X, X, torch.ones(2)), ValueError, "logit_scale"),
    (lambda: msf.clip_loss(X, X, torch.ones(1, 1)), ValueError, "logit_scale"),
    (lambda: msf.clip_loss(X, X, 0.0), ValueError, "logit_scale"),
    (lambda: msf.clip_loss(X, X, torch.tensor(float("nan"))), ValueError, "logit_scale"),
    (lambda: msf.clip_loss(X, torch.randn(3, 3), 1.0), ValueError, "text_features"),
    (lambda: msf.InfoNCE(temperature=0), ValueError, "temperature"),
    (lambda: msf.InfoNCE(reduction="max"), ValueError, "reduction"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_cpp_checks_buffer_bounds():
    """The compiled module refuses sizes that would take it outside the buffers."""
    C = _ext.require("_C") if _ext.available("_C") else pytest.skip("_C not built")
    S = torch.zeros(4, 8)
    lse = torch.zeros(4)
    common = dict(dtype=0, S=S.data_ptr(), B=4, C=8, ld=8, row0=0, n_pairs=8, lse=lse.data_ptr(),
                  lse_numel=4, compute_lse=True, pos=0, pos_numel=0, row_loss=0, row_loss_numel=0,
                  g_row=0, g_row_numel=0,
                  lse_col=0, g_col=0, col_numel=0, write_grad=False, nthreads=1)
    C.block_rows(S_numel=32, **common)  # the sizes that fit pass
    with pytest.raises(ValueError, match="S holds"):
        C.block_rows(S_numel=31, **common)
    with pytest.raises(ValueError, match="lse holds"):
        C.block_rows(S_numel=32, **{**common, "lse_numel": 3})
    with pytest.raises(ValueError, match="row0"):
        C.block_rows(S_numel=32, **{**common, "row0": 6})
    with pytest.raises(ValueError, match="ld"):
        C.block_rows(S_numel=32, **{**common, "ld": 7})
    with pytest.raises(ValueError, match="dtype"):
        C.block_rows(S_numel=32, **{**common, "dtype": 5})
    with pytest.raises(ValueError, match="g_row"):
        C.block_rows(S_numel=32, **{**common, "write_grad": True})
    with pytest.raises(ValueError, match="col_max"):
        C.block_col_stats(dtype=0, S=S.data_ptr(), S_numel=32, B=4, n_cols=8, ld=8,
                          col_max=lse.data_ptr(), col_sum=lse.data_ptr(), col_numel=4, nthreads=1)


# --------------------------------------------------------------------------- torch.library


def _op_args(precompute, symmetric, reduction, backend="cpu", neg=True):
    q, k, n, _ = _make(19, 5, 3 if neg else 0, torch.float32)
    q, k, n = _on(backend, q, k, n)
    scale = torch.tensor(4.0, requires_grad=True, device=device_of(backend))
    return (q, k, n, scale, symmetric, True, reduction, precompute, True, True, neg, True, backend)


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction,precompute", [("mean", True), ("sum", True), ("none", False)])
def test_opcheck_forward(backend, symmetric, reduction, precompute):
    torch.library.opcheck(torch.ops.metassl_fast.contrastive_fwd.default,
                          _op_args(precompute, symmetric, reduction, backend))


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_backward(backend, symmetric):
    q, k, n, scale, *_ = _op_args(False, symmetric, "none", backend)
    out = torch.ops.metassl_fast.contrastive_fwd(q, k, n, scale, symmetric, True, "none", False,
                                                 True, True, True, True, backend)
    grad = torch.randn(19, device=q.device)
    torch.library.opcheck(torch.ops.metassl_fast.contrastive_bwd.default,
                          (grad, q.detach(), k.detach(), n.detach(), scale.detach(), out[1].detach(),
                           out[2].detach(), symmetric, True, "none", True, True, True, True, backend))


def _opchecked_ops():
    """The ops some test module hands to torch.library.opcheck (read from the sources:
    torch.ops.metassl_fast.<name>.default as opcheck's first argument)."""
    found = set()
    here = os.path.dirname(os.path.abspath(__file__))
    for fname in sorted(os.listdir(here)):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        with open(os.path.join(here, fname)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.library.opcheck" and node.args:
                target = ast.unparse(node.args[0])
                if target.startswith("torch.ops.metassl_fast.") and target.endswith(".default"):
                    found.add(target.split(".")[3])
    return found


def test_every_registered_op_has_an_opcheck_case():
    """Every op in the metassl_fast namespace (a new one included) is opchecked somewhere."""
    registered = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("metassl_fast::")}
    assert {"contrastive_fwd", "inner_loop_bwd", "anil_apply"} <= registered, registered
    missing = registered - _opchecked_ops()
    assert not missing, f"ops without a torch.library.opcheck test: {sorted(missing)}"


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("reduction", ["none", "mean"])  # recomputed and precomputed backward
def test_double_backward_is_a_clear_error(backend, reduction):
    q, k, _, _ = _make(5, 3, 0, torch.float64)
    loss = msf.info_nce(q, k, reduction=reduction, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        (gq,) = torch.autograd.grad(loss.sum(), q, create_graph=True)
        gq.sum().backward()


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("symmetric,reduction", [(False, "mean"), (True, "none")])
def test_torch_compile_fullgraph(backend, symmetric, reduction):
    q, k, neg, t = _on(backend, *_make(37, 16, 5, torch.float32, temp=0.25, t_dtype=torch.float32))

    def step(q, k, neg, t):
        loss = msf.info_nce(q, k, temperature=t, negatives=neg, symmetric=symmetric,
                            reduction=reduction, backend=backend)
        return (loss * torch.arange(1, loss.numel() + 1, device=loss.device).reshape(loss.shape)).sum()

    compile_check(step, [q, k, neg, t])


@pytest.mark.parametrize("backend", F32)
def test_torch_compile_fullgraph_clip(backend):
    q, k = _on(backend, *_make(23, 8, 0, torch.float32)[:2])
    s = torch.tensor(5.0, requires_grad=True, device=device_of(backend))
    compile_check(lambda q, k, s: msf.clip_loss(q, k, s, backend=backend), [q, k, s])


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_backward_op_checks_saved_statistics():
    q, k, n, scale, *_ = _op_args(False, True, "none")
    out = torch.ops.metassl_fast.contrastive_fwd(q, k, n, scale, True, True, "none", False,
                                                 True, True, True, True, "cpu")
    lse_row, lse_col = out[1].detach(), out[2].detach()
    args = (q.detach(), k.detach(), n.detach(), scale.detach())
    with pytest.raises(ValueError, match="lse_row"):
        torch.ops.metassl_fast.contrastive_bwd(torch.ones(19), *args, lse_row[:5], lse_col, True, True,
                                               "none", True, True, True, True, "cpu")
    with pytest.raises(ValueError, match="lse_col"):
        torch.ops.metassl_fast.contrastive_bwd(torch.ones(19), *args, lse_row, lse_col.double(), True, True,
                                               "none", True, True, True, True, "cpu")
    with pytest.raises(ValueError, match="grad"):
        torch.ops.metassl_fast.contrastive_bwd(torch.ones(3), *args, lse_row, lse_col, True, True,
                                               "none", True, True, True, True, "cpu")


# --------------------------------------------------------------------------- GPU only (pytest -m gpu)


def _gpu_inputs(n, d, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(r, d, generator=g, device="cuda").to(dtype).requires_grad_() if r else None
            for r in (n, n, m)]


def _gpu_run(backend, q, k, neg, symmetric, reduction):
    t = torch.tensor(0.3, device=q.device, requires_grad=True)
    loss = msf.info_nce(q, k, temperature=t, negatives=neg, symmetric=symmetric,
                        reduction=reduction, backend=backend)
    inputs = [x for x in (q, k, neg, t) if x is not None]
    w = torch.linspace(0.5, 1.5, loss.numel(), device=q.device).reshape(loss.shape)
    return [loss] + list(torch.autograd.grad((loss.float() * w).sum(), inputs))


@pytest.mark.parametrize("backend,dtype", backend_dtypes("contrastive", only=("triton", "cuda")))
@pytest.mark.parametrize("n", [1, 3, 63, 64, 65, 257, 1000])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
@pytest.mark.parametrize("m", [0, 5, 100])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_grid_against_float64(backend, dtype, n, d, m):
    """The full shape grid (n up to 1000) on the GPU, bf16 included."""
    g = torch.Generator().manual_seed(n + d + m)
    q, k = (torch.randn(n, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    neg = torch.randn(m, d, generator=g).to(dtype).requires_grad_() if m else None
    t = torch.tensor(0.3, requires_grad=True)
    for symmetric, reduction in [(False, "mean"), (True, "mean"), (True, "none"), (False, "sum")]:
        check(_info_nce(symmetric, reduction), [q, k, neg, t], backend=backend,
              what=f"n={n} d={d} m={m} {symmetric} {reduction}", names=_names(neg))


@pytest.mark.parametrize("span", [None, "128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and msf._ext.available("_C_cuda")),
                    reason="needs a CUDA device and _C_cuda")
def test_cuda_backward_spans_on_the_gpu(monkeypatch, dtype, span):
    """The CUDA C++ backward at D = 2000: its accumulators in shared memory, D in several
    pieces on every card (grad_span; sm_90 holds 768 bf16 / 704 fp32 columns a block), and
    with one 64 / 128-column chunk per block (METASSL_FAST_CUDA_GRAD_SPAN=128: fp32 two
    chunks in shared memory, bf16 one in registers)."""
    if span is not None:
        monkeypatch.setenv("METASSL_FAST_CUDA_GRAD_SPAN", span)
    g = torch.Generator().manual_seed(2000)
    q, k = (torch.randn(150, 2000, generator=g).to(dtype).requires_grad_() for _ in range(2))
    t = torch.tensor(0.3, requires_grad=True)
    check(_info_nce(True, "mean"), [q, k, None, t], backend="cuda", what=f"D=2000 span={span}", names=_names(None))


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_output_element_is_written(backend, monkeypatch):
    """Poison fresh buffers with NaN: an element a kernel forgets to write stays NaN."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_cuda and out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned)
    q, k, neg = _gpu_inputs(333, 72, 40, torch.bfloat16)
    for symmetric in (False, True):
        outs = _gpu_run(backend, q, k, neg, symmetric, "none")
        assert all(torch.isfinite(o.float()).all() for o in outs)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_repeat_runs_are_bitwise_equal(backend):
    """Backward has no atomics; the forward's column merge order may vary, so the
    one-sided loss is compared bit for bit and the symmetric one within rounding."""
    q, k, neg = _gpu_inputs(2048, 128, 64, torch.bfloat16)
    a = _gpu_run(backend, q, k, neg, False, "mean")
    b = _gpu_run(backend, q, k, neg, False, "mean")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    a = _gpu_run(backend, q, k, neg, True, "mean")
    b = _gpu_run(backend, q, k, neg, True, "mean")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_huge_batch_memory_is_flat(backend):
    """N = 65536, D = 256, bf16: the loss's extra memory stays O(N D)."""
    q, k, _ = _gpu_inputs(65536, 256, 0, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    msf.clip_loss(q, k, 100.0, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 65536 * 256, f"{extra / 2**20:.0f} MiB"  # eager: 65536^2 * 4 B = 16 GiB


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("backend", GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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
