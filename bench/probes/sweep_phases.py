# Issue 14 probe, run for bench/RESULTS.md (2026-12-08): where clip_loss / info_nce (N=8192, D=128, fp32, fwd+bwd) spend
# their time in the CPU row sweep: each product of the own GEMM and the elementwise kernel, timed in one process.
#   PYTHONPATH=python .venv/bin/python bench/probes/sweep_phases.py
import time, collections, torch, torch.nn.functional as F
import metassl_fast as msf
from metassl_fast.ops import _common
acc = collections.Counter()
def timed(name, f):
    def w(*a, **k):
        t=time.perf_counter(); r=f(*a, **k); acc[name]+=time.perf_counter()-t; return r
    return w
P=_common._OwnProducts
P.scores=timed("S product", P.scores); P.rows_grad=timed("dQ product (G K)", P.rows_grad); P.keys_grad=timed("dK product (G^T Q)", P.keys_grad)
orig=_common.row_sweep
def sweep(rows, keys, kernel, **kw):
    return orig(rows, keys, timed("elementwise kernel", kernel), **kw)
import metassl_fast.ops.contrastive.cpu as ccpu
ccpu.row_sweep=timed("whole sweep", sweep)
torch.manual_seed(0)
q = F.normalize(torch.randn(8192,128),dim=1).requires_grad_(); k = F.normalize(torch.randn(8192,128),dim=1).requires_grad_()
s = torch.tensor(14.3, requires_grad=True)
for op, fn in [("clip", lambda: msf.clip_loss(q,k,s)), ("info_nce", lambda: msf.info_nce(q,k,temperature=0.07))]:
    for _ in range(2):
        q.grad=k.grad=s.grad=None; fn().backward()
    acc.clear(); n=5
    t=time.perf_counter()
    for _ in range(n):
        q.grad=k.grad=s.grad=None; fn().backward()
    tot=(time.perf_counter()-t)/n*1e3
    print(op, f"total {tot:.0f} ms", {k_: round(v/n*1e3,1) for k_,v in acc.items()})
