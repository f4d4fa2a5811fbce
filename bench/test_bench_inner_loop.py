"""Regression benchmarks of the inner-loop op (ops/inner_loop): the ANIL meta-loss
meta.anil_loss, second order, with a constant step size (ANIL), a learned per-parameter
one (Meta-SGD) and first order; ours against reference/inner_loop.py (the per-task autograd
loop, create_graph=True) followed by the query cross-entropy, and its torch.compile.
float32, CPU.  Conventions: conftest.py.

With a constant step size ours forms the gradient during the forward (the one-pass
training op, ops.inner_loop.one_pass): its forward holds most of its backward's work and
its backward is a scaling; compare "full" across providers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl_fast import meta
from metassl_fast.benchmarks.heads import episodes
from metassl_fast.reference import adapt_reference

LR = 0.5
SHAPES = {"default": dict(T=32, shot=5, q=15, D=640, C=5, steps=5), "tiny": dict(T=2, shot=2, q=2, D=8, C=3, steps=2)}


def _anil(size, lr, first_order=False):
    s = SHAPES[size]
    xs, ys, xq, yq = episodes(s["T"], s["shot"], s["D"], s["q"], n_way=s["C"])
    g = torch.Generator().manual_seed(1)
    W = (0.01 * torch.randn(s["C"], s["D"], generator=g)).requires_grad_()
    b = torch.zeros(s["C"], requires_grad=True)
    if lr == "meta_sgd":
        lr_w = torch.full((s["C"], s["D"]), LR, requires_grad=True)
        lr_b = torch.full((s["C"],), LR, requires_grad=True)
    else:
        lr_w = lr_b = torch.tensor(LR)
    steps = s["steps"]

    def ours(xs, ys, xq, yq, W, b, lr_w, lr_b):
        return meta.anil_loss(xs, ys, xq, yq, W, b, lr=(lr_w, lr_b) if lr == "meta_sgd" else LR, steps=steps,
                              first_order=first_order)

    def eager(xs, ys, xq, yq, W, b, lr_w, lr_b):
        W_t, b_t = adapt_reference(xs, ys, W, b, lr_w, lr_b, steps, first_order)
        logits = torch.baddbmm(b_t.unsqueeze(1), xq, W_t.transpose(1, 2))
        return F.cross_entropy(logits.flatten(0, 1), yq.flatten())  # every task has Q queries: the mean of means

    # first order: the inner gradients are constants, so the support gets no gradient
    xs.requires_grad_(not first_order)
    shape = f"T={s['T']} S={s['C'] * s['shot']} Q={s['C'] * s['q']} D={s['D']} C={s['C']} K={steps}"
    return dict(shape=shape, args=(xs, ys, xq.requires_grad_(), yq, W, b, lr_w, lr_b),
                ours=ours, eager=eager)


CASES = {"anil_loss": lambda size: _anil(size, LR),
         "anil_loss_meta_sgd": lambda size: _anil(size, "meta_sgd"),
         "anil_loss_first_order": lambda size: _anil(size, LR, first_order=True)}


def test_inner_loop(run_bench, case, provider, phase):
    run_bench(case, provider, phase)
