# Issue 14 probe (2026-12-08): the CPU sweep's S-block size (TARGET_BLOCK_BYTES 1-8 MiB) for info_nce and
# clip_loss at N=8192, D=128, fp32, forward+backward, configurations interleaved, median of 6 repeats.
#   .venv/bin/python bench/probes/sweep_block_size.py
import os, torch, time, statistics, sys, metassl_fast as m
from metassl_fast.ops import _common as cm
torch.manual_seed(0)
N,D=8192,128
q=torch.randn(N,D,requires_grad=True); k=torch.randn(N,D,requires_grad=True); ls=torch.tensor(2.0)
ops={'info_nce':lambda: m.info_nce(q,k),'clip':lambda: m.clip_loss(q,k,ls)}
cfgs=[(8<<20,128),(4<<20,64),(2<<20,32),(1<<20,16)]
res={}
for rep in range(7):
  for name,f in ops.items():
    for tb,mr in (cfgs if rep%2 else cfgs[::-1]):
        cm.TARGET_BLOCK_BYTES=tb; cm.MIN_BLOCK_ROWS=mr
        q.grad=k.grad=None
        t=time.perf_counter(); l=f(); l.backward(); dt=time.perf_counter()-t
        if rep>0: res.setdefault((name,tb>>20),[]).append(dt*1e3)
for kk,v in sorted(res.items()): print(kk, round(statistics.median(v),1))
