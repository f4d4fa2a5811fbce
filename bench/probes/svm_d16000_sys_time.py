# Issue 13 probe, run for bench/RESULTS.md (2026-12-08): svm_loss T=8, 5-shot, D=16000 backward per call, wall / user / sys
# time and /proc/vmstat page-fault and THP counters (the bimodal 8 vs 45-50 ms backward).
#   PYTHONPATH=python .venv/bin/python bench/probes/svm_d16000_sys_time.py
import time, torch, resource, os
from metassl_fast.benchmarks import heads as H
from metassl_fast import meta
torch.set_num_threads(2)
xs, ys, xq, yq = H.episodes(8, 5, 16000, 15)
x, q = xs.detach().clone().requires_grad_(), xq.detach().clone().requires_grad_()
def ru(): r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime, r.ru_stime
def vm():
    d={}
    for ln in open('/proc/vmstat'):
        k,v=ln.split()
        if k.startswith('thp_') or k in ('pgfault','compact_stall','pgmajfault'): d[k]=int(v)
    return d
for i in range(12):
    x.grad = q.grad = None
    l = meta.svm_loss(x, ys, q, yq, C=H.SVM_C, n_way=H.N_WAY)
    u0,s0=ru(); v0=vm(); t1=time.perf_counter()
    l.backward(); t2=time.perf_counter(); u1,s1=ru(); v1=vm()
    dv={k:v1[k]-v0[k] for k in v1 if v1[k]!=v0[k]}
    print(i, f"bwd {1e3*(t2-t1):.1f} ms user {1e3*(u1-u0):.1f} sys {1e3*(s1-s0):.1f}", dv)
