# Issue 14 probe (2026-12-08): info_nce at N=1024, D=128, fp32, ours against torch.compile of the
# benchmark's eager code, 40 interleaved repeats in one process.  Run it twice to see the allocator's effect:
#   .venv/bin/python bench/probes/contrastive_allocator.py
#   MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python bench/probes/contrastive_allocator.py
import torch, time, statistics, metassl_fast as msf
from metassl_fast.benchmarks import contrastive as B
q,k,s=B._inputs("info_nce",1024,128,torch.float32)
ours=B._ours("info_nce"); comp=torch.compile(B._reference_loss("info_nce"), dynamic=False)
for _ in range(3): B._step(ours,q,k,s); B._step(comp,q,k,s)
r={0:[],1:[]}
for rep in range(40):
    for i,f in ((0,ours),(1,comp)) if rep%2 else ((1,comp),(0,ours)):
        t=time.perf_counter(); B._step(f,q,k,s); r[i].append((time.perf_counter()-t)*1e3)
print("ours", round(statistics.median(r[0]),2), "compile", round(statistics.median(r[1]),2), "ratio compile/ours", round(statistics.median(r[1])/statistics.median(r[0]),2))
