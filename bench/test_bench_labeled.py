"""Regression benchmarks of the labelled-row op (ops/labeled): nt_xent (SimCLR), supcon_loss
(two views per sample), labeled_contrastive with pairwise=True (pytorch-metric-learning's
NT-Xent) and info_nce_explicit (a memory bank of explicit negatives); ours against
reference/labeled.py and its torch.compile.  info_nce_explicit's reference is the
backend="torch" branch of ops.labeled.explicit (its logits are not the labelled-row form).
float32, CPU.  Conventions: conftest.py."""
from __future__ import annotations

import torch

from metassl_fast import functional as mf
from metassl_fast.ops import labeled as _labeled
from metassl_fast.reference import labeled_contrastive_loss

SHAPES = {"default": dict(N=1024, D=128, classes=100, bank=8192), "tiny": dict(N=8, D=8, classes=3, bank=16)}
NT_XENT_T, SUPCON_T, EXPLICIT_T = 0.5, 0.1, 0.1


def _features(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _labels(n, classes):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(3))


def nt_xent(size):
    s = SHAPES[size]
    z1, z2 = _features(s["N"], s["D"]), _features(s["N"], s["D"], seed=1)
    sample = torch.arange(s["N"]).repeat(2)  # row i's positive is its other view
    return dict(shape=f"2N={2 * s['N']} D={s['D']}", args=(z1, z2, sample, torch.tensor(1 / NT_XENT_T)),
                ours=lambda z1, z2, y, scale: mf.nt_xent(z1, z2, temperature=NT_XENT_T),
                eager=lambda z1, z2, y, scale: labeled_contrastive_loss(torch.cat([z1, z2]), None, y, None, scale,
                                                                        True, "mean", False))


def supcon(size):
    s = SHAPES[size]
    x = _features(s["N"], 2, s["D"])
    y = _labels(s["N"], s["classes"])
    return dict(shape=f"N={s['N']} V=2 D={s['D']} classes={s['classes']}",
                args=(x, y, y.repeat_interleave(2), torch.tensor(1 / SUPCON_T)),
                ours=lambda x, y, y_views, scale: mf.supcon_loss(x, y, temperature=SUPCON_T),
                eager=lambda x, y, y_views, scale: labeled_contrastive_loss(x.flatten(0, 1), None, y_views, None,
                                                                            scale, True, "mean", False))


def pairwise(size):
    s = SHAPES[size]
    x = _features(2 * s["N"], s["D"])
    y = _labels(2 * s["N"], s["classes"])
    return dict(shape=f"N={2 * s['N']} D={s['D']} classes={s['classes']}", args=(x, y, torch.tensor(1 / SUPCON_T)),
                ours=lambda x, y, scale: mf.labeled_contrastive(x, y, temperature=SUPCON_T, pairwise=True),
                eager=lambda x, y, scale: labeled_contrastive_loss(x, None, y, None, scale, True, "mean", True))


def explicit(size):
    s = SHAPES[size]
    n = 2 * s["N"]
    q, p = _features(n, s["D"]), _features(n, s["D"], seed=1)
    bank = _features(s["bank"], s["D"], grad=False, seed=2)  # a memory bank holds detached keys
    return dict(shape=f"N={n} M={s['bank']} D={s['D']}", args=(q, p, bank, torch.tensor(1 / EXPLICIT_T)),
                ours=lambda q, p, bank, scale: mf.info_nce_explicit(q, p, bank, temperature=EXPLICIT_T),
                eager=lambda q, p, bank, scale: _labeled.explicit(q, p, bank, scale, True, "mean", "torch"))


CASES = {"nt_xent": nt_xent, "supcon_loss": supcon, "labeled_pairwise": pairwise, "info_nce_explicit": explicit}


def test_labeled(run_bench, case, provider, phase):
    run_bench(case, provider, phase)
