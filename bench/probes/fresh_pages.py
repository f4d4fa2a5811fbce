# Issue 13/14 probe, run as-is for bench/RESULTS.md (2026-12-07): the first write of a fresh 38 MB buffer
# (d query of svm_loss at T=8, Q=75, D=16000) with and without ops/_common.fresh_like's huge-page advice,
# against rewriting a buffer already mapped; and the THP counters of /proc/vmstat around it.
# .venv/bin/python bench/probes/fresh_pages.py
import time, torch
from metassl_fast.ops._common import fresh_like

n = 8 * 75 * 16000
like = torch.empty(n)
kept = torch.empty(n)
cases = {"fresh torch.empty + write": lambda: torch.empty(n).fill_(1.0),
         "fresh_like (advised) + write": lambda: fresh_like(like).fill_(1.0),
         "rewrite of a mapped buffer": lambda: kept.fill_(1.0)}
vm = lambda: {k: v for k, v in (l.split() for l in open("/proc/vmstat")) if k in ("thp_fault_alloc", "thp_fault_fallback", "compact_stall")}
print("THP:", open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip(), "| defrag:",
      open("/sys/kernel/mm/transparent_hugepage/defrag").read().strip(), "| before", vm())
for rnd in range(2):
    for name, f in cases.items():
        for _ in range(3): f()
        ts = []
        for _ in range(15):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        ts.sort(); print(f"{name}: median {ts[7] * 1e3:.2f} ms, min {ts[0] * 1e3:.2f} ms")
print("after", vm())
