"""A bounded fuzzer (hypothesis) over every public loss and meta-learning function and every
raw op: random shapes including 0 and 1, every dtype, non-contiguous strides, NaN / inf /
huge values, bad labels and scalars.  Asserted for every call: the process survives (a
crash fails the run), every failure is a ValueError or TypeError that names an argument,
and every success agrees with the float64 torch reference (within the dtype's tolerance,
or within twice the error of the same-dtype torch reference; non-finite exactly where the
reference is).  70% of examples draw valid inputs only (edge sizes, special values), 30%
adversarial ones.  Budget: METASSL_FUZZ_EXAMPLES examples per function (default 150:
900 calls, about a minute on 2 cores; derandomized, so CI is repeatable); the sanitizer
job runs it too.  METASSL_FUZZ_REPORT=<file> logs each call's outcome."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import metassl_fast as m  # noqa: E402
from metassl_fast import _ext, meta  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")

EXAMPLES = int(os.environ.get("METASSL_FUZZ_EXAMPLES", "150"))
# METASSL_FUZZ_REPORT=<file>: append one line per call (function, outcome) for the report
_REPORT = os.environ.get("METASSL_FUZZ_REPORT")


def _note(what: str, outcome: str) -> None:
    if _REPORT:
        with open(_REPORT, "a") as f:
            f.write(f"{what}\t{outcome}\n")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
TOL = {torch.float64: (1e-9, 1e-8), torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2),
       torch.bfloat16: (1e-2, 4e-2)}
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------- strategies


@st.composite
def tensors(draw, shape, *, dtype=None, bad_dtype_p=0.03):
    """A tensor of `shape`: some dtype, sometimes a non-contiguous view, values normal,
    huge, or with a NaN / inf."""
    if dtype is None:
        dtype = draw(st.sampled_from(FLOATS))
        if draw(st.floats(0, 1)) < bad_dtype_p:
            dtype = draw(st.sampled_from((torch.int64, torch.bool, torch.complex64)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    mode = draw(st.sampled_from(("normal",) * 6 + ("huge", "tiny", "nan", "inf", "zeros")))
    if mode == "huge":
        x = x * 1e30
    elif mode == "tiny":
        x = x * 1e-30
    elif mode == "zeros":
        x = torch.zeros_like(x)
    elif mode in ("nan", "inf") and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = math.nan if mode == "nan" else -math.inf
    if dtype.is_complex:
        x = x.to(dtype)
    elif dtype == torch.bool:
        x = x > 0
    elif not dtype.is_floating_point:
        x = x.round().to(dtype)
    else:
        x = x.to(dtype)
    if x.dim() >= 2 and draw(st.booleans()) and draw(st.booleans()):
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major strides
    return x


def scalars(positive=True, adversarial=True):
    good = st.floats(0.05, 2.0) if positive else st.floats(-3.0, 3.0)
    bad = st.sampled_from((0.0, -0.1, math.inf, -math.inf, math.nan, 1e-30, 1e30, 10**400, True, "t", None))
    as_tensor = good.map(lambda v: torch.tensor(v))
    return st.one_of(good, good, good, as_tensor, bad) if adversarial else st.one_of(good, as_tensor)


def sizes(lo=0, adversarial=True):
    """Sizes with 0 (and the edge sizes 1, 2, 3, 5, 17); without 0 for a valid-input example."""
    return st.sampled_from([n for n in (0, 1, 2, 3, 5, 17) if n >= (lo if adversarial else max(lo, 1))])


@st.composite
def int_labels(draw, shape, n_classes, adversarial=True):
    kind = draw(st.sampled_from(("ok",) * 6 + ("neg", "big", "float", "shape", "uint8"))) if adversarial else "ok"
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    y = torch.randint(0, max(n_classes, 1), shape, generator=g)
    if kind == "neg" and y.numel():
        y.view(-1)[0] = -1
    elif kind == "big" and y.numel():
        y.view(-1)[0] = n_classes + 3
    elif kind == "float":
        y = y.double()
    elif kind == "shape":
        y = y.reshape(-1)[:-1] if y.numel() else torch.zeros(1, dtype=torch.int64)
    elif kind == "uint8":
        y = y.to(torch.uint8)
    return y


# --------------------------------------------------------------------------- the oracle


def _names_an_argument(exc: Exception, names) -> bool:
    text = str(exc)
    return any(re.search(rf"\b{re.escape(n)}\b", text) for n in names)


def _run(fn, args):
    try:
        return fn(*args), None
    except (ValueError, TypeError) as exc:
        return None, exc


def _close(ours: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor | None, dtype, what, extra=0.0):
    """extra: an absolute allowance from the problem's conditioning (a loss LSE - positive of
    logits of size L is only determined to ~eps L by any algorithm in that precision)."""
    ours, ref64 = ours.detach().double(), ref64.detach().double()
    assert ours.shape == ref64.shape, (what, ours.shape, ref64.shape)
    same = None if same is None else same.detach().double()
    fin = torch.isfinite(ref64)
    # where the float64 reference is NaN / inf, ours is not finite either
    assert bool((~torch.isfinite(ours[~fin])).all()), (what, "finite where the reference is not", ours, ref64)
    if not bool(fin.any()):
        return
    o, r = ours[fin], ref64[fin]
    # overflow of the input dtype: allowed where the same-dtype torch reference overflows too
    if same is not None:
        overflow = ~torch.isfinite(o)
        explained = ~torch.isfinite(same[fin][overflow]) | (r[overflow].abs() + extra > torch.finfo(dtype).max)
        assert bool(explained.all()), (what, "overflowed where torch did not", o, r)
        o, r, s = o[~overflow], r[~overflow], same[fin][~overflow]
    else:
        assert bool(torch.isfinite(o).all()), (what, o, r)
        s = None
    if o.numel() == 0:
        return
    atol, rtol = TOL.get(dtype, TOL[torch.float32])
    scale = float(r.abs().max())
    allow = atol + rtol * scale + extra
    if s is not None and bool(torch.isfinite(s).all()):
        allow = max(allow, 2 * float((s - r).abs().max()) + 4 * torch.finfo(dtype).eps * scale)
    err = float((o - r).abs().max())
    assert err <= allow, (what, f"error {err:.3g} > allowed {allow:.3g}", o, r)


def _fresh(args, cast):
    """args with every tensor detached (cast to float64 if asked), the ones that required
    grad made new leaves: -> (args, leaves)."""
    out, leaves = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            b = a.detach()
            if cast and b.dtype.is_floating_point:
                b = b.to(torch.float64)
            if a.requires_grad:
                b.requires_grad_()
                leaves.append(b)
            a = b
        out.append(a)
    return out, leaves


def _loss_and_grads(fn, args, backend, cast=False):
    a, leaves = _fresh(args, cast)
    loss = fn(*a, backend)
    grads = None
    if leaves and loss.requires_grad:
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    return loss, grads


def logit_bound(scale, normalize: bool, *features) -> float:
    """|logit| <= scale * max|a| * max|b| * D (scale only, for unit rows): the conditioning
    term of check_against_reference, 8 eps(float32) times it (0 for a non-numeric scale)."""
    try:
        s = abs(float(scale))
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not math.isfinite(s):
        return 0.0
    if not normalize:
        fs = [f for f in features if isinstance(f, torch.Tensor) and f.numel() and f.dtype.is_floating_point]
        if len(fs) < 1:
            return 0.0
        mags = [float(f.detach().double().abs().max()) for f in fs]
        s *= max(mags) ** 2 * fs[0].shape[-1]
    return 8 * torch.finfo(torch.float32).eps * s if math.isfinite(s) else 0.0


def _meta_bound(X, Xq, W, lr, steps, dtype) -> float:
    """check_against_reference's conditioning term for the inner loop (its kernels compute
    float16 in float32, float64 in float64)."""
    try:
        mags = [float(t.detach().double().abs().max()) if t.numel() else 0.0 for t in (X, Xq, W)]
        k, r = float(steps), abs(float(lr.detach() if isinstance(lr, torch.Tensor) else lr))
    except (TypeError, ValueError, OverflowError, AttributeError):
        return 0.0
    bound = (mags[2] + k * r * mags[0] ** 2) * mags[1] * max(X.shape[-1], 1)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 8 * eps * bound if math.isfinite(bound) else math.inf


def _inv(t):
    try:
        return 1.0 / float(t)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return math.nan


def check_against_reference(fn, args, names, dtype, grads=True, extra=0.0, valid=False):
    """fn(*args, backend) with our default backend vs "torch" in float64 and in the dtype
    (loss and the gradient of every input that requires grad).  valid: the inputs were
    drawn valid, so a refusal is a failure (a check that refuses valid input)."""
    what = getattr(fn, "__qualname__", "fn").split(".")[0]
    try:
        ours, g_ours = _loss_and_grads(fn, args, None)
    except (ValueError, TypeError) as err:
        assert _names_an_argument(err, names), f"{type(err).__name__} names no argument: {err}"
        assert not valid, f"valid input refused: {type(err).__name__}: {err}"
        _note(what, "refused")
        return
    _note(what, "compared" if bool(torch.isfinite(ours).all()) else "compared-nonfinite")
    ref64, g_ref = _loss_and_grads(fn, args, "torch", cast=True)
    same, g_same = (None, None) if dtype == torch.float64 else _loss_and_grads(fn, args, "torch")
    _close(ours, ref64, same, dtype, "loss", extra)
    # logits so large that float32 cannot resolve the softmax (eps L > 1e-3): its weights,
    # and with them the gradients, are rounding noise in any implementation
    if not grads or g_ours is None or not bool(torch.isfinite(ref64).all()) or extra > 1e-3:
        return
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        c = None if g_same is None else g_same[i]
        if a is None or b is None:
            assert (a is None or not bool(a.any())) and (b is None or not bool(b.any())), (i, a, b)
            continue
        _close(a, b, c, dtype, f"grad {i}")


def _grad(x, want):
    if want and isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.dim() > 0:
        return x.detach().requires_grad_()
    return x


# --------------------------------------------------------------------------- public functions

_PAIR_NAMES = ("query", "key", "temperature", "negatives", "reduction", "logit_scale", "logit_bias",
               "image_features", "text_features", "z1", "z2", "features", "labels", "z1/z2")


def _rows(data):
    """The draws the two-tower tests start with: -> (adversarial?, N, D, dtype, the first
    (N, D) features, requiring grad).  30% of examples adversarial, 70% valid (edge cases too)."""
    adv = data.draw(st.integers(0, 9)) < 3
    n, d = data.draw(sizes(adversarial=adv)), data.draw(sizes(adversarial=adv))
    dtype = data.draw(st.sampled_from(FLOATS))
    return adv, n, d, dtype, _grad(data.draw(tensors((n, d), dtype=dtype)), True)


@FUZZ
@given(st.data())
def test_fuzz_info_nce(data):
    adv, n, d, dtype, q = _rows(data)
    kshape = data.draw(st.sampled_from(((n, d), (n, d), (n, d), (n + 1, d), (n, d + 1), (n,)) if adv else ((n, d),)))
    k = _grad(data.draw(tensors(kshape, dtype=dtype)), data.draw(st.booleans()))
    neg_kind = data.draw(st.sampled_from((None, None, "queue", "paired")))
    neg = None
    if neg_kind == "queue":
        neg = data.draw(tensors((data.draw(sizes(1, adversarial=adv)), d), dtype=dtype))
    elif neg_kind == "paired":
        neg = data.draw(tensors((n, data.draw(sizes(1, adversarial=adv)), d), dtype=dtype))
    t = data.draw(scalars(adversarial=adv))
    sym, norm = data.draw(st.booleans()), data.draw(st.booleans())
    red = data.draw(st.sampled_from(("mean", "sum", "none", "avg") if adv else ("mean", "sum", "none")))

    def fn(q, k, neg, t, be):
        return m.info_nce(q, k, temperature=t, negatives=neg, symmetric=sym, normalize=norm, reduction=red,
                          backend=be)

    check_against_reference(fn, [q, k, neg, t], _PAIR_NAMES, dtype, extra=logit_bound(_inv(t), norm, q, k, neg),
                            valid=not adv)


@FUZZ
@given(st.data())
def test_fuzz_clip_nt_xent_siglip(data):
    adv, n, d, dtype, a = _rows(data)
    b = _grad(data.draw(tensors(data.draw(st.sampled_from(((n, d), (n, d), (n + 2, d)) if adv else ((n, d),))),
                                dtype=dtype)), True)
    which = data.draw(st.sampled_from(("clip", "nt_xent", "siglip")))
    s1 = data.draw(scalars(adversarial=adv))
    s2 = data.draw(scalars(positive=False, adversarial=adv))
    fns = {
        "clip": lambda a, b, s1, s2, be: m.clip_loss(a, b, s1, backend=be),
        "nt_xent": lambda a, b, s1, s2, be: m.nt_xent(a, b, temperature=s1, backend=be),
        "siglip": lambda a, b, s1, s2, be: m.siglip_loss(a, b, s1, s2, backend=be),
    }
    bound = (logit_bound(_inv(s1), True) if which == "nt_xent" else
             logit_bound(s1, False, a, b) + (logit_bound(s2, True) if which == "siglip" else 0.0))
    check_against_reference(fns[which], [a, b, s1, s2], _PAIR_NAMES, dtype, extra=bound, valid=not adv)


@FUZZ
@given(st.data())
def test_fuzz_supcon(data):
    adv = data.draw(st.integers(0, 9)) < 3  # 30% adversarial inputs, 70% valid ones (also edge cases)
    n, d = data.draw(sizes(adversarial=adv)), data.draw(sizes(adversarial=adv))
    v = data.draw(st.sampled_from((None, 1, 2)))
    dtype = data.draw(st.sampled_from(FLOATS))
    f = _grad(data.draw(tensors((n, d) if v is None else (n, v, d), dtype=dtype)), True)
    y = data.draw(int_labels((n,), 3, adversarial=adv))
    t = data.draw(scalars(adversarial=adv))
    red = data.draw(st.sampled_from(("mean", "sum", "none")))

    def fn(f, y, t, be):
        return m.supcon_loss(f, y, temperature=t, reduction=red, backend=be)

    check_against_reference(fn, [f, y, t], _PAIR_NAMES, dtype, extra=logit_bound(_inv(t), True), valid=not adv)


_META_NAMES = ("support", "support_labels", "query", "query_labels", "weight", "bias", "lr", "steps", "n_way",
               "reduction", "lr_weight", "lr_bias", "first_order")


@FUZZ
@given(st.data())
def test_fuzz_anil_and_adapt(data):
    adv = data.draw(st.integers(0, 9)) < 3  # 30% adversarial inputs, 70% valid ones (also edge cases)
    T, S, Q, D, C = (data.draw(sizes(adversarial=adv)) for _ in range(5))
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64, torch.float16)))
    X = _grad(data.draw(tensors((T, S, D), dtype=dtype)), data.draw(st.booleans()))
    Xq = _grad(data.draw(tensors((T, Q, D), dtype=dtype)), data.draw(st.booleans()))
    W = _grad(data.draw(tensors((C, D), dtype=dtype)) * 0.1, True)
    b = _grad(torch.zeros(C, dtype=dtype), data.draw(st.booleans()))
    y, yq = data.draw(int_labels((T, S), C, adversarial=adv)), data.draw(int_labels((T, Q), C, adversarial=adv))
    good_lr = st.one_of(st.floats(0.01, 1.0),
                        st.floats(0.01, 1.0).map(lambda v: torch.tensor(v, dtype=dtype).requires_grad_()))
    lr = data.draw(st.one_of(good_lr, st.sampled_from((math.nan, math.inf, -0.5, "x"))) if adv else good_lr)
    steps = data.draw(st.sampled_from((0, 1, 3, -1, 2**40, 2.0) if adv else (0, 1, 3)))
    first_order = data.draw(st.booleans())
    red = data.draw(st.sampled_from(("mean", "none", "sum") if adv else ("mean", "none")))
    if data.draw(st.booleans()):
        def fn(X, y, Xq, yq, W, b, lr, be):
            return meta.anil_loss(X, y, Xq, yq, W, b, lr=lr, steps=steps, first_order=first_order, reduction=red,
                                  backend=be)
    else:
        def fn(X, y, Xq, yq, W, b, lr, be):
            W_t, b_t = meta.adapt_linear_head(X, y, W, b, lr=lr, steps=steps, first_order=first_order, backend=be)
            return torch.cat([W_t.flatten(), b_t.flatten()])
    # conditioning: the adapted head's logits reach (|W| + steps lr |X|^2) |Xq| D; with huge
    # features (1e30) a rounding of them flips the softmax, in any implementation
    check_against_reference(fn, [X, y, Xq, yq, W, b, lr], _META_NAMES, dtype, valid=not adv,
                            extra=_meta_bound(X, Xq, W, lr, steps, dtype))


@FUZZ
@given(st.data())
def test_fuzz_proto_loss(data):
    adv = data.draw(st.integers(0, 9)) < 3  # 30% adversarial inputs, 70% valid ones (also edge cases)
    T, S, Q, D = (data.draw(sizes(adversarial=adv)) for _ in range(4))
    dtype = data.draw(st.sampled_from(FLOATS))
    X = _grad(data.draw(tensors((T, S, D), dtype=dtype)), True)
    Xq = _grad(data.draw(tensors((T, Q, D), dtype=dtype)), True)
    n_way = data.draw(st.sampled_from((None, 1, 2, 3, 0, -1) if adv else (None, 3)))
    y = data.draw(int_labels((T, S), 3, adversarial=adv))
    yq = data.draw(int_labels((T, Q), 3, adversarial=adv))

    def fn(X, y, Xq, yq, be):
        return meta.proto_loss(X, y, Xq, yq, n_way=n_way)

    names = _META_NAMES + ("n_way",)
    ours, err = _run(lambda *a: fn(*a, None), [X, y, Xq, yq])
    if err is not None:
        assert _names_an_argument(err, names), err


# --------------------------------------------------------------------------- raw ops

_RAW_NAMES = ("query", "key", "scale", "reduction", "labels", "key_labels", "grad", "lse_row", "lse_col",
              "negatives", "pos_logit", "support", "weight", "bias", "lr_w", "lr_b", "steps", "W_traj", "b_traj",
              "dW_K", "db_K", "query_labels", "self_offset", "backend", "bias", "diag_offset", "every tensor",
              "coef", "lamK", "dzqT", "WK", "support_labels", "ext_positive", "S", "B", "C", "ld", "row0")


@FUZZ
@given(st.data())
def test_fuzz_raw_ops(data):
    """Direct torch.ops.metassl_fast calls with random (often inconsistent) tensors: never a
    crash, never an error that is not a ValueError / TypeError (or torch's own RuntimeError
    for a schema mismatch, raised before any kernel)."""
    ops = torch.ops.metassl_fast
    n, d = data.draw(sizes()), data.draw(sizes())
    t = lambda shape, **kw: data.draw(tensors(shape, **kw))  # noqa: E731
    dt = data.draw(st.sampled_from((torch.float32, torch.float64)))
    which = data.draw(st.sampled_from(("contrastive_fwd", "labeled_fwd", "siglip_fwd", "inner_loop_fwd",
                                       "anil_loss_fwd", "anil_loss_train")))
    sc = data.draw(st.sampled_from((torch.tensor(2.0, dtype=dt), torch.tensor(-1.0, dtype=dt),
                                    torch.tensor([1.0, 2.0], dtype=dt))))
    if which == "contrastive_fwd":
        args = (t((n, d), dtype=dt), t(data.draw(st.sampled_from(((n, d), (n + 1, d), (n, d + 2)))), dtype=dt),
                None, sc, data.draw(st.booleans()), True, data.draw(st.sampled_from(("mean", "none", "x"))),
                False, False, False, False, False, "cpu")
    elif which == "labeled_fwd":
        y = data.draw(int_labels((n,), 3))
        args = (t((n, d), dtype=dt), None, y, None, None, True, sc, data.draw(st.sampled_from((-1, 0, -7, 2**62))),
                True, "mean", data.draw(st.booleans()), False, False, False, False, False, "cpu")
    elif which == "siglip_fwd":
        args = (t((n, d), dtype=dt), t((n, d), dtype=dt), sc, torch.tensor(0.5, dtype=dt),
                data.draw(st.sampled_from((0, 3, -2, 2**62))), False, False, False, False, False, "cpu")
    else:
        T, S, C = data.draw(sizes()), data.draw(sizes()), data.draw(sizes())
        steps = data.draw(st.sampled_from((0, 2, 2**40, 2**62)))
        X, W = t((T, S, d), dtype=dt), t((C, d), dtype=dt)
        y = data.draw(int_labels((T, S), C))
        lr_w, lr_b = torch.full((C, d), 0.5, dtype=dt), torch.full((C,), 0.5, dtype=dt)
        if which == "inner_loop_fwd":
            args = (X, y, W, torch.zeros(C, dtype=dt), lr_w, lr_b, steps, False, "cpu")
        else:
            Q = data.draw(sizes())
            head = (X, y, t((T, Q, d), dtype=dt), data.draw(int_labels((T, Q), C)), W, torch.zeros(C, dtype=dt),
                    lr_w, lr_b, steps, False)
            args = head + ("mean", "cpu") if which == "anil_loss_fwd" else head
    try:
        getattr(ops, which)(*args)
        _note("raw_" + which, "ran")
    except (ValueError, TypeError) as exc:
        assert _names_an_argument(exc, _RAW_NAMES), f"{which}: {type(exc).__name__} names no argument: {exc}"
        _note("raw_" + which, "refused")
    except MemoryError:
        _note("raw_" + which, "memoryerror")  # a valid but huge request: refused by the allocator, not a crash
    except RuntimeError as exc:
        # torch's own checks of a custom op's schema / allocation: before any kernel runs
        assert re.search(r"alloc|schema|expected|must|Expected", str(exc)), f"{which}: {exc}"
        _note("raw_" + which, "runtimeerror")
