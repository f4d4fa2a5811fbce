"""The inner-loop ops (inner_loop_fwd/_bwd, anil_loss_fwd/_bwd, the one-pass
anil_loss_train / anil_apply): meta.anil_loss, meta.adapt_linear_head and ANILHead on
every backend against the per-task autograd loop (create_graph=True, backend="torch"),
loss and every gradient, second and first order.

float64 runs on the C++ kernel; the Triton and CUDA C++ kernels compute in float32
(without a GPU, Triton runs under TRITON_INTERPRET=1 on CPU tensors; the CUDA kernel's
CPU check is tests/test_cuda_emulated.py), so their grids run in float32 with the
looser float32 tolerance the kernels were written to (2e-5 + 2e-4 max|ref|)."""
from __future__ import annotations

import pytest
import torch

from helpers import backends, check, device_of, needs_triton
from metassl_fast import _ext, meta

BACKENDS = backends("inner_loop", torch.float64)
F32 = backends("inner_loop", torch.float32)
NAMES = ["loss", "d_support", "d_query", "d_weight", "d_bias", "d_lr", "d_lr_bias"]


def _task(T, S, Q, D, C, dtype=torch.float64, seed=0, lr_kind="tensor"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, D, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, C, (T, S), generator=g)
    xq = torch.randn(T, Q, D, generator=g, dtype=dtype).requires_grad_()
    yq = torch.randint(0, C, (T, Q), generator=g)
    W = (0.3 * torch.randn(C, D, generator=g, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(C, generator=g, dtype=dtype)).requires_grad_()
    if lr_kind == "tensor":
        lr = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    elif lr_kind == "meta_sgd":
        lr = ((0.2 + torch.rand(C, D, generator=g, dtype=dtype)).requires_grad_(),
              (0.2 + torch.rand(C, generator=g, dtype=dtype)).requires_grad_())
    else:
        lr = 0.4
    return x, y, xq, yq, W, b, lr


def _anil(steps, first_order, reduction="mean"):
    def fn(backend, x, y, xq, yq, W, b, lr):
        return meta.anil_loss(x, y, xq, yq, W, b, lr=lr, steps=steps, first_order=first_order, reduction=reduction,
                              backend=backend)
    return fn


F64_TOL = (1e-10, 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,S,Q", [(1, 1, 1), (3, 5, 7), (3, 25, 7), (1, 25, 1)])
@pytest.mark.parametrize("D", [1, 17, 64])
@pytest.mark.parametrize("C", [2, 5, 20])
@pytest.mark.parametrize("K", [0, 1, 3, 10])
@pytest.mark.parametrize("lr_kind", ["tensor", "float"])
def test_float64_grid(backend, T, S, Q, D, C, K, lr_kind):
    """lr "tensor" (a learned step size) runs the weight-space kernel; "float" runs the
    support-space one (csrc/cpu/inner_loop.cpp gram_task): in one training pass for the
    mean, through the recomputing forward/backward ops per task ("none")."""
    args = _task(T, S, Q, D, C, seed=T * 1000 + S * 100 + D + C + K, lr_kind=lr_kind)
    for first_order in (False, True):
        for reduction in ("mean", "none") if lr_kind == "float" else ("mean",):
            what = f"T={T} S={S} Q={Q} D={D} C={C} K={K} first_order={first_order} {reduction}"
            check(_anil(K, first_order, reduction), list(args), backend=backend, what=what, names=NAMES, tol=F64_TOL)


def _one_pass_taken(loss) -> bool:
    return "AnilTrainEager" in type(loss.grad_fn).__name__


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
@pytest.mark.parametrize("lr_kind", ["float", "tensor_frozen", "rows", "meta_sgd_frozen"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernel_paths(lr_kind, first_order, reduction):
    """Every route through the CPU kernel against the autograd loop: a frozen scalar step
    size (the one-pass training op for the mean, the support-space kernel either way),
    per-class step sizes (Meta-SGD with each row constant: support space), frozen
    Meta-SGD step sizes that vary along D (weight space without step-size gradients)."""
    args = list(_task(3, 7, 5, 11, 4, seed=3))
    g = torch.Generator().manual_seed(5)
    if lr_kind == "float":
        args[6] = 0.4
    elif lr_kind == "tensor_frozen":
        args[6] = torch.tensor(0.6, dtype=torch.float64)
    elif lr_kind == "rows":
        args[6] = ((0.2 + torch.rand(4, 1, generator=g, dtype=torch.float64)).expand(4, 11).contiguous(),
                   0.2 + torch.rand(4, generator=g, dtype=torch.float64))
    elif lr_kind == "meta_sgd_frozen":
        args[6] = (0.2 + torch.rand(4, 11, generator=g, dtype=torch.float64),
                   0.2 + torch.rand(4, generator=g, dtype=torch.float64))
    x, y, xq, yq, W, b, lr = args
    loss = meta.anil_loss(x, y, xq, yq, W, b, lr=lr, steps=4, first_order=first_order, reduction=reduction,
                          backend="cpu")
    assert _one_pass_taken(loss) == (reduction == "mean" and lr_kind in ("float", "tensor_frozen"))
    check(_anil(4, first_order, reduction), args, backend="cpu", what=f"{lr_kind} {first_order} {reduction}",
          names=NAMES, tol=F64_TOL)


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_one_pass_only_when_training():
    """No gradient wanted (torch.no_grad, or nothing requires grad): the plain forward op,
    not the training pass, and the same loss."""
    x, y, xq, yq, W, b, _ = _task(2, 5, 4, 6, 3)
    with torch.no_grad():
        a = meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=3, backend="cpu")
    assert a.grad_fn is None
    trained = meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=3, backend="cpu")
    assert _one_pass_taken(trained)
    torch.testing.assert_close(a, trained.detach(), rtol=1e-12, atol=1e-14)
    # an upstream gradient other than 1 scales every gradient of the one-pass op
    g1 = torch.autograd.grad(trained * 2.5, (x, xq, W, b))
    g2 = torch.autograd.grad(meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=3, backend="torch") * 2.5,
                             (x, xq, W, b))
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "tensor", "meta_sgd"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lr_forms_and_reductions(backend, lr_kind, first_order, reduction):
    args = _task(4, 6, 5, 9, 3, lr_kind=lr_kind)
    check(_anil(4, first_order, reduction), list(args), backend=backend, what=f"{lr_kind} {first_order} {reduction}",
          names=NAMES, tol=F64_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x, y, xq, yq, W, b, _ = _task(2, 4, 3, 5, 3)
    lr_w = (0.3 + torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    lr_b = (0.3 + torch.rand(3, dtype=torch.float64)).requires_grad_()

    def f(x, xq, W, b, lr_w, lr_b):
        return meta.anil_loss(x, y, xq, yq, W, b, lr=(lr_w, lr_b), steps=3, backend=backend)

    assert torch.autograd.gradcheck(f, (x, xq, W, b, lr_w, lr_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapt_linear_head_matches_reference(backend):
    x, y, _, _, W, b, lr = _task(3, 8, 1, 6, 4)
    W_t, b_t = meta.adapt_linear_head(x, y, W, b, lr=lr, steps=5, backend=backend)
    W_r, b_r = meta.adapt_linear_head(x, y, W, b, lr=lr, steps=5, backend="torch")
    assert W_t.shape == (3, 4, 6) and b_t.shape == (3, 4)
    torch.testing.assert_close(W_t, W_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_t, b_r, rtol=1e-10, atol=1e-12)
    # differentiable on its own, with any upstream gradient
    gW, gb = torch.randn_like(W_t), torch.randn_like(b_t)
    ours = torch.autograd.grad((W_t * gW).sum() + (b_t * gb).sum(), (x, W, b, lr))
    ref = torch.autograd.grad((W_r * gW).sum() + (b_r * gb).sum(), (x, W, b, lr))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", F32)
def test_float32(backend):
    args = _task(5, 25, 15, 64, 5, dtype=torch.float32)
    check(_anil(5, False), list(args), backend=backend, names=NAMES, tol=(1e-6, 1e-4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_lr(backend):
    """No grad on the head: support and query still get their (second-order) gradient."""
    x, y, xq, yq, W, b, _ = _task(2, 5, 4, 7, 3)
    W, b = W.detach(), b.detach()
    ours = torch.autograd.grad(meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=3, backend=backend), (x, xq))
    ref = torch.autograd.grad(meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=3, backend="torch"), (x, xq))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anil_head_module(backend):
    torch.manual_seed(0)
    head = meta.ANILHead(in_features=12, n_way=4, lr=0.5, steps=3, learn_lr=True, per_param_lr=True,
                         backend=backend).double()
    x, y, xq, yq, *_ = _task(3, 8, 6, 12, 4)
    loss, acc = head(x, y, xq, yq)
    loss.backward()
    assert 0.0 <= acc.item() <= 1.0
    assert head.lr_weight.grad is not None and head.linear.weight.grad is not None
    ref = meta.anil_loss(x, y, xq, yq, head.linear.weight, head.linear.bias,
                         lr=(head.lr_weight, head.lr_bias), steps=3, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_proto_loss_matches_explicit_distances():
    x, y, xq, yq, *_ = _task(2, 10, 6, 5, 3)
    y = torch.tensor([[0, 1, 2] * 3 + [0]] * 2)
    loss = meta.proto_loss(x, y, xq, yq)
    protos = torch.stack([torch.stack([x[t][y[t] == c].mean(0) for c in range(3)]) for t in range(2)])
    logits = -((xq.unsqueeze(2) - protos.unsqueeze(1)) ** 2).sum(-1)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), yq.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(loss, (x, xq))
    g_ref = torch.autograd.grad(ref, (x, xq))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- torch.library

@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_one_pass_first_order_gradient_under_create_graph():
    """create_graph=True on the one-pass path: the gradient itself is right (as on the
    recomputing path); only differentiating it again raises."""
    x, y, xq, yq, W, b, _ = _task(2, 5, 4, 6, 3)
    loss = meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=2, backend="cpu")
    assert _one_pass_taken(loss)
    (g_graph,) = torch.autograd.grad(loss, W, create_graph=True)
    (g_plain,) = torch.autograd.grad(meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=2, backend="cpu"), W)
    torch.testing.assert_close(g_graph.detach(), g_plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="double backward"):
        g_graph.sum().backward()


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_opcheck_one_pass_training_ops():
    x, y, xq, yq, W, b, _ = _task(2, 4, 3, 5, 3, dtype=torch.float32)
    lr_w, lr_b = torch.full((3, 5), 0.5), torch.full((3,), 0.4)
    args = (x, y, xq, yq, W, b, lr_w, lr_b, 3, False)
    torch.library.opcheck(torch.ops.metassl_fast.anil_loss_train.default, args)
    out = torch.ops.metassl_fast.anil_loss_train(*args)
    torch.library.opcheck(torch.ops.metassl_fast.anil_apply.default,
                          (torch.tensor(1.5), x.detach(), xq.detach(), W.detach(), *out[3:7]))


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_one_pass_op_refuses_step_sizes_that_vary_along_d():
    """The support-space kernel needs one step size per class: a direct call of the
    training op with Meta-SGD step sizes gets an error, not a wrong gradient."""
    x, y, xq, yq, W, b, _ = _task(2, 4, 3, 5, 3)
    lr_w, lr_b = torch.rand(3, 5, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64)
    with pytest.raises(ValueError, match="step size"):
        torch.ops.metassl_fast.anil_loss_train(x.detach(), y, xq.detach(), yq, W.detach(), b.detach(), lr_w, lr_b,
                                               2, False)


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_torch_compile_fullgraph_one_pass(lr_kind):
    torch._dynamo.reset()
    x, y, xq, yq, W, b, lr = _task(3, 5, 4, 8, 3, dtype=torch.float32, lr_kind=lr_kind)
    lr = lr.detach() if isinstance(lr, torch.Tensor) else lr

    def f(x, xq, W, b):
        return meta.anil_loss(x, y, xq, yq, W, b, lr=lr, steps=3, backend="cpu")

    got = torch.compile(f, fullgraph=True)(x, xq, W, b)
    want = f(x, xq, W, b)
    assert _one_pass_taken(want)
    torch.testing.assert_close(got, want)
    for a, r in zip(torch.autograd.grad(got * 1.5, (x, xq, W, b)), torch.autograd.grad(want * 1.5, (x, xq, W, b))):
        torch.testing.assert_close(a, r)


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, y, xq, yq, W, b, lr = _task(3, 5, 4, 8, 3, dtype=torch.float32)

    def f(x, xq, W, b, lr):
        return meta.anil_loss(x, y, xq, yq, W, b, lr=lr, steps=3, backend="cpu")

    got = torch.compile(f, fullgraph=True)(x, xq, W, b, lr)
    want = f(x, xq, W, b, lr)
    torch.testing.assert_close(got, want)
    for a, r in zip(torch.autograd.grad(got, (x, xq, W, b, lr)), torch.autograd.grad(want, (x, xq, W, b, lr))):
        torch.testing.assert_close(a, r)


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_double_backward_is_a_clear_error(reduction):
    x, y, xq, yq, W, b, lr = _task(1, 3, 2, 4, 2)
    for step_size in (lr, 0.5):  # the recomputing ops, and (mean, fixed lr) the one-pass op
        loss = meta.anil_loss(x, y, xq, yq, W, b, lr=step_size, steps=2, reduction=reduction, backend="cpu")
        with pytest.raises(RuntimeError, match="double backward"):
            (gW,) = torch.autograd.grad(loss.sum(), W, create_graph=True)
            gW.sum().backward()
    W_t, _ = meta.adapt_linear_head(x, y, W, b, lr=lr, steps=2, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        (gW,) = torch.autograd.grad(W_t.sum(), W, create_graph=True)
        gW.sum().backward()


# --------------------------------------------------------------------------- bad input

def _good():
    x, y, xq, yq, W, b, _ = _task(2, 4, 3, 5, 3)
    return dict(support=x, support_labels=y, query=xq, query_labels=yq, weight=W, bias=b)


@pytest.mark.parametrize("change,exc,name", [
    (dict(support_labels=torch.tensor([[0, 1, 2, 3]] * 2)), ValueError, "support_labels"),
    (dict(support_labels=torch.tensor([[0, 1, -1, 2]] * 2)), ValueError, "support_labels"),
    (dict(query_labels=torch.full((2, 3), 7)), ValueError, "query_labels"),
    (dict(support_labels=torch.zeros(2, 4)), TypeError, "support_labels"),
    (dict(support_labels=torch.zeros(2, 5, dtype=torch.long)), ValueError, "support_labels"),
    (dict(support=torch.randn(4, 5, dtype=torch.float64)), ValueError, "support"),
    (dict(query=torch.randn(3, 3, 5, dtype=torch.float64)), ValueError, "query"),
    (dict(query=torch.randn(2, 3, 6, dtype=torch.float64)), ValueError, "query"),
    (dict(weight=torch.randn(3, 6, dtype=torch.float64)), ValueError, "weight"),
    (dict(bias=torch.randn(4, dtype=torch.float64)), ValueError, "bias"),
    (dict(weight=torch.randn(3, 5)), TypeError, "weight"),
    (dict(support=torch.zeros(2, 4, 5, dtype=torch.long)), TypeError, "support"),
    (dict(lr=torch.ones(2, dtype=torch.float64)), ValueError, "lr"),
    (dict(lr=(torch.ones(3, 4, dtype=torch.float64), torch.ones(3, dtype=torch.float64))), ValueError, "lr_weight"),
    (dict(lr=(torch.ones(3, 5, dtype=torch.float64), torch.ones(2, dtype=torch.float64))), ValueError, "lr_bias"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(steps=2.0), TypeError, "steps"),
    (dict(reduction="sum"), ValueError, "reduction"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(change, exc, name):
    kwargs = {**_good(), **change}
    with pytest.raises(exc, match=name):
        meta.anil_loss(**kwargs)


def test_cpp_refuses_out_of_range_labels():
    """The compiled module checks labels itself: it never indexes the head out of bounds."""
    C_ext = _ext.require("_C") if _ext.available("_C") else pytest.skip("_C not built")
    X = torch.zeros(1, 2, 3)
    y = torch.tensor([[0, 5]])
    W, b, aW, ab = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2)
    Wt, bt = torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="labels"):
        C_ext.inner_loop_forward(dtype=0, X=X.data_ptr(), X_numel=6, y=y.data_ptr(), y_numel=2,
                                 W0=W.data_ptr(), W0_numel=6, b0=b.data_ptr(), b0_numel=2, aW=aW.data_ptr(),
                                 aW_numel=6, ab=ab.data_ptr(), ab_numel=2, W_traj=Wt.data_ptr(),
                                 W_traj_numel=12, b_traj=bt.data_ptr(), b_traj_numel=4, T=1, S=2, D=3, C=2,
                                 K=1, nthreads=1)
    y_ok = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="W_traj"):
        C_ext.inner_loop_forward(dtype=0, X=X.data_ptr(), X_numel=6, y=y_ok.data_ptr(), y_numel=2,
                                 W0=W.data_ptr(), W0_numel=6, b0=b.data_ptr(), b0_numel=2, aW=aW.data_ptr(),
                                 aW_numel=6, ab=ab.data_ptr(), ab_numel=2, W_traj=Wt.data_ptr(),
                                 W_traj_numel=11, b_traj=bt.data_ptr(), b_traj_numel=4, T=1, S=2, D=3, C=2,
                                 K=1, nthreads=1)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_half_frozen_head(backend, frozen):
    """Only one of weight and bias learns: its gradient is exact, against an independent
    autograd loop written here."""
    x, y, xq, yq, W, b, _ = _task(2, 5, 4, 6, 4)
    W = W.detach().requires_grad_(frozen != "weight")
    b = b.detach().requires_grad_(frozen != "bias")
    learner = b if frozen == "weight" else W
    for impl in (backend, "torch"):
        (g,) = torch.autograd.grad(meta.anil_loss(x, y, xq, yq, W, b, lr=0.3, steps=2, backend=impl), learner)
        Wi, bi = W.detach().requires_grad_(), b.detach().requires_grad_()
        Wc, bc = (Wi, bi)
        losses = []
        for t in range(2):
            Wt, bt = Wc, bc
            for _ in range(2):
                gW, gb = torch.autograd.grad(torch.nn.functional.cross_entropy(x[t] @ Wt.T + bt, y[t]), (Wt, bt),
                                             create_graph=True)
                Wt, bt = Wt - 0.3 * gW, bt - 0.3 * gb
            losses.append(torch.nn.functional.cross_entropy(xq[t] @ Wt.T + bt, yq[t]))
        (g_ref,) = torch.autograd.grad(torch.stack(losses).mean(), bi if frozen == "weight" else Wi)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
def test_raw_ops_refuse_tensors_the_kernel_cannot_read():
    x, y, _, _, W, b, _ = _task(2, 4, 1, 5, 3)
    x, W, b = x.detach(), W.detach(), b.detach()
    lr_w, lr_b = torch.full((3, 5), 0.5, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    op = torch.ops.metassl_fast.inner_loop_fwd
    with pytest.raises(TypeError, match="labels"):
        op(x, y.int(), W, b, lr_w, lr_b, 2, False, "cpu")
    with pytest.raises(TypeError, match="weight"):
        op(x, y, W.float(), b, lr_w, lr_b, 2, False, "cpu")
    with pytest.raises(ValueError, match="support"):
        op(x.transpose(1, 2).contiguous().transpose(1, 2), y, W, b, lr_w, lr_b, 2, False, "cpu")


def test_labels_on_another_device():
    kwargs = _good()
    kwargs["support_labels"] = kwargs["support_labels"].to("meta")
    with pytest.raises(ValueError, match="support_labels"):
        meta.anil_loss(**kwargs)


def test_anil_loss_matches_higher():
    """The same meta-loss and meta-gradients as higher's innerloop_ctx (second order)."""
    higher = pytest.importorskip("higher", reason="higher is not installed: pip install --no-deps higher==0.2.1")
    import metassl_fast.meta as meta

    g = torch.Generator().manual_seed(0)
    T, S, Q, D, C, K = 3, 10, 7, 6, 4, 3
    x = torch.randn(T, S, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (T, S), generator=g)
    xq = torch.randn(T, Q, D, generator=g, dtype=torch.float64)
    yq = torch.randint(0, C, (T, Q), generator=g)
    head = torch.nn.Linear(D, C).double()
    losses = []
    for t in range(T):
        opt = torch.optim.SGD(head.parameters(), lr=0.4)
        with higher.innerloop_ctx(head, opt, copy_initial_weights=False) as (fhead, diffopt):
            for _ in range(K):
                diffopt.step(torch.nn.functional.cross_entropy(fhead(x[t]), y[t]))
            losses.append(torch.nn.functional.cross_entropy(fhead(xq[t]), yq[t]))
    want = torch.stack(losses).mean()
    gw_want, gb_want = torch.autograd.grad(want, [head.weight, head.bias])
    W, b = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()
    got = meta.anil_loss(x, y, xq, yq, W, b, lr=0.4, steps=K, backend="cpu")
    gw, gb = torch.autograd.grad(got, [W, b])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gb, gb_want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- float32 grids (every backend)

F32_TOL = (2e-5, 2e-4)  # the GPU kernels' float32 tolerance (their sums run in another order)


def _task32(T, S, Q, D, C, lr_kind, seed):
    """float64 values (as the GPU grids drew them), rounded to float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (T, S), generator=g)
    xq = torch.randn(T, Q, D, generator=g, dtype=torch.float64)
    yq = torch.randint(0, C, (T, Q), generator=g)
    W = 0.3 * torch.randn(C, D, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(C, generator=g, dtype=torch.float64)
    if lr_kind == "meta_sgd":
        lr = (0.2 + torch.rand(C, D, generator=g, dtype=torch.float64),
              0.2 + torch.rand(C, generator=g, dtype=torch.float64))
        lr = tuple(t.float().requires_grad_() for t in lr)
    elif lr_kind == "tensor":
        lr = torch.tensor(0.7).requires_grad_()
    else:
        lr = 0.4
    x, xq, W, b = (t.float().requires_grad_() for t in (x, xq, W, b))
    return [x, y, xq, yq, W, b, lr]


CONFIGS = [  # (T, S, Q, D, C, K): the grid values, spread over the edges
    (1, 1, 1, 1, 2, 0), (1, 5, 7, 17, 5, 1), (3, 25, 7, 64, 5, 3), (3, 5, 1, 17, 20, 3), (1, 25, 7, 1, 20, 10),
    (3, 1, 7, 64, 2, 10), (3, 25, 1, 17, 2, 1), (1, 5, 7, 64, 20, 0),
]


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("T,S,Q,D,C,K", CONFIGS)
@pytest.mark.parametrize("first_order", [False, True])
def test_float32_against_autograd_loop(backend, T, S, Q, D, C, K, first_order):
    args = _task32(T, S, Q, D, C, "tensor", seed=T + S + D + C + K)
    check(_anil(K, first_order), args, backend=backend, names=NAMES, tol=F32_TOL,
          what=f"T={T} S={S} Q={Q} D={D} C={C} K={K} first_order={first_order}")


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("lr_kind,reduction", [("float", "mean"), ("float", "none"), ("meta_sgd", "mean"),
                                                ("meta_sgd", "none")])
def test_float32_lr_forms_and_reductions(backend, lr_kind, reduction):
    args = _task32(3, 5, 7, 17, 5, lr_kind, seed=11)
    check(_anil(3, False, reduction), args, backend=backend, names=NAMES, tol=F32_TOL, what=f"{lr_kind} {reduction}")


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_kind", ["tensor", "meta_sgd"])
@pytest.mark.parametrize("T,S,D,C,K", [(1, 1, 1, 2, 0), (3, 5, 17, 5, 3), (2, 25, 64, 20, 1)])
def test_float32_adapt_linear_head(backend, T, S, D, C, K, lr_kind, first_order):
    """adapt_linear_head (on Triton adapt_fwd_kernel / adapt_bwd_kernel): W_t, b_t and the
    gradients of a non-uniform function of them, against the autograd loop."""
    x, y, _, _, W, b, lr = _task32(T, S, 1, D, C, lr_kind, seed=T * S + D + K)

    def fn(backend, x, y, W, b, lr):
        return meta.adapt_linear_head(x, y, W, b, lr=lr, steps=K, first_order=first_order, backend=backend)

    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(T, C, D, generator=g, dtype=torch.float64),
                  torch.randn(T, C, generator=g, dtype=torch.float64)]
    check(fn, [x, y, W, b, lr], backend=backend, tol=F32_TOL, cotangents=cotangents,
          names=["W_t", "b_t", "d_support", "d_weight", "d_bias", "d_lr", "d_lr_bias"])


# --------------------------------------------------------------------------- raw ops: opcheck, torch.compile


def _op_inputs(backend, T=2, S=5, Q=3, D=17, C=3):
    x, y, xq, yq, W, b, _ = _task32(T, S, Q, D, C, "float", seed=1)
    dev = device_of(backend)
    x, xq, W, b = (t.detach().to(dev).requires_grad_() for t in (x, xq, W, b))
    lr_w = torch.full((C, D), 0.5, device=dev, requires_grad=True)
    lr_b = torch.full((C,), 0.5, device=dev)
    return x, y.to(dev), xq, yq.to(dev), W, b, lr_w, lr_b


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("first_order", [False, True])
def test_opcheck_inner_loop(backend, first_order):
    x, y, _, _, W, b, lr_w, lr_b = _op_inputs(backend)
    torch.library.opcheck(torch.ops.metassl_fast.inner_loop_fwd.default,
                          (x, y, W, b, lr_w, lr_b, 2, first_order, backend))
    W_K, b_K, W_traj, b_traj = torch.ops.metassl_fast.inner_loop_fwd(x, y, W, b, lr_w, lr_b, 2, first_order,
                                                                      backend)
    g = torch.Generator().manual_seed(2)
    dW = torch.randn(W_K.shape, generator=g).to(W_K.device)
    db = torch.randn(b_K.shape, generator=g).to(b_K.device)
    torch.library.opcheck(torch.ops.metassl_fast.inner_loop_bwd.default,
                          (dW, db, x.detach(), y, lr_w.detach(), lr_b, W_traj.detach(), b_traj.detach(), first_order,
                           backend))


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_anil_loss(backend, reduction):
    args = _op_inputs(backend) + (2, False, reduction, backend)
    torch.library.opcheck(torch.ops.metassl_fast.anil_loss_fwd.default, args)
    grad = torch.ones((), device=args[0].device) if reduction == "mean" else torch.rand(2).to(args[0].device)
    torch.library.opcheck(torch.ops.metassl_fast.anil_loss_bwd.default,
                          (grad,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8])
                          + (2, False, reduction, backend))


@pytest.mark.parametrize("backend", F32)
def test_torch_compile_fullgraph_every_backend(backend):
    torch._dynamo.reset()
    x, y, xq, yq, W, b, _, _ = _op_inputs(backend)

    def step(x, xq, W, b):
        return meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=2, backend=backend)

    got = torch.compile(step, fullgraph=True)(x, xq, W, b)
    torch.testing.assert_close(got, step(x, xq, W, b))


@pytest.mark.parametrize("backend", F32)
def test_torch_compile_fullgraph_adapt_linear_head(backend):
    torch._dynamo.reset()
    x, y, _, _, W, b, _, _ = _op_inputs(backend)
    lr = torch.tensor(0.5, device=x.device, requires_grad=True)

    def step(x, W, b, lr):
        W_t, b_t = meta.adapt_linear_head(x, y, W, b, lr=lr, steps=2, backend=backend)
        return (W_t * W_t).sum() + b_t.sum()

    got = torch.compile(step, fullgraph=True)(x, W, b, lr)
    want = step(x, W, b, lr)
    torch.testing.assert_close(got, want)
    for a, r in zip(torch.autograd.grad(got, (x, W, b, lr)), torch.autograd.grad(want, (x, W, b, lr))):
        torch.testing.assert_close(a, r)


@needs_triton
def test_raw_op_checks_shapes_the_kernel_cannot():
    """The Triton kernel reads raw memory: a direct op call with a short bias, a narrow
    weight or labels out of range gets an error (found by review)."""
    X, yd, Xq, yqd, Wf, bf, _, _ = (t.detach() for t in _op_inputs("triton", T=2, S=5, Q=3, D=8, C=4))
    aw, ab = torch.full((4, 8), 0.5, device=X.device), torch.full((4,), 0.5, device=X.device)
    op = torch.ops.metassl_fast.anil_loss_fwd
    with pytest.raises(ValueError, match="bias"):
        op(X, yd, Xq, yqd, Wf, bf[:1], aw, ab, 2, False, "none", "triton")
    with pytest.raises(ValueError, match="weight"):
        op(X, yd, Xq, yqd, Wf[:, :2], bf, aw, ab, 2, False, "none", "triton")
    with pytest.raises(ValueError, match="labels"):
        op(X, yd + 4, Xq, yqd, Wf, bf, aw, ab, 2, False, "none", "triton")


@needs_triton
def test_sizes_beyond_the_kernel_refuse_clearly():
    """S or Q beyond 128 rows per task would not fit the backward kernel's on-chip blocks
    on an A100 (found by review): a clear error, not a launch failure."""
    x, y, xq, yq, W, b, _ = (t.detach() if isinstance(t, torch.Tensor) else t
                             for t in _task32(1, 129, 3, 4, 2, "float", seed=0))
    dev = device_of("triton")
    with pytest.raises(ValueError, match="support"):
        meta.anil_loss(x.to(dev), y.to(dev), xq.to(dev), yq.to(dev), W.to(dev), b.to(dev), lr=0.5, steps=1,
                       backend="triton")


@pytest.mark.parametrize("backend", F32)
@pytest.mark.parametrize("per_param_lr", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_anil_head_runs_the_fused_op_and_counts_correct_queries(backend, per_param_lr, grad):
    """ANILHead's loss and accuracy come from the fused op (the one-pass training op on the
    CPU for a frozen scalar step size, the fused anil_loss op otherwise): the accuracy is
    the per-task count of queries whose first largest logit under the adapted head is
    their label, against the autograd loop's logits; the loss is anil_loss's."""
    from metassl_fast.ops.inner_loop import query_ce
    from metassl_fast.reference.inner_loop import adapt_reference

    g = torch.Generator().manual_seed(3)
    T, S, Q, D, C = 5, 10, 9, 12, 4
    means = 2.0 * torch.randn(T, C, D, generator=g)  # classes apart, so that accuracy is neither 0 nor 1
    y, yq = torch.randint(0, C, (T, S), generator=g), torch.randint(0, C, (T, Q), generator=g)
    pick = lambda lab: torch.stack([means[t, lab[t]] for t in range(T)])  # noqa: E731
    dev = device_of(backend)
    x = (pick(y) + 1.5 * torch.randn(T, S, D, generator=g)).to(dev)
    xq = (pick(yq) + 1.5 * torch.randn(T, Q, D, generator=g)).to(dev)
    y, yq = y.to(dev), yq.to(dev)
    torch.manual_seed(0)
    head = meta.ANILHead(in_features=D, n_way=C, lr=0.3, steps=4, per_param_lr=per_param_lr,
                         backend=backend).to(dev)
    with torch.set_grad_enabled(grad):
        loss, acc = head(x, y, xq, yq)
    if grad and backend == "cpu" and not per_param_lr:
        assert "AnilTrainEager" in type(loss.grad_fn).__name__  # the one-pass op, not adapt + torch CE
    lr = (head.lr_weight, head.lr_bias) if per_param_lr else head.lr
    lr_w, lr_b = (lr[0], lr[1]) if per_param_lr else (lr.expand(C, D), lr.expand(C))
    with torch.no_grad():
        W_t, b_t = adapt_reference(x.double(), y, head.linear.weight.double(), head.linear.bias.double(),
                                   lr_w.double(), lr_b.double(), 4, False)
        _, logits = query_ce(xq.double(), yq, W_t, b_t)
    hits = int((logits.argmax(-1) == yq).sum())
    assert 0 < hits < T * Q
    assert acc.item() * T * Q == pytest.approx(hits, abs=1e-4)  # accuracy = hits / (T Q), in float32
    ref = meta.anil_loss(x.double(), y, xq.double(), yq, head.linear.weight.double(), head.linear.bias.double(),
                         lr=(lr_w.double(), lr_b.double()), steps=4, backend="torch")
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-4, atol=2e-5)
    if grad:
        loss.backward()
        assert head.linear.weight.grad is not None and torch.isfinite(head.linear.weight.grad).all()


def test_anil_head_torch_backend_under_no_grad():
    """The reference needs autograd for its inner gradients: under torch.no_grad it still
    runs (it raised before) and gives the same loss and accuracy as with grad."""
    x, y, xq, yq, *_ = _task(2, 6, 5, 7, 3)
    torch.manual_seed(0)
    head = meta.ANILHead(in_features=7, n_way=3, steps=2, backend="torch").double()
    loss, acc = head(x, y, xq, yq)
    with torch.no_grad():
        loss_ng, acc_ng = head(x, y, xq, yq)
    assert loss_ng.grad_fn is None
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=0, atol=0)
    assert acc_ng.item() == acc.item()


@needs_triton
def test_anil_head_with_more_queries_than_the_fused_triton_kernel_holds():
    """ANILHead on triton with Q > 128 query rows (more than the fused loss kernel keeps on
    chip): adapted by the Triton adapt kernel, the queries scored in torch, same numbers."""
    x, y, xq, yq, *_ = _task(2, 5, 130, 8, 3, dtype=torch.float32)
    dev = device_of("triton")
    x, y, xq, yq = x.detach().to(dev), y.to(dev), xq.detach().to(dev), yq.to(dev)
    torch.manual_seed(0)
    head = meta.ANILHead(in_features=8, n_way=3, steps=2, backend="triton").to(dev)
    loss, acc = head(x, y, xq, yq)
    loss.backward()
    ref_head = meta.ANILHead(in_features=8, n_way=3, steps=2, backend="torch").to(dev)
    ref_head.load_state_dict(head.state_dict())
    ref_loss, ref_acc = ref_head(x, y, xq, yq)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-4, atol=2e-5)
    assert acc.item() == pytest.approx(ref_acc.item(), abs=1e-6)
