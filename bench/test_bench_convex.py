"""Regression benchmarks of the convex-heads op (ops/convex): meta.ridge_loss (R2-D2),
svm_loss (MetaOptNet), logreg_loss with a learned logit scale, and fit_logreg (episode
evaluation, no gradient: forward only); ours against reference/convex.py (autograd through
an exact solve; the SVM dual by FISTA, logistic regression by Newton) and its
torch.compile.  Episodes: metassl_fast.benchmarks.heads.episodes (class means plus noise).
float32, CPU.  Conventions: conftest.py."""
from __future__ import annotations

import torch

from metassl_fast import meta
from metassl_fast.benchmarks.heads import episodes
from metassl_fast.reference.convex import head_loss, head_weights

REG = {"ridge": 50.0, "svm": 0.1, "logreg": 1.0}  # lam, C, lam: the public defaults
SHAPES = {"default": dict(T=8, shot=5, q=15, D=640, C=5), "tiny": dict(T=2, shot=2, q=3, D=8, C=3)}
OURS = {"ridge": meta.ridge_loss, "svm": meta.svm_loss, "logreg": meta.logreg_loss}


def _shape(s):
    return f"T={s['T']} {s['C']}-way {s['shot']}-shot Q={s['C'] * s['q']} D={s['D']}"


def _head(size, kind):
    s = SHAPES[size]
    xs, ys, xq, yq = episodes(s["T"], s["shot"], s["D"], s["q"], n_way=s["C"])
    scale = torch.tensor(1.0, requires_grad=True)  # MetaOptNet learns the logit scale
    reg = torch.tensor(REG[kind])
    n_way = s["C"]
    ours_reg, eager_reg = ("C", "C_box") if kind == "svm" else ("lam", "lam")

    def ours(xs, ys, xq, yq, scale, reg):
        return OURS[kind](xs, ys, xq, yq, **{ours_reg: REG[kind]}, scale=scale, n_way=n_way)

    def eager(xs, ys, xq, yq, scale, reg):
        return head_loss(kind, xs, ys, xq, yq, n_way, scale, 0.0, **{eager_reg: reg})[0].mean()

    return dict(shape=_shape(s), args=(xs.requires_grad_(), ys, xq.requires_grad_(), yq, scale, reg),
                ours=ours, eager=eager)


def fit_logreg(size):
    s = SHAPES[size]
    xs, ys, _, _ = episodes(s["T"], s["shot"], s["D"], s["q"], n_way=s["C"], normalize=True)
    n_way = s["C"]

    def eager(xs, ys, lam):
        with torch.no_grad():
            return head_weights("logreg", xs, ys, n_way, lam=lam)

    return dict(shape=_shape(s), args=(xs, ys, torch.tensor(REG["logreg"])),
                ours=lambda xs, ys, lam: meta.fit_logreg(xs, ys, lam=REG["logreg"], n_way=n_way), eager=eager)


CASES = {"ridge_loss": lambda size: _head(size, "ridge"), "svm_loss": lambda size: _head(size, "svm"),
         "logreg_loss": lambda size: _head(size, "logreg"), "fit_logreg": fit_logreg}
FORWARD_ONLY = {"fit_logreg"}


def test_convex(run_bench, case, provider, phase):
    run_bench(case, provider, phase)
