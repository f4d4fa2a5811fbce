"""nt_xent, supcon_loss, the pairwise (pytorch-metric-learning) NT-Xent and siglip_loss:
the CPU kernel against the float64 references, loss and every gradient."""
from __future__ import annotations

import itertools

import pytest
import torch

import metassl_fast as msf
from helpers import TOL
from metassl_fast import _ext
from metassl_fast.functional import labeled_contrastive
from metassl_fast.ops import family as fam
from metassl_fast.reference import labeled_contrastive_loss, siglip_loss

pytestmark = pytest.mark.skipif(not _ext.available("_C"), reason=f"_C not built: {_ext.load_error('_C')}")

def _randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _grads(loss, inputs):
    # a non-uniform upstream gradient, so reduction="none" weights rows differently
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape).to(loss.dtype)
    return [loss] + list(torch.autograd.grad((loss * w).sum(), inputs))


def _compare(ours, ref, dtype, what):
    atol, rtol = TOL[dtype]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{what} output {i}: shape {a.shape} != {b.shape}"
        a64, b64 = a.double(), b.double()
        assert torch.isfinite(a64).all(), f"{what} output {i}: non-finite values"
        err = (a64 - b64).abs().max().item()
        bound = atol + rtol * b64.abs().max().item()
        assert err <= bound, f"{what} output {i}: max error {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------
# float64 grids against the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65])
@pytest.mark.parametrize("d", [1, 3, 64, 130])
def test_nt_xent_float64(n, d, small_blocks):
    z1, z2 = _randn(n, d, seed=n * 100 + d), _randn(n, d, seed=n * 100 + d + 1)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    for reduction, normalize in itertools.product(["mean", "sum", "none"], [True, False]):
        ours = _grads(msf.nt_xent(z1, z2, temperature=t, normalize=normalize, reduction=reduction,
                                  backend="cpu"), [z1, z2, t])
        z = torch.cat([z1, z2])
        y = torch.arange(n).repeat(2)
        ref = _grads(labeled_contrastive_loss(z, None, y, None, 1 / t, normalize, reduction, False),
                     [z1, z2, t])
        _compare(ours, ref, torch.float64, f"n={n} d={d} {reduction} normalize={normalize}")


def test_nt_xent_is_simclr_cross_entropy():
    """Independent of our reference: the textbook SimCLR formula with masked logits."""
    z1, z2 = _randn(6, 4, seed=1), _randn(6, 4, seed=2)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.5).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    want = torch.nn.functional.cross_entropy(logits, target)
    got = msf.nt_xent(z1, z2, temperature=0.5, backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,v,d,classes", [(1, 2, 3, 1), (5, 1, 3, 2), (17, 2, 16, 3), (33, 3, 40, 5),
                                           (65, 2, 130, 40)])
def test_supcon_float64(n, v, d, classes, small_blocks):
    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, classes, (n,), generator=g)
    feats = _randn(n, v, d, seed=n + v) if v > 1 else _randn(n, d, seed=n)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for reduction in ["mean", "sum", "none"]:
        ours = _grads(msf.supcon_loss(feats, y, temperature=t, reduction=reduction, backend="cpu"), [feats, t])
        yy = y.repeat_interleave(v) if v > 1 else y
        ref_loss = labeled_contrastive_loss(feats.reshape(-1, d), None, yy, None, 1 / t, True, reduction, False)
        ref = _grads(ref_loss.reshape(ours[0].shape), [feats, t])
        _compare(ours, ref, torch.float64, f"n={n} v={v} {reduction}")


def test_supcon_matches_khosla_formula():
    """Khosla et al.'s L_out written out with masks (base_temperature = temperature)."""
    feats = _randn(8, 2, 5, seed=3)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    z = torch.nn.functional.normalize(torch.cat(torch.unbind(feats, dim=1)), dim=1)
    yy = y.repeat(2)
    logits = z @ z.T / 0.1
    self_mask = torch.eye(16, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    pos = (yy[:, None] == yy[None, :]) & ~self_mask
    per_anchor = -(log_prob * pos).sum(1) / pos.sum(1)
    want = per_anchor[pos.sum(1) > 0].mean()
    torch.testing.assert_close(msf.supcon_loss(feats, y, temperature=0.1, backend="cpu"), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("n,m,d,classes", [(1, 1, 3, 1), (3, 2, 1, 2), (17, 9, 16, 3), (65, 64, 40, 4),
                                           (64, 130, 3, 60)])
def test_labeled_float64(pairwise, with_key, n, m, d, classes, small_blocks):
    g = torch.Generator().manual_seed(n * 7 + m)
    y = torch.randint(0, classes, (n,), generator=g)
    q = _randn(n, d, seed=n)
    key = _randn(m, d, seed=m + 1000) if with_key else None
    yk = torch.randint(0, classes, (m,), generator=g) if with_key else None
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    inputs = [q, t] + ([key] if with_key else [])
    for reduction in ["mean", "sum", "none"]:
        ours = _grads(labeled_contrastive(q, y, key, yk, temperature=t, reduction=reduction, pairwise=pairwise,
                                          backend="cpu"), inputs)
        ref = _grads(labeled_contrastive_loss(q, key, y, yk, 1 / t, True, reduction, pairwise), inputs)
        _compare(ours, ref, torch.float64, f"{reduction}")


@pytest.mark.parametrize("pairwise", [False, True])
def test_anchors_without_positives_or_negatives(pairwise):
    """All labels distinct: no positives anywhere, loss 0 with zero gradient.  All labels
    equal: no negatives (pairwise: every term is softplus(-inf) = 0)."""
    q = _randn(6, 4, seed=5)
    loss = labeled_contrastive(q, torch.arange(6), pairwise=pairwise, backend="cpu")
    assert loss.item() == 0.0
    (gq,) = torch.autograd.grad(loss, q)
    assert (gq == 0).all()
    same = torch.zeros(6, dtype=torch.long)
    ours = labeled_contrastive(q, same, pairwise=pairwise, backend="cpu")
    ref = labeled_contrastive_loss(q, None, same, None, torch.tensor(10.0, dtype=torch.float64), True, "mean",
                                   pairwise)
    torch.testing.assert_close(ours, ref)
    if pairwise:
        assert ours.item() == 0.0


@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (17, 16), (64, 40), (65, 130)])
def test_siglip_float64(n, d, small_blocks):
    a, b = _randn(n, d, seed=n), _randn(n, d, seed=n + 1)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    ours = _grads(msf.siglip_loss(a, b, s, bias, backend="cpu"), [a, b, s, bias])
    ref = _grads(siglip_loss(a, b, s, bias), [a, b, s, bias])
    _compare(ours, ref, torch.float64, f"n={n} d={d}")


def test_siglip_matches_open_clip_formula():
    a, b = _randn(9, 5, seed=1), _randn(9, 5, seed=2)
    logits = 10.0 * a @ b.T - 10.0
    labels = 2 * torch.eye(9, dtype=torch.float64) - 1
    want = -torch.nn.functional.logsigmoid(labels * logits).sum() / 9
    torch.testing.assert_close(msf.siglip_loss(a, b, 10.0, -10.0, backend="cpu"), want, rtol=1e-12, atol=1e-12)


def test_siglip_extreme_logits_are_stable():
    """|x| up to ~1e3: softplus and sigmoid must not overflow (float32)."""
    a, b = _randn(33, 8, seed=1, dtype=torch.float32), _randn(33, 8, seed=2, dtype=torch.float32)
    for s, bias in [(100.0, -50.0), (100.0, 50.0), (1e-3, 0.0)]:
        ours = _grads(msf.siglip_loss(a, b, s, bias, backend="cpu"), [a, b])
        a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
        ref = _grads(siglip_loss(a64, b64, torch.tensor(s, dtype=torch.float64),
                                 torch.tensor(bias, dtype=torch.float64)), [a64, b64])
        _compare(ours, ref, torch.float32, f"s={s} bias={bias}")


# ---------------------------------------------------------------------------
# low precision, gradcheck, ops machinery
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["nt_xent", "supcon", "pairwise", "siglip"])
def test_low_precision_against_float64(dtype, op):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (65,), generator=g)

    def run(x1, x2):
        if op == "nt_xent":
            return msf.nt_xent(x1, x2, temperature=0.2, backend="cpu")
        if op == "supcon":
            return msf.supcon_loss(torch.stack([x1, x2], 1), y, temperature=0.2, backend="cpu")
        if op == "pairwise":
            return labeled_contrastive(x1, y, x2, y, temperature=0.2, pairwise=True, backend="cpu")
        return msf.siglip_loss(x1, x2, 5.0, -3.0, backend="cpu")

    x1, x2 = _randn(65, 40, seed=1, dtype=dtype), _randn(65, 40, seed=2, dtype=dtype)
    ours = _grads(run(x1, x2), [x1, x2])
    assert all(o.dtype == dtype for o in ours), "loss and gradients come back in the input dtype"
    r1, r2 = (x.detach().double().requires_grad_() for x in (x1, x2))
    ref = _grads(run(r1, r2), [r1, r2])
    _compare(ours, ref, dtype, f"{op} {dtype}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction, small_blocks):
    z1, z2 = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, t: msf.nt_xent(a, b, temperature=t, reduction=reduction, backend="cpu"), (z1, z2, t))
    y = torch.tensor([0, 1, 0, 1, 2])
    q, k = _randn(5, 3, seed=3), _randn(4, 3, seed=4)
    yk = torch.tensor([1, 0, 2, 2])
    for pairwise in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, t: labeled_contrastive(q, y, k, yk, temperature=t, reduction=reduction,
                                                pairwise=pairwise, backend="cpu"), (q, k, t))
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, s, b: msf.siglip_loss(a, c, s, b, backend="cpu"),
                                    (z1, z2, s, b))


def _labeled_args(precompute, reduction, with_key, pairwise, with_pos=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(19, 8, generator=g, requires_grad=True)
    key = torch.randn(11, 8, generator=g, requires_grad=True) if with_key else None
    y = torch.randint(0, 3, (19,), generator=g)
    yk = torch.randint(0, 3, (11,), generator=g) if with_key else None
    pos = torch.randn(19, generator=g, requires_grad=True) if with_pos else None
    scale = torch.tensor(4.0, requires_grad=True)
    return (q, key, y, yk, pos, True, scale, -1, True, reduction, pairwise, precompute, True, with_key, with_pos,
            True, "cpu")


@pytest.mark.parametrize("with_key,pairwise,with_pos", [(False, False, False), (False, True, False),
                                                        (True, False, False), (True, True, False),
                                                        (True, False, True)])
@pytest.mark.parametrize("reduction,precompute", [("mean", True), ("sum", True), ("none", False)])
def test_opcheck_labeled(with_key, pairwise, with_pos, reduction, precompute):
    args = _labeled_args(precompute, reduction, with_key, pairwise, with_pos)
    torch.library.opcheck(torch.ops.metassl_fast.labeled_fwd.default, args)
    if not precompute:
        q, key, y, yk, pos, _ext_pos, scale = args[:7]
        torch.library.opcheck(torch.ops.metassl_fast.labeled_bwd.default,
                              (torch.randn(19), q.detach(), None if key is None else key.detach(), y, yk,
                               None if pos is None else pos.detach(), True, scale.detach(), -1, True, reduction,
                               pairwise,
                               True, with_key, with_pos, True, "cpu"))


@pytest.mark.parametrize("precompute", [True, False])
def test_opcheck_siglip(precompute):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(13, 8, generator=g, requires_grad=True) for _ in range(2))
    s, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    torch.library.opcheck(torch.ops.metassl_fast.siglip_fwd.default,
                          (a, b, s, bias, 0, precompute, True, True, True, True, "cpu"))
    torch.library.opcheck(torch.ops.metassl_fast.siglip_bwd.default,
                          (torch.tensor(0.7), a.detach(), b.detach(), s.detach(), bias.detach(), 0,
                           True, True, True, True, "cpu"))


@pytest.mark.parametrize("op", ["nt_xent", "supcon_none", "siglip"])
def test_torch_compile_fullgraph(op):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(37, 16, generator=g, requires_grad=True) for _ in range(2))
    y = torch.randint(0, 5, (37,), generator=g)
    t = torch.tensor(0.25, requires_grad=True)

    def step(a, b, t):
        if op == "nt_xent":
            loss = msf.nt_xent(a, b, temperature=t, backend="cpu")
        elif op == "supcon_none":
            loss = msf.supcon_loss(torch.stack([a, b], 1), y, temperature=t, reduction="none", backend="cpu")
        else:
            loss = msf.siglip_loss(a, b, 1 / t, -t, backend="cpu")
        return (loss * torch.arange(1, loss.numel() + 1).reshape(loss.shape)).sum()

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(a, b, t)
    g_got = torch.autograd.grad(got, (a, b, t))
    want = step(a, b, t)
    g_want = torch.autograd.grad(want, (a, b, t))
    torch.testing.assert_close(got, want)
    for x, w in zip(g_got, g_want):
        torch.testing.assert_close(x, w)


def test_double_backward_is_a_clear_error():
    a, b = _randn(5, 3, seed=1), _randn(5, 3, seed=2)
    for loss in (msf.nt_xent(a, b, backend="cpu"), msf.siglip_loss(a, b, 2.0, 0.0, backend="cpu")):
        with pytest.raises(RuntimeError, match="double backward"):
            (ga,) = torch.autograd.grad(loss, a, create_graph=True)


def test_modules_match_functional():
    a, b = _randn(9, 4, seed=1), _randn(9, 4, seed=2)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 3])
    torch.testing.assert_close(msf.NTXentLoss(temperature=0.3)(a, b), msf.nt_xent(a, b, temperature=0.3))
    torch.testing.assert_close(msf.SupConLoss(temperature=0.3)(a, y), msf.supcon_loss(a, y, temperature=0.3))
    mod = msf.SigLipLoss()
    assert mod.logit_scale.requires_grad and mod.logit_bias.requires_grad
    torch.testing.assert_close(mod(a, b), msf.siglip_loss(a, b, mod.logit_scale.exp(), mod.logit_bias))


def test_nan_input_gives_nan_loss():
    a, b = _randn(6, 3, seed=1), _randn(6, 3, seed=2)
    a = a.detach().clone()
    a[2, 1] = float("nan")
    assert torch.isnan(msf.nt_xent(a, b, backend="cpu"))
    assert torch.isnan(msf.siglip_loss(a, b, 2.0, 0.0, backend="cpu"))


def test_gradient_only_where_required():
    a, b = _randn(6, 3, seed=1), _randn(6, 3, seed=2).detach()
    loss = msf.siglip_loss(a, b, 2.0, 0.5, backend="cpu")
    (ga,) = torch.autograd.grad(loss, a)
    ref = torch.autograd.grad(siglip_loss(a, b, torch.tensor(2.0, dtype=torch.float64),
                                          torch.tensor(0.5, dtype=torch.float64)), a)[0]
    torch.testing.assert_close(ga, ref)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

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
    (lambda: msf.siglip_loss(X, X, -1.0, 0.0), ValueError, "logit_scale"),
    (lambda: msf.siglip_loss(X, X, 1.0, float("nan")), ValueError, "logit_bias"),
    (lambda: msf.siglip_loss(X, X, 1.0, torch.zeros(2)), ValueError, "logit_bias"),
    (lambda: msf.siglip_loss(X, torch.randn(4, 2), 1.0, 0.0), ValueError, "text_features"),
    (lambda: msf.nt_xent(X.double(), X.double(), backend="triton"), (TypeError, RuntimeError), "triton"),
    (lambda: labeled_contrastive(X, Y, torch.randn(2, 3)), ValueError, "key_labels"),
    (lambda: labeled_contrastive(X, Y, torch.randn(2, 3), Y), ValueError, "key_labels"),
    (lambda: labeled_contrastive(X, Y, torch.randn(2, 4), Y[:2]), ValueError, "key"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_cpp_checks_buffer_bounds():
    C = _ext.require("_C")
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
    sb = dict(dtype=0, S=S.data_ptr(), S_numel=16, B=4, C=4, ld=4, row0=0, scale=1.0, bias=0.0, weight=1.0,
              write_grad=True, nthreads=1)
    C.block_sigmoid(**sb)
    for bad in (dict(S_numel=15), dict(row0=1), dict(C=3), dict(nthreads=0)):
        with pytest.raises(ValueError, match="metassl_fast._C"):
            C.block_sigmoid(**{**sb, **bad})


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
    torch.testing.assert_close(fam.positives_per_row(y, y, 0), torch.tensor([2, 1, 2, 0, 2, 1]))
    yk = torch.tensor([1, 1, 5])
    torch.testing.assert_close(fam.positives_per_row(y, yk, None), torch.tensor([0, 2, 0, 0, 0, 2]))
    # anchors are keys 2..7 of a gathered key set (another rank's keys first)
    keys = torch.cat([torch.tensor([3, 9]), y])
    torch.testing.assert_close(fam.positives_per_row(y, keys, 2), torch.tensor([3, 1, 3, 0, 3, 1]))


@pytest.mark.parametrize("op", ["info_nce", "clip", "nt_xent", "supcon", "siglip", "queue_fp32"])
def test_autocast_bf16_on_cpu(op):
    """An encoder run under torch.autocast (bf16 on the CPU) feeds the losses; the loss
    and the encoder's gradient match float32 within bf16 precision.  queue_fp32: a float32
    MoCo queue beside bf16 features (mixed dtypes are computed in float32 under autocast)."""
    g = torch.Generator().manual_seed(0)
    enc = torch.nn.Linear(16, 32)
    x1, x2 = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    queue = torch.randn(7, 32, generator=g)

    def loss_of(a, b):
        if op == "info_nce":
            return msf.info_nce(a, b, temperature=0.2)
        if op == "queue_fp32":
            return msf.info_nce(a, b, temperature=0.2, negatives=queue)
        if op == "clip":
            return msf.clip_loss(torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1),
                                 10.0)
        if op == "nt_xent":
            return msf.nt_xent(a, b)
        if op == "supcon":
            return msf.supcon_loss(torch.stack([a, b], 1), y)
        return msf.siglip_loss(a, b, 2.0, -1.0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = enc(x1), enc(x2)
        assert a.dtype == torch.bfloat16
        loss = loss_of(a, b)
    (g_auto,) = torch.autograd.grad(loss, enc.weight)
    ref = loss_of(enc(x1), enc(x2))
    (g_ref,) = torch.autograd.grad(ref, enc.weight)
    assert torch.isfinite(loss) and torch.isfinite(g_auto).all()
    torch.testing.assert_close(loss.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g_auto, g_ref, rtol=5e-2, atol=5e-2 * g_ref.abs().max().item())


# ---------------------------------------------------------------------------
# info_nce with paired negatives (N, M, D)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (3, 5, 1), (17, 5, 16), (65, 2, 40)])
def test_paired_negatives_float64(n, m, d, small_blocks):
    from metassl_fast.reference import contrastive_loss

    q, k, neg = _randn(n, d, seed=n), _randn(n, d, seed=n + 1), _randn(n, m, d, seed=n + 2)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for symmetric, reduction, normalize in itertools.product([False, True], ["mean", "sum", "none"], [True, False]):
        inputs = [q, k, neg, t]
        ours = _grads(msf.info_nce(q, k, negatives=neg, temperature=t, symmetric=symmetric, normalize=normalize,
                                   reduction=reduction, backend="cpu"), inputs)
        ref = _grads(contrastive_loss(q, k, neg, 1 / t, symmetric, normalize, reduction), inputs)
        _compare(ours, ref, torch.float64, f"paired n={n} m={m} sym={symmetric} {reduction} norm={normalize}")


def test_paired_negatives_written_out():
    """Independent of the reference: CE over [q_i . k_j for all j, q_i . neg_i,m]."""
    q, k, neg = _randn(6, 4, seed=1), _randn(6, 4, seed=2), _randn(6, 3, 4, seed=3)
    qn, kn, nn_ = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k, neg))
    logits = torch.cat([qn @ kn.T, torch.einsum("nd,nmd->nm", qn, nn_)], 1) / 0.1
    want = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    torch.testing.assert_close(msf.info_nce(q, k, negatives=neg, temperature=0.1, backend="cpu"), want,
                               rtol=1e-12, atol=1e-12)


def test_paired_negatives_gradcheck_and_opcheck():
    q, k, neg = _randn(4, 3, seed=1), _randn(4, 3, seed=2), _randn(4, 2, 3, seed=3)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, n, t: msf.info_nce(q, k, negatives=n, temperature=t, symmetric=True, backend="cpu"),
        (q, k, neg, t))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(7, 4, generator=g, requires_grad=True), torch.randn(7, 4, generator=g, requires_grad=True),
            torch.arange(7), torch.arange(7), torch.randn(7, generator=g, requires_grad=True), False,
            torch.tensor(3.0, requires_grad=True), -1, True, "mean", False, True, True, True, True, True, "cpu")
    torch.library.opcheck(torch.ops.metassl_fast.labeled_fwd.default, args)


@pytest.mark.parametrize("bad,name", [((5, 2, 3), "negatives"), ((4, 0, 3), "negatives"), ((4, 2, 5), "negatives")])
def test_paired_negatives_bad_shape(bad, name):
    with pytest.raises(ValueError, match=name):
        msf.info_nce(torch.randn(4, 3), torch.randn(4, 3), negatives=torch.randn(*bad))


def test_key_without_grad_updated_in_place_before_backward():
    """A memory bank / queue enqueued in place between forward and a recomputing backward
    (reduction="none") does not change the gradient: the op saved a copy."""
    q = _randn(9, 4, seed=1)
    bank = torch.randn(6, 4, dtype=torch.float64)
    p = _randn(9, 4, seed=2)
    want = torch.autograd.grad(info_nce_explicit_sum(q, p, bank.clone()), [q, p])
    loss = info_nce_explicit_none(q, p, bank)
    bank.mul_(-3.0)
    got = torch.autograd.grad(loss.sum(), [q, p])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def info_nce_explicit_none(q, p, bank):
    from metassl_fast.functional import info_nce_explicit
    return info_nce_explicit(q, p, bank, temperature=0.2, reduction="none", backend="cpu")


def info_nce_explicit_sum(q, p, bank):
    return info_nce_explicit_none(q, p, bank).sum()


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
    with pytest.raises(ValueError, match="diag_offset"):
        torch.ops.metassl_fast.siglip_fwd(q, k8, s, torch.tensor(0.0), 4, False, False, False, False, False, "cpu")
    with pytest.raises(ValueError, match="key"):
        torch.ops.metassl_fast.siglip_fwd(q, k, s, torch.tensor(0.0), 0, False, False, False, False, False, "cpu")
    with pytest.raises(ValueError, match="bias"):
        torch.ops.metassl_fast.siglip_fwd(q, q, s, torch.zeros(2), 0, False, False, False, False, False, "cpu")


def test_supcon_empty_feature_dimension():
    with pytest.raises(ValueError, match="features"):
        msf.supcon_loss(torch.randn(6, 2, 0), torch.zeros(6, dtype=torch.long))


def test_torch_compile_as_the_first_call_in_a_process():
    """The compiled module is loaded at import, not inside the first (traced) call."""
    import subprocess
    import sys

    code = ("import torch, metassl_fast as msf\n"
            "a, b = torch.randn(9, 4, requires_grad=True), torch.randn(9, 4)\n"
            "f = torch.compile(lambda a, b: msf.nt_xent(a, b) + msf.info_nce(a, b), fullgraph=True)\n"
            "print(float(f(a, b)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
