"""Regression benchmarks of the siglip op (ops/siglip): siglip_loss with a learned logit scale
and bias, ours against reference/siglip.py and its torch.compile.  float32, CPU.
Conventions: conftest.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl_fast import functional as mf
from metassl_fast.reference import siglip_loss

SHAPES = {"default": dict(N=2048, D=128), "tiny": dict(N=16, D=8)}


def siglip(size):
    s = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(s["N"], s["D"], generator=g), dim=-1).requires_grad_() for _ in range(2))
    # SigLIP's initialisation (logit_scale exp(log 10), logit_bias -10), both learned
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    return dict(shape=f"N={s['N']} D={s['D']}", args=(img, txt, scale, bias),
                ours=lambda img, txt, scale, bias: mf.siglip_loss(img, txt, scale, bias),
                eager=siglip_loss)


CASES = {"siglip_loss": siglip}


def test_siglip(run_bench, case, provider, phase):
    run_bench(case, provider, phase)
