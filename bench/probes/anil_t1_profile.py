# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): cProfile of 200 such calls (where the time goes).
# PYTHONPATH=python .venv/bin/python bench/probes/anil_t1_profile.py
import sys, time, torch, cProfile, pstats
from metassl_fast.benchmarks import inner_loop as il
args = il._inputs(1, 25, 75, 640, 5)
fn = il._ours(5)
step = lambda: il._step(fn, args)
for _ in range(20): step()
pr = cProfile.Profile(); pr.enable()
for _ in range(200): step()
pr.disable()
pstats.Stats(pr).sort_stats(sys.argv[1] if len(sys.argv)>1 else "tottime").print_stats(int(sys.argv[2]) if len(sys.argv)>2 else 25)
