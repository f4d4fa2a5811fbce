# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): ANIL T=1 (S=25, Q=75, D=640, K=5) forward+backward per-call time, a loop of 500 and 300 timed singly.
# PYTHONPATH=python .venv/bin/python bench/probes/anil_t1_per_call.py
import time, torch
from metassl_fast.benchmarks import inner_loop as il
args = il._inputs(1, 25, 75, 640, 5)
fn = il._ours(5)
step = lambda: il._step(fn, args)
for _ in range(50): step()
for rep in range(3):
    t = time.perf_counter()
    for _ in range(500): step()
    print("loop of 500: us per call", (time.perf_counter() - t) / 500 * 1e6)
ts=[]
for _ in range(300):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
ts.sort(); print("individually median", ts[150]*1e6, "min", ts[0]*1e6)
