# Issue 14 probe, run for bench/RESULTS.md (2026-12-08): the sweep with MKL (torch.addmm) for dK, or dK and dQ, instead
# of the own products, interleaved with the own products, clip_loss and info_nce at N=8192, D=128.
#   PYTHONPATH=python .venv/bin/python bench/probes/sweep_hybrid.py
import time, statistics, torch, torch.nn.functional as F
import metassl_fast as msf
from metassl_fast.ops import _common
P=_common._OwnProducts
own_kg = P.keys_grad
def mkl_kg(self, S, r0, r1, c0, c1, d_keys, alpha):
    d_keys.addmm_(S[:, c0:c1].t(), self.rows[r0:r1], alpha=alpha)
own_rg = P.rows_grad
def mkl_rg(self, S, out, alpha, accumulate):
    if accumulate: out.addmm_(S, self.keys, alpha=alpha)
    elif alpha == 1.0: torch.mm(S, self.keys, out=out)
    else: out.addmm_(S, self.keys, beta=0.0, alpha=alpha)
torch.manual_seed(0)
q = F.normalize(torch.randn(8192,128),dim=1).requires_grad_(); k = F.normalize(torch.randn(8192,128),dim=1).requires_grad_()
s = torch.tensor(14.3, requires_grad=True)
variants = {"own all": (own_kg, own_rg), "mkl dK": (mkl_kg, own_rg), "mkl dK+dQ": (mkl_kg, mkl_rg)}
for op, fn in [("clip", lambda: msf.clip_loss(q,k,s)), ("info_nce", lambda: msf.info_nce(q,k,temperature=0.07))]:
    res={v:[] for v in variants}
    for r in range(8):
        for v,(kg,rg) in variants.items():
            P.keys_grad, P.rows_grad = kg, rg
            q.grad=k.grad=s.grad=None
            t=time.perf_counter(); fn().backward(); res[v].append((time.perf_counter()-t)*1e3)
    base=statistics.median(res["own all"])
    print(op, {v: f"{statistics.median(x):.0f} ms ({statistics.median(x)/base:.3f})" for v,x in res.items()})
