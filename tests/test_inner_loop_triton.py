"""The GPU kernels of the fused ANIL meta-loss (Triton, kernels/inner_loop.py; on a GPU
also CUDA C++, csrc/cuda/inner_loop.cu) against the per-task autograd loop in float64:
loss and every gradient, second and first order.

Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest.py) on small
shapes (the CUDA kernel's CPU check is tests/test_cuda_emulated.py); the kernels
compute in float32, so the tolerance is float32's.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from metassl_fast import _ext, meta

from helpers import DEVICE, needs_triton

pytestmark = needs_triton

GPU_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and _ext.available("_C_cuda") else [])


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    return request.param


def _task(T, S, Q, D, C, lr_kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (T, S), generator=g)
    xq = torch.randn(T, Q, D, generator=g, dtype=torch.float64)
    yq = torch.randint(0, C, (T, Q), generator=g)
    W = 0.3 * torch.randn(C, D, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(C, generator=g, dtype=torch.float64)
    if lr_kind == "meta_sgd":
        lr = (0.2 + torch.rand(C, D, generator=g, dtype=torch.float64), 0.2 + torch.rand(C, generator=g,
                                                                                       dtype=torch.float64))
    elif lr_kind == "tensor":
        lr = torch.tensor(0.7, dtype=torch.float64)
    else:
        lr = 0.4
    return x, y, xq, yq, W, b, lr


def _run(backend, dtype, device, task, steps, first_order, reduction):
    x, y, xq, yq, W, b, lr = task
    leaves = [t.to(dtype).to(device).requires_grad_() for t in (x, xq, W, b)]
    lr_leaves = []
    if isinstance(lr, torch.Tensor):
        lr = lr.to(dtype).to(device).requires_grad_()
        lr_leaves = [lr]
    elif isinstance(lr, tuple):
        lr = tuple(t.to(dtype).to(device).requires_grad_() for t in lr)
        lr_leaves = list(lr)
    loss = meta.anil_loss(leaves[0], y.to(device), leaves[1], yq.to(device), leaves[2], leaves[3], lr=lr,
                          steps=steps, first_order=first_order, reduction=reduction, backend=backend)
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
    inputs = leaves + lr_leaves
    grads = torch.autograd.grad((loss * w).sum(), inputs, allow_unused=True)  # K = 0: support and lr unused
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, inputs)]
    return [t.detach().double().cpu() for t in [loss, *grads]]


CONFIGS = [  # (T, S, Q, D, C, K): the grid values, spread over the edges
    (1, 1, 1, 1, 2, 0), (1, 5, 7, 17, 5, 1), (3, 25, 7, 64, 5, 3), (3, 5, 1, 17, 20, 3), (1, 25, 7, 1, 20, 10),
    (3, 1, 7, 64, 2, 10), (3, 25, 1, 17, 2, 1), (1, 5, 7, 64, 20, 0),
]


@pytest.mark.parametrize("T,S,Q,D,C,K", CONFIGS)
@pytest.mark.parametrize("first_order", [False, True])
def test_against_autograd_loop(T, S, Q, D, C, K, first_order, backend):
    task = _task(T, S, Q, D, C, "tensor", seed=T + S + D + C + K)
    ours = _run(backend, torch.float32, DEVICE, task, K, first_order, "mean")
    ref = _run("torch", torch.float64, "cpu", task, K, first_order, "mean")
    for i, (a, r) in enumerate(zip(ours, ref)):
        err, bound = (a - r).abs().max().item(), 2e-5 + 2e-4 * r.abs().max().item()
        assert err <= bound, f"output {i}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("lr_kind,reduction", list(itertools.product(["float", "meta_sgd"], ["mean", "none"])))
def test_lr_forms_and_reductions(lr_kind, reduction, backend):
    task = _task(3, 5, 7, 17, 5, lr_kind, seed=11)
    ours = _run(backend, torch.float32, DEVICE, task, 3, False, reduction)
    ref = _run("torch", torch.float64, "cpu", task, 3, False, reduction)
    for i, (a, r) in enumerate(zip(ours, ref)):
        err, bound = (a - r).abs().max().item(), 2e-5 + 2e-4 * r.abs().max().item()
        assert err <= bound, f"output {i}: {err:.3e} > {bound:.3e}"


def test_opcheck_and_compile(backend):
    x, y, xq, yq, W, b, _ = _task(2, 5, 3, 17, 3, "float", seed=1)
    f32 = [t.float().to(DEVICE) for t in (x, xq, W, b)]
    lr_w, lr_b = torch.full((3, 17), 0.5, device=DEVICE), torch.full((3,), 0.5, device=DEVICE)
    for t in f32 + [lr_w]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.metassl_fast.anil_loss_fwd.default,
                          (f32[0], y.to(DEVICE), f32[1], yq.to(DEVICE), f32[2], f32[3], lr_w, lr_b, 2, False,
                           "mean", backend))
    torch.library.opcheck(torch.ops.metassl_fast.inner_loop_fwd.default,
                          (f32[0], y.to(DEVICE), f32[2], f32[3], lr_w, lr_b, 2, False, backend))
    torch._dynamo.reset()

    def step(x, xq, W, b):
        return meta.anil_loss(x, y.to(DEVICE), xq, yq.to(DEVICE), W, b, lr=0.5, steps=2, backend=backend)

    got = torch.compile(step, fullgraph=True)(*f32)
    torch.testing.assert_close(got, step(*f32))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_kind", ["tensor", "meta_sgd"])
@pytest.mark.parametrize("T,S,D,C,K", [(1, 1, 1, 2, 0), (3, 5, 17, 5, 3), (2, 25, 64, 20, 1)])
def test_adapt_linear_head(T, S, D, C, K, lr_kind, first_order, backend):
    """adapt_linear_head on Triton (adapt_fwd_kernel / adapt_bwd_kernel): W_t, b_t and the
    gradients of a non-uniform function of them, against the autograd loop."""
    x, y, _, _, W, b, lr = _task(T, S, 1, D, C, lr_kind, seed=T * S + D + K)

    def run(backend, dtype, device):
        leaves = [t.to(dtype).to(device).requires_grad_() for t in (x, W, b)]
        lrs = tuple(t.to(dtype).to(device).requires_grad_() for t in lr) if isinstance(lr, tuple) \
            else lr.to(dtype).to(device).requires_grad_()
        lr_leaves = list(lrs) if isinstance(lrs, tuple) else [lrs]
        W_t, b_t = meta.adapt_linear_head(leaves[0], y.to(device), leaves[1], leaves[2], lr=lrs, steps=K,
                                          first_order=first_order, backend=backend)
        g = torch.Generator().manual_seed(1)
        cw = torch.randn(W_t.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        cb = torch.randn(b_t.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        obj = (W_t * cw).sum() + (b_t * cb).sum()
        inputs = leaves + lr_leaves
        grads = torch.autograd.grad(obj, inputs, allow_unused=True)
        grads = [torch.zeros_like(v) if gr is None else gr for gr, v in zip(grads, inputs)]
        return [t.detach().double().cpu() for t in [W_t, b_t, *grads]]

    ours = run(backend, torch.float32, DEVICE)
    ref = run("torch", torch.float64, "cpu")
    for i, (a, r) in enumerate(zip(ours, ref)):
        err, bound = (a - r).abs().max().item(), 2e-5 + 2e-4 * r.abs().max().item()
        assert err <= bound, f"output {i}: {err:.3e} > {bound:.3e}"


def test_raw_op_checks_shapes_the_kernel_cannot():
    """The Triton kernel reads raw memory: a direct op call with a short bias, a narrow
    weight or labels out of range gets an error (found by review)."""
    x, y, xq, yq, W, b, _ = _task(2, 5, 3, 8, 4, "float", seed=0)
    X, Xq, Wf, bf = (t.float().to(DEVICE) for t in (x, xq, W, b))
    aw, ab = torch.full((4, 8), 0.5, device=DEVICE), torch.full((4,), 0.5, device=DEVICE)
    yd, yqd = y.to(DEVICE), yq.to(DEVICE)
    op = torch.ops.metassl_fast.anil_loss_fwd
    with pytest.raises(ValueError, match="bias"):
        op(X, yd, Xq, yqd, Wf, bf[:1], aw, ab, 2, False, "none", "triton")
    with pytest.raises(ValueError, match="weight"):
        op(X, yd, Xq, yqd, Wf[:, :2], bf, aw, ab, 2, False, "none", "triton")
    with pytest.raises(ValueError, match="labels"):
        op(X, yd + 4, Xq, yqd, Wf, bf, aw, ab, 2, False, "none", "triton")


def test_sizes_beyond_the_kernel_refuse_clearly():
    """S or Q beyond 128 rows per task would not fit the backward kernel's on-chip blocks
    on an A100 (found by review): a clear error, not a launch failure."""
    x, y, xq, yq, W, b, _ = _task(1, 129, 3, 4, 2, "float", seed=0)
    with pytest.raises(ValueError, match="support"):
        meta.anil_loss(x.float().to(DEVICE), y.to(DEVICE), xq.float().to(DEVICE), yq.to(DEVICE), W.float().to(DEVICE),
                       b.float().to(DEVICE), lr=0.5, steps=1, backend="triton")
