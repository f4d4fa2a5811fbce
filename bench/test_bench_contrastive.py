"""Regression benchmarks of the contrastive op (ops/contrastive): info_nce in-batch, with a
MoCo queue of shared negatives, with paired hard negatives, and clip_loss; ours against
reference/contrastive.py and its torch.compile.  float32, CPU.  Conventions: conftest.py."""
from __future__ import annotations

import torch

from metassl_fast import functional as mf
from metassl_fast.reference import contrastive_loss

TEMPERATURE = 0.07
SHAPES = {"default": dict(N=2048, D=128, queue=8192, paired=8), "tiny": dict(N=16, D=8, queue=32, paired=3)}


def _features(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _info_nce(size, negatives):
    s = SHAPES[size]
    q, k = _features(s["N"], s["D"]), _features(s["N"], s["D"], seed=1)
    shape = f"N={s['N']} D={s['D']}"
    if negatives == "queue":  # a MoCo queue holds detached keys
        neg = _features(s["queue"], s["D"], grad=False, seed=2)
        shape += f" M={s['queue']}"
    elif negatives == "paired":
        neg = _features(s["N"], s["paired"], s["D"], grad=False, seed=2)
        shape += f" paired M={s['paired']}"
    else:
        neg = None
    scale = torch.tensor(1 / TEMPERATURE)
    return dict(shape=shape, args=(q, k, neg, scale),
                ours=lambda q, k, neg, scale: mf.info_nce(q, k, temperature=TEMPERATURE, negatives=neg),
                eager=lambda q, k, neg, scale: contrastive_loss(q, k, neg, scale, False, True, "mean"))


def clip(size):
    s = SHAPES[size]
    img, txt = (torch.nn.functional.normalize(_features(s["N"], s["D"], grad=False, seed=i), dim=-1).requires_grad_()
                for i in (0, 1))
    logit_scale = torch.tensor(1 / TEMPERATURE, requires_grad=True)  # open_clip learns it
    return dict(shape=f"N={s['N']} D={s['D']}", args=(img, txt, logit_scale),
                ours=lambda img, txt, s: mf.clip_loss(img, txt, s),
                eager=lambda img, txt, s: contrastive_loss(img, txt, None, s, True, False, "mean"))


CASES = {"info_nce": lambda size: _info_nce(size, None),
         "info_nce_queue": lambda size: _info_nce(size, "queue"),
         "info_nce_paired": lambda size: _info_nce(size, "paired"),
         "clip_loss": clip}


def test_contrastive(run_bench, case, provider, phase):
    run_bench(case, provider, phase)
