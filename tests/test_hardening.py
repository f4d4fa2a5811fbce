"""No input crashes the process or returns garbage (issue 12's findings, one regression
test each): size arithmetic that would wrap, C++ exceptions inside parallel regions,
overflow to inf - inf, bounds checks of the raw module, raw ops with tensors on two
devices, weak or missing errors, and torch.func transforms over the fused ops."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metassl_fast as m
from metassl_fast import _ext, meta
from metassl_fast.functional import labeled_contrastive

needs_c = pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")


def _task(T=2, S=5, Q=4, D=8, C=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, S, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (T, S), generator=g)
    Xq = torch.randn(T, Q, D, generator=g, dtype=dtype)
    yq = torch.randint(0, C, (T, Q), generator=g)
    W = torch.randn(C, D, generator=g, dtype=dtype) * 0.1
    b = torch.zeros(C, dtype=dtype)
    return X, y, Xq, yq, W, b


# --------------------------------------------------------------------------- 1, 2: steps, scratch, exceptions

@pytest.mark.parametrize("steps", [2**31, 2**62, 10**30])
def test_steps_past_the_bound_are_a_value_error_naming_steps(steps):
    X, y, Xq, yq, W, b = _task()
    with pytest.raises(ValueError, match="steps"):
        meta.anil_loss(X, y, Xq, yq, W, b, steps=steps)
    with pytest.raises(ValueError, match="steps"):
        meta.adapt_linear_head(X, y, W, b, steps=steps)
    with pytest.raises(ValueError, match="steps"):
        meta.ANILHead(8, 3, steps=steps)


@needs_c
@pytest.mark.parametrize("op", ["anil_loss_fwd", "anil_loss_bwd", "anil_loss_train", "inner_loop_fwd"])
def test_raw_op_steps_past_the_bound_are_refused_before_any_allocation(op):
    X, y, Xq, yq, W, b = _task()
    lr_w, lr_b = torch.full((3, 8), 0.5), torch.full((3,), 0.5)
    head = (X, y, Xq, yq, W, b, lr_w, lr_b)
    ops = torch.ops.metassl_fast
    call = {"anil_loss_fwd": lambda k: ops.anil_loss_fwd(*head, k, False, "mean", "cpu"),
            "anil_loss_bwd": lambda k: ops.anil_loss_bwd(torch.tensor(1.0), *head, k, False, "mean", "cpu"),
            "anil_loss_train": lambda k: ops.anil_loss_train(*head, k, False),
            "inner_loop_fwd": lambda k: ops.inner_loop_fwd(X, y, W, b, lr_w, lr_b, k, False, "cpu")}[op]
    for k in (2**31, 2**62):  # the trajectory (T, k + 1, C, D) overflowed torch's stride arithmetic
        with pytest.raises(ValueError, match="steps"):
            call(k)


@needs_c
def test_raw_module_size_products_that_wrap_are_refused():
    """The bindings' own check, whatever Python passes: (K + 1) C D and K S C wrapped int64
    at K = 2**62 and a copy wrote to null (SIGSEGV)."""
    C_ = _ext.require("_C")
    X, y, _, _, W, b = _task()
    lr_w, lr_b = torch.full((3, 8), 0.5), torch.full((3,), 0.5)
    Wt, bt = torch.empty(2, 3, 3, 8), torch.empty(2, 3, 3)
    ptr = {n: (t.data_ptr(), t.numel()) for n, t in dict(X=X, y=y, W0=W, b0=b, aW=lr_w, ab=lr_b, W_traj=Wt,
                                                          b_traj=bt).items()}
    flat = {}
    for n, (p, k) in ptr.items():
        flat[n], flat[n + "_numel"] = p, k
    with pytest.raises(ValueError, match="overflow"):
        C_.inner_loop_forward(dtype=0, **flat, T=2, S=5, D=8, C=3, K=2**62, nthreads=1)
    with pytest.raises(ValueError, match="W_traj"):  # a K that fits int64 but not the buffer passed
        C_.inner_loop_forward(dtype=0, **flat, T=2, S=5, D=8, C=3, K=2**40, nthreads=1)


@needs_c
def test_raw_convex_module_checks_what_it_reads():
    """_C.convex_forward / convex_backward, called directly: a short buffer, a label out of
    [0, C), an unknown kind, a non-finite reg and sizes whose products wrap are ValueErrors."""
    C_ = _ext.require("_C")
    X, y, Xq, yq, _, _ = _task()
    T, S, D = X.shape
    Q, C = Xq.shape[1], 3
    f64 = torch.float64
    bufs = dict(X=X, y=y, Xq=Xq, yq=yq, A=torch.empty(T, S, C, dtype=f64), b=torch.empty(T, C, dtype=f64),
                W=torch.empty(T, C, D), fac=torch.empty(T, S, S, dtype=f64), logits=torch.empty(T, Q, C),
                loss=torch.empty(T), correct=torch.empty(T), residual=torch.empty(T, dtype=f64))

    def call(over=None, **kw):
        flat = {}
        for n, t in bufs.items():
            t = (over or {}).get(n, t)
            flat[n], flat[n + "_numel"] = t.data_ptr(), t.numel()
        args = dict(T=T, S=S, Q=Q, D=D, C=C, kind=1, reg=0.5, scale=1.0, label_smoothing=0.0, dual_reg=1.0, tol=1e-6,
                    max_iter=10, nthreads=1)
        args.update(kw)
        C_.convex_forward(dtype=0, **flat, **args)

    call()  # the valid call runs
    with pytest.raises(ValueError, match="W holds"):
        call({"W": torch.empty(T, C, D - 1)})
    with pytest.raises(ValueError, match="labels"):
        call({"y": torch.full((T, S), 3)})
    with pytest.raises(ValueError, match="kind"):
        call(kind=3)
    with pytest.raises(ValueError, match="reg"):
        call(reg=float("nan"))
    with pytest.raises(ValueError, match="overflow"):
        call(S=2**31, C=2**31)
    g = torch.ones(T)
    grads = dict(g=g, dX=torch.empty_like(X), dXq=torch.empty_like(Xq), dreg=torch.empty(T, dtype=f64),
                 dscale=torch.empty(T, dtype=f64))
    flat = {}
    for n, t in {**{k: v for k, v in bufs.items() if k not in ("loss", "correct", "residual")}, **grads}.items():
        flat[n], flat[n + "_numel"] = t.data_ptr(), t.numel()
    flat["dX_numel"] -= 1
    with pytest.raises(ValueError, match="dX holds"):
        C_.convex_backward(dtype=0, **flat, T=T, S=S, Q=Q, D=D, C=C, kind=1, reg=0.5, scale=1.0, label_smoothing=0.0,
                           dual_reg=1.0, nthreads=1)


@needs_c
@pytest.mark.skipif(os.environ.get("METASSL_SANITIZE") == "1",
                    reason="under ASan (scripts/sanitize.sh) a failed operator new is reported and aborts "
                           "instead of throwing std::bad_alloc, whatever allocator_may_return_null says")
def test_allocation_failure_inside_a_parallel_region_is_a_memory_error():
    """steps=2**31 - 1: each task's scratch (K S C floats) is ~12 TB; std::bad_alloc is thrown
    inside the OpenMP region by both threads' chunks and must surface as MemoryError,
    not std::terminate."""
    X, y, Xq, yq, W, b = _task(T=4, S=200, C=100)
    lr_w, lr_b = torch.full((100, 8), 0.5), torch.full((100,), 0.5)
    # K S C floats = 2**31 * 2e4 * 4 B = 172 TB per task: past the 2**47-byte user address
    # space, so the allocation fails whatever the host's overcommit setting
    with pytest.raises(MemoryError):
        torch.ops.metassl_fast.anil_loss_fwd(X, y, Xq, yq, W, b, lr_w, lr_b, 2**31 - 1, False, "mean", "cpu")
    # and the process (and the module) still work
    loss, _ = torch.ops.metassl_fast.anil_loss_fwd(X, y, Xq, yq, W, b, lr_w, lr_b, 2, False, "mean", "cpu")
    assert torch.isfinite(loss)
    loss, _ = torch.ops.metassl_fast.anil_loss_fwd(*_task(T=4)[:6], torch.full((3, 8), 0.5), torch.full((3,), 0.5),
                                                   2, False, "mean", "cpu")
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- 3: SigLIP at huge logit scales

@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_siglip_huge_scale_is_never_nan(dtype):
    # the positives' logits overflow float32 (16 * 1e38), the negatives' are 0: the loss is
    # finite, (N - 1) log 2 per row; summing the sweep and swapping the diagonal gave inf - inf
    x = torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=dtype)
    ours = m.siglip_loss(x, x, 1e38, 0.0, backend="cpu")
    ref = m.siglip_loss(x, x, 1e38, 0.0, backend="torch")
    assert not torch.isnan(ours)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, torch.tensor(math.log(2), dtype=dtype))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=dtype)
    ours, ref = (m.siglip_loss(x, x, 1e38, 0.0, backend=be) for be in ("cpu", "torch"))
    assert not torch.isnan(ours) and bool(ours == ref), (ours, ref)  # inf where float32's true value is


# --------------------------------------------------------------------------- 4: the raw module's own checks

@needs_c
def test_raw_module_bounds_checks_cannot_overflow():
    C_ = _ext.require("_C")
    S = torch.zeros(2, 4)
    p, n = S.data_ptr(), S.numel()
    with pytest.raises(ValueError, match="diagonal rows"):  # row0 + B wrapped past INT64_MAX
        C_.block_sigmoid(0, p, n, 2, 4, 4, 2**63 - 1, 1.0, 0.0, 1.0, True, 1)
    with pytest.raises(ValueError, match="overflow"):  # (B - 1) * ld + C wrapped
        C_.block_sigmoid(0, p, n, 2**40, 2**40, 2**40, 0, 1.0, 0.0, 1.0, True, 1)
    with pytest.raises(ValueError, match="positive pairs"):
        C_.block_rows(0, p, n, 2, 4, 4, 2**63 - 1, 4, p, 2, True, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 1)
    with pytest.raises(ValueError, match="overflow"):
        C_.block_col_stats(0, p, n, 2**62, 4, 2**62, p, p, 4, 1)


# --------------------------------------------------------------------------- 5: raw ops on two devices

class _Record(TorchDispatchMode):
    """The first call of every metassl_fast op under it: (op, args)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metassl_fast":
            self.calls.setdefault(func._opname, (func, args))
        return func(*args, **(kwargs or {}))


def _raw_calls():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(6, 4, generator=g, requires_grad=True) for _ in range(2))
    lab = torch.tensor([0, 1, 0, 1, 2, 2])
    X, y, Xq, yq, W, b = _task()
    W.requires_grad_()
    lr = torch.tensor(0.3, requires_grad=True)
    rec = _Record()
    with rec:
        m.info_nce(q, k, reduction="none").sum().backward()
        m.supcon_loss(q, lab, reduction="none").sum().backward()
        m.siglip_loss(q, k, 2.0, -1.0).backward()
        meta.adapt_linear_head(X, y, W, b, steps=2)[0].sum().backward()
        meta.anil_loss(X, y, Xq, yq, W, b, lr=lr, steps=2).backward()
    calls = dict(rec.calls)
    lr_w, lr_b = torch.full((3, 8), 0.5), torch.full((3,), 0.5)
    train = (X, y, Xq, yq, W.detach(), b, lr_w, lr_b, 2, False)
    out = torch.ops.metassl_fast.anil_loss_train(*train)
    ops = torch.ops.metassl_fast
    calls["anil_loss_train"] = (ops.anil_loss_train.default, train)
    calls["anil_apply"] = (ops.anil_apply.default, (torch.tensor(1.0), X, Xq, W.detach(), *out[3:7]))
    reg, sc = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    fwd = (X.detach(), y, Xq, yq, reg, sc, "svm", 3, 0.1, 1.0, 1e-6, 100, "cpu")
    out = ops.convex_fwd(*fwd)  # the public entries call it without the dispatcher: recorded by hand
    calls["convex_fwd"] = (ops.convex_fwd.default, fwd)
    calls["convex_bwd"] = (ops.convex_bwd.default, (torch.ones(2), *fwd[:6], *out[2:7], "svm", 3, 0.1, 1.0, "cpu"))
    calls["convex_fit"] = (ops.convex_fit.default, (X.detach(), y, reg, "logreg", 3, 1.0, 1e-6, 10, "cpu"))
    s = torch.tensor(2.0)
    calls["siglip_bwd"] = (ops.siglip_bwd.default, (torch.tensor(1.0), q.detach(), k.detach(), s, torch.tensor(-1.0),
                                                    0, True, True, True, True, "cpu"))
    return calls


_RAW = None


def _raw():
    global _RAW
    if _RAW is None:
        _RAW = _raw_calls()
    return _RAW


@needs_c
def test_every_registered_op_is_in_the_mixed_device_test():
    registered = {name for name in torch.ops.metassl_fast if not name.startswith("_")
                  and hasattr(getattr(torch.ops.metassl_fast, name), "default")}
    assert registered <= set(_raw()), sorted(registered - set(_raw()))


@needs_c
@pytest.mark.parametrize("op", ["contrastive_fwd", "contrastive_bwd", "labeled_fwd", "labeled_bwd", "siglip_fwd",
                                "siglip_bwd", "inner_loop_fwd", "inner_loop_bwd", "anil_loss_fwd", "anil_loss_bwd",
                                "anil_loss_train", "anil_apply", "convex_fwd", "convex_bwd", "convex_fit"])
def test_raw_op_with_one_tensor_on_the_meta_device_is_refused(op):
    func, args = _raw()[op]
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.numel() > 0]
    assert positions
    for i in positions:
        mixed = list(args)
        mixed[i] = args[i].to("meta")
        with pytest.raises(ValueError, match="one device"):
            func(*mixed)
    # all on meta: shapes only (the fake), no error
    func(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])


# --------------------------------------------------------------------------- 7: weak errors

@needs_c
def test_sparse_and_mkldnn_tensors_are_refused_by_name():
    x = torch.randn(4, 3)
    for bad in (x.to_sparse(), x.to_mkldnn()):
        with pytest.raises(TypeError, match="query must be a dense"):
            m.info_nce(bad, x)
        with pytest.raises(TypeError, match="key must be a dense"):
            m.info_nce(x, bad)
    with pytest.raises(TypeError, match="labels must be a dense"):
        m.supcon_loss(x, torch.tensor([0, 1, 0, 1]).to_sparse())
    X, y, Xq, yq, W, b = _task()
    with pytest.raises(TypeError, match="support must be a dense"):
        meta.anil_loss(X.to_sparse(), y, Xq, yq, W, b)
    with pytest.raises(TypeError, match="weight must be a dense"):
        meta.anil_loss(X, y, Xq, yq, W.to_sparse(), b)


@needs_c
def test_temperatures_that_overflow_are_value_errors_or_computed():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        m.info_nce(x, x, temperature=10**400)
    with pytest.raises(ValueError, match="temperature"):
        m.nt_xent(x, x, temperature=1e-310)  # > 0, but 1 / it is inf
    with pytest.raises(ValueError, match="logit_bias"):
        m.siglip_loss(x, x, 1.0, -(10**400))
    # a float16 temperature of 1e-5: 1 / t overflows float16, not the float32 the op uses
    t = torch.tensor(1e-5, dtype=torch.float16, requires_grad=True)
    got = m.info_nce(x, x, temperature=t)
    ref = m.info_nce(x, x, temperature=t.detach().float(), backend="torch")
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref)
    got.backward()
    assert t.grad is not None and t.grad.dtype == torch.float16


def test_anil_loss_with_none_names_support():
    X, y, Xq, yq, W, b = _task()
    with pytest.raises(TypeError, match="support"):
        meta.anil_loss(None, y, Xq, yq, W, b)


def test_proto_loss_negative_labels_blame_the_labels():
    X, y, Xq, yq, _, _ = _task()
    with pytest.raises(ValueError, match="support_labels"):
        meta.proto_loss(X, torch.full_like(y, -1), Xq, yq)
    with pytest.raises(ValueError, match="support_labels"):
        meta.proto_loss(X, y - 1, Xq, yq)


@needs_c
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_labels_are_taken(dtype):
    x = torch.randn(4, 3, dtype=torch.float64)
    lab = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(m.supcon_loss(x, lab.to(dtype)), m.supcon_loss(x, lab))
    X, y, Xq, yq, W, b = _task(dtype=torch.float64)
    torch.testing.assert_close(meta.anil_loss(X, y.to(dtype), Xq, yq.to(dtype), W, b),
                               meta.anil_loss(X, y, Xq, yq, W, b))


def test_uint64_labels_past_int64_are_out_of_range():
    X, y, Xq, yq, W, b = _task()
    big = torch.tensor([2**64 - 1], dtype=torch.uint64).expand(y.shape).clone()
    with pytest.raises(ValueError, match="support_labels"):
        meta.anil_loss(X, big, Xq, yq, W, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_features=0, n_way=3), "in_features"), (dict(in_features=8, n_way=0), "n_way"),
    (dict(in_features=8.0, n_way=3), "in_features"), (dict(in_features=8, n_way=3, lr=float("nan")), "lr"),
    (dict(in_features=8, n_way=3, lr=10**400), "lr"), (dict(in_features=8, n_way=3, lr="fast"), "lr"),
])
def test_anil_head_refuses_empty_or_bad_sizes(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        meta.ANILHead(**kwargs)


def test_anil_head_takes_a_tensor_step_size():
    head = meta.ANILHead(8, 3, lr=torch.tensor(0.25))
    assert float(head.lr) == 0.25


@needs_c
@pytest.mark.parametrize("bad", ["query_d", "flat_labels", "bias", "coef"])
def test_raw_cpu_inner_loop_ops_check_the_layout_they_read(bad):
    """In bounds is not enough: a query of another D or flattened labels were read in the
    wrong layout and gave a number."""
    X, y, Xq, yq, W, b = _task()
    lr_w, lr_b = torch.full((3, 8), 0.5), torch.full((3,), 0.5)
    ops = torch.ops.metassl_fast
    if bad == "coef":
        out = ops.anil_loss_train(X, y, Xq, yq, W, b, lr_w, lr_b, 2, False)
        coef = out[3].reshape(out[3].shape[0], -1)
        with pytest.raises(ValueError, match="coef"):
            ops.anil_apply(torch.tensor(1.0), X, Xq, W, coef, *out[4:7])
        return
    args = {"query_d": (X, y, torch.randn(2, 4, 11), yq, W, b), "flat_labels": (X, y.reshape(-1), Xq, yq, W, b),
            "bias": (X, y, Xq, yq, W, torch.zeros(5))}[bad]
    with pytest.raises(ValueError, match={"query_d": "query", "flat_labels": "labels", "bias": "bias"}[bad]):
        ops.anil_loss_fwd(*args, lr_w, lr_b, 2, False, "mean", "cpu")


def test_vmap_over_an_empty_batch_is_a_value_error():
    k = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="size 0"):
        torch.func.vmap(lambda t: m.info_nce(t, k))(torch.randn(0, 6, 5, dtype=torch.float64))


@needs_c
def test_self_offset_below_minus_one_is_refused():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="self_offset"):
        labeled_contrastive(x, torch.arange(4), x, torch.arange(4), self_offset=-5)


# --------------------------------------------------------------------------- 8: torch.func

_HEADS = {}


def _head(backend):
    """One ANILHead per backend, built outside the transforms (same initial weights)."""
    if backend not in _HEADS:
        torch.manual_seed(0)
        _HEADS[backend] = meta.ANILHead(5, 3, steps=2, backend=backend).double()
    return _HEADS[backend]


def _func_cases():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(6, 5, generator=g, dtype=torch.float64)
    lab = torch.tensor([0, 1, 0, 1, 2, 2])
    X, y, Xq, yq, W, b = _task(T=3, S=6, Q=4, D=5, dtype=torch.float64, seed=2)
    lr = torch.full((3, 5), 0.4, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64)
    return {
        "info_nce": lambda a, be: m.info_nce(a, k, backend=be),
        "info_nce_none": lambda a, be: m.info_nce(a, k, symmetric=True, reduction="none", backend=be).sum(),
        "info_nce_queue": lambda a, be: m.info_nce(a, k, negatives=k.flip(0), backend=be),
        "clip_loss": lambda a, be: m.clip_loss(a, k, 3.0, backend=be),
        "nt_xent": lambda a, be: m.nt_xent(a, k, backend=be),
        "supcon_loss": lambda a, be: m.supcon_loss(a, lab, backend=be),
        "supcon_none": lambda a, be: m.supcon_loss(a, lab, reduction="none", backend=be).sum(),
        "siglip_loss": lambda a, be: m.siglip_loss(a, k, 2.0, -1.0, backend=be),
        "anil_loss": lambda a, be: meta.anil_loss(X, y, Xq, yq, a[:3], b, steps=3, backend=be),
        "anil_loss_none": lambda a, be: meta.anil_loss(X, y, Xq, yq, a[:3], b, steps=3, reduction="none",
                                                       backend=be).sum(),
        "anil_meta_sgd": lambda a, be: meta.anil_loss(X, y, Xq, yq, a[:3], b, lr=lr, steps=2, backend=be),
        "adapt_linear_head": lambda a, be: meta.adapt_linear_head(X, y, a[:3], b, steps=3, backend=be)[0].sum(),
        # with respect to the features (backbone MAML, ANILHead): the one-pass training path
        # outside torch.func, the recomputing one under it
        "anil_wrt_support": lambda a, be: meta.anil_loss(a.reshape(3, 2, 5).repeat(1, 3, 1), y, Xq, yq, W, b, steps=3,
                                                         backend=be),
        "anil_wrt_query": lambda a, be: meta.anil_loss(X, y, a[:4].expand(3, 4, 5), yq, W, b, lr=torch.tensor(0.3),
                                                       steps=2, backend=be),
        "anil_head": lambda a, be: _head(be)(a.reshape(3, 2, 5).repeat(1, 3, 1), y, Xq, yq)[0],
    }


@needs_c
@pytest.mark.parametrize("name", list(_func_cases()))
def test_torch_func_grad_matches_the_reference(name):
    """torch.func.grad (what torch.func-based MAML runs) over every fused public op, against
    plain autograd through the float64 reference; jacrev (reverse mode) too."""
    f = _func_cases()[name]
    _head("cpu"), _head("torch")
    a = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.func.grad(lambda t: f(t, "cpu"))(a)
    ar = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(f(ar, "torch"), ar)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(lambda t: f(t, "cpu"))(a), want, rtol=1e-10, atol=1e-12)
    # per-sample gradients: vmap of grad over a batch of two inputs
    per = torch.func.vmap(torch.func.grad(lambda t: f(t, "cpu")))(torch.stack([a, 0.5 * a]))
    ar2 = (0.5 * a).clone().requires_grad_()
    torch.testing.assert_close(per[1], torch.autograd.grad(f(ar2, "torch"), ar2)[0], rtol=1e-10, atol=1e-12)


@needs_c
def test_torch_func_vjp_vmap_and_a_clear_error_for_forward_mode():
    a, k = (torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (4, 5))
    out, vjp = torch.func.vjp(lambda t: m.info_nce(t, k, reduction="none"), a)
    ct = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    ar = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(m.info_nce(ar, k, reduction="none", backend="torch"), ar, ct)
    torch.testing.assert_close(vjp(ct)[0], want)
    # vmap (one op call per element: exact), also of a gradient (per-sample gradients)
    batch = torch.stack([a, a.flip(0), 2 * a])
    torch.testing.assert_close(torch.func.vmap(lambda t: m.info_nce(t, k))(batch),
                               torch.stack([m.info_nce(t, k, backend="torch") for t in batch]))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: m.info_nce(t, k)))(batch)
    for t, g in zip(batch, per_sample):
        tr = t.clone().requires_grad_()
        torch.testing.assert_close(g, torch.autograd.grad(m.info_nce(tr, k, backend="torch"), tr)[0])
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.hessian(lambda t: m.info_nce(t, k))(a)
    X, y, Xq, yq, W, b = _task(dtype=torch.float64)
    tasks = torch.stack([X, 0.5 * X])
    torch.testing.assert_close(torch.func.vmap(lambda s: meta.anil_loss(s, y, Xq, yq, W, b))(tasks),
                               torch.stack([meta.anil_loss(s, y, Xq, yq, W, b, backend="torch") for s in tasks]))
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.jvp(lambda w: meta.anil_loss(X, y, Xq, yq, w, b), (W,), (torch.ones_like(W),))


@needs_c
def test_plain_forward_ad_is_refused_by_name():
    """Dual tensors of torch.autograd.forward_ad (no torch.func transform) reach the eager
    entries' own Functions: the library's forward-mode error, not torch's generic one."""
    import torch.autograd.forward_ad as fwAD

    X, y, Xq, yq, W, b = _task(dtype=torch.float64)
    k = torch.randn(6, 4, dtype=torch.float64)
    calls = {"info_nce": lambda d: m.info_nce(d, k),
             "anil_loss": lambda d: meta.anil_loss(X, y, Xq, yq, d, b.requires_grad_()),
             "svm_loss": lambda d: meta.svm_loss(d, y, Xq, yq, C=0.1)}
    primals = {"info_nce": torch.randn(6, 4, dtype=torch.float64), "anil_loss": W, "svm_loss": X}
    for name, call in calls.items():
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode"):
            call(fwAD.make_dual(primals[name], torch.ones_like(primals[name])))


@needs_c
def test_saved_tensors_hooks_that_change_the_layout_are_refused():
    """The eager entries' backwards read their saved tensors raw: an unpack hook that hands
    one back non-contiguous gets a clear error, never a read past a buffer."""
    X, y, Xq, yq, W, b = _task()
    strided = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 3 else t  # noqa: E731
    losses = {"anil_loss": lambda: meta.anil_loss(X.requires_grad_(), y, Xq, yq, W.requires_grad_(), b),
              "svm_loss": lambda: meta.svm_loss(X.requires_grad_(), y, Xq, yq, C=0.1),
              "ridge_loss": lambda: meta.ridge_loss(X.requires_grad_(), y, Xq, yq, lam=1.0)}
    for name, loss in losses.items():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, strided):
            out = loss()
        with pytest.raises(RuntimeError, match="saved for the backward"):
            out.backward()


@needs_c
def test_plain_autograd_is_unchanged_by_the_func_path():
    """Outside torch.func the ops still precompute (the one-pass forward): same numbers."""
    a, k = (torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (6, 7))
    ar = a.clone().requires_grad_()
    (eager,) = torch.autograd.grad(m.info_nce(ar, k), ar)
    torch.testing.assert_close(torch.func.grad(lambda t: m.info_nce(t, k))(a), eager, rtol=1e-12, atol=1e-14)
